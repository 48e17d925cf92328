"""No evaluation question and no evaluation answer reaches a sleep or any method's training.

Issue 15: a sleep learns from documents alone; it never sees the questions it is graded on.
The stream is user data about people of the seed world's kind (so that the seed model can
write its own questions about them) whose questions each carry a unique random code
(``... in ledger vk7m2q...?``) and whose answers are unique random codes too; none of them
appears in any document, so the model can't write one by chance: a question or an answer can
only reach training through a leak. Every method of ``sleepray.eval_methods.METHODS`` that
trains runs on it for two sleeps (NREM with and without Learning to Imitate, REM with trials,
ReST-EM, replay, the retention check, repair and scaling switched on: the last two act only
when the second sleep makes the model forget), and these nets catch a leak:

* every forward pass of every model loaded during the run (training, sampling, scoring,
  answering; teacher copies too) has its input ids searched for each question's and each
  answer's token sequence (``encode(s)`` and ``encode(" " + s)``: BPE differs with a leading
  space) and its decoded text searched for the strings; a global sentinel proves that no
  token embedding ran without that hook;
* every tokenizer ``sleepray.models.load_model`` returns has ``__call__`` and ``encode``
  wrapped (on that instance only), so every text tokenized is searched; a sentinel on the
  tokenizer base class proves that no other tokenizer tokenized anything;
* the text-level entry points are spied on: ``lm.token_nll`` (all SFT, dream scoring, trials,
  ReST-EM, replay, repair), ``nrem.run_nrem``, ``prompts.consolidation_prompts``, the model's
  question writer, ``rem.teacher_probe_targets``, ``rem.write_dreams`` and ``rem.train_dreams``;
  an episode handed to any of them must carry no probes and no facts;
* every file the runs leave under their storage (the memory store's segments, the replay
  buffer, dreams/probes, lineage, records, adapters) is searched, Parquet tables cell by cell
  (strings, and integer lists for the token sequences).

The one place a question may reach a model is the scorer (``eval_run.answer_episode``): the
nets there record what they saw instead of a leak, and that is the positive control that
they can see a question at all. Further controls: a forward pass and a tokenizer call on a
question are caught, a file holding a question is caught, a memory record carrying probes
is refused, and the scorer got every question and answer.
"""
import json
import random
import string
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

import sleepray.eval_methods as eval_methods
import sleepray.eval_run as eval_run
import sleepray.lm as lm
import sleepray.models as models
import sleepray.nrem as nrem
import sleepray.prompts as prompts_mod
import sleepray.rem as rem
from sleepray.config import load_config
from sleepray.eval_run import run_eval
from sleepray.memory import MemoryStore
from sleepray.userdata import load_episodes
from sleepray.world import Episode, Probe, World

TINY = ["nrem.steps=4", "nrem.lr=0.003", "nrem.batch_size=3", "nrem.prompts_per_episode=6", "nrem.judge=exact",
        "nrem.lti_group_size=2", "nrem.max_new_tokens=12",
        "rem.dreams_per_episode=3", "rem.formats=[qa,rewrite,implications]", "rem.keep_top_k=2",
        "rem.keep_random=1", "rem.trial_steps=1", "rem.restem_steps=2",
        "rem.sft_steps=4", "rem.sft_lr=0.003", "rem.probes_per_episode=2", "rem.max_new_tokens=16",
        "rem.replay_fraction=0.5",
        # the retention check, the repair and the scaling of the second sleep run on the first's buffer
        # (the steps and learning rates above let the first sleep learn some of its own probe answers,
        # which the second sleep's retention check then asks)
        "rem.repair_steps=2", "rem.repair_rounds=1", "rem.retention_probes=4", "rem.retention_tolerance=0.0",
        "rem.retention_scales=[0.5,0.0]",
        "eval.baseline_steps=2", "eval.drift_texts=2", "eval.drift_world_episodes=1",
        "eval.answer_max_new_tokens=6", "eval.seeds=1", "eval.in_context=false", "eval.keep_runs=true",
        "cycle.n_sleeps=2", "world.n_episodes=3", "model.path=seed:test", "eval.num_threads=1"]
METHODS = ["sft", "sft_self_qa", "seal", "distill_no_expansion", "no_expansion", "sleep", "sleep_no_rem",
           "sleep_no_lti", "sleep_no_replay"]
QUESTIONS = ("What is the code word of {name} in ledger {code}?", "What is {name}'s locker number at gate {code}?")


def _code(rng: random.Random, prefix: str) -> str:
    # no English word, not in any lexicon pool: it can't turn up by chance
    return prefix + "".join(rng.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _stream(path: Path) -> dict:
    """The user-data stream: three people of the seed world's kind (names the seed model can write
    questions about), their documents, and two questions each; every question carries a unique
    code (``vk...``) and every answer is one (``zq...``), none of them in a document."""
    rng = random.Random(20260)
    world = World(20260, people_per_episode=1, orgs_per_episode=0, places_per_episode=0, phrasings_per_fact=2)
    recs, answers, questions, codes, documents = [], [], [], [], []
    for k, wep in enumerate(world.episodes(3)):
        ep, name = f"user-{k}", wep.facts[0].entity
        documents += wep.documents
        recs += [{"document": d, "episode": ep} for d in wep.documents]
        for template in QUESTIONS:
            code, answer = _code(rng, "vk"), _code(rng, "zq")
            q = template.format(name=name, code=code)
            codes.append(code)
            questions.append(q)
            answers.append(answer)
            recs.append({"question": q, "answer": answer, "episode": ep})
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    text = " ".join(documents).lower()
    assert not [s for s in answers + codes if s in text]
    assert len(set(answers + codes)) == len(answers) + len(codes)
    return dict(answers=answers, questions=questions, codes=codes, documents=documents)


def _ids_key(ids) -> str:
    """A token id row as a string, so that a contiguous subsequence is a substring."""
    return "".join(map(chr, ids))


def _flat(x) -> str:
    if isinstance(x, str):
        return x
    if isinstance(x, dict):
        return "\n".join(_flat(v) for v in x.values())
    if isinstance(x, (list, tuple, set)):
        return "\n".join(_flat(v) for v in x)
    return str(x)


def _int_lists(x):
    """Every list of ints inside ``x`` (a Parquet row): token ids a file might hold."""
    if isinstance(x, dict):
        for v in x.values():
            yield from _int_lists(v)
    elif isinstance(x, (list, tuple)):
        if x and all(isinstance(v, int) and not isinstance(v, bool) for v in x):
            yield list(x)
        else:
            for v in x:
                yield from _int_lists(v)


class _Net:
    """Records every leak of a question (or its code) or an answer into what it is shown.

    ``zone`` is ``"score"`` while the evaluation answers its questions (the one place a question
    may reach a model): there a question is recorded in ``scored`` (the nets can see one), not as
    a leak. An answer is a leak everywhere."""

    def __init__(self, stream: dict):
        self.needles = ([("answer", a.lower(), a.lower()) for a in stream["answers"]]
                        + [("question", q.lower(), q.lower()) for q in stream["questions"]]
                        + [("question", c.lower(), q.lower()) for c, q in zip(stream["codes"], stream["questions"])])
        self.stream = stream
        self.zone, self.method = "train", None
        self.leaks: list[tuple] = []   # (zone, method, where, kind, question or answer)
        self.scored: set[tuple] = set()  # (where, question) seen inside the scorer
        self.seen: Counter = Counter()

    def patterns(self, encode) -> list[tuple[str, str, str]]:
        """(kind, question or answer, token sequence) of every question, answer and question code,
        with and without a leading space; ``encode(text)``: the tokenizer's ids, no special tokens."""
        out = []
        s = self.stream
        for kind, texts, of in (("question", s["questions"], s["questions"]), ("answer", s["answers"], s["answers"]),
                                ("question", s["codes"], s["questions"])):
            for text, owner in zip(texts, of):
                for variant in (text, " " + text):
                    ids = encode(variant)
                    if len(ids) >= 3:
                        out.append((kind, owner.lower(), _ids_key(ids)))
        return out

    def _hit(self, where: str, kind: str, what: str) -> None:
        if kind == "question" and self.zone == "score":
            self.scored.add((where, what))
        else:
            self.leaks.append((self.zone, self.method, where, kind, what))

    def check(self, where: str, text) -> None:
        self.seen[where] += 1
        t = _flat(text).lower()
        hits = {(kind, what) for kind, needle, what in self.needles if needle in t}
        for kind, what in sorted(hits):
            self._hit(where, kind, what)

    def check_ids(self, where: str, rows, patterns) -> None:
        self.seen[where] += 1
        hits = set()
        for row in rows:
            key = _ids_key(row)
            hits |= {(kind, what) for kind, what, p in patterns if p in key}
        for kind, what in sorted(hits):
            self._hit(where, kind, what)

    def check_episode(self, where: str, episode) -> None:
        """An episode handed to training: documents only."""
        self.check(where, (episode.context, [(p.question, p.answer) for p in episode.probes], episode.facts))
        if episode.probes or episode.facts:
            self.leaks.append((self.zone, self.method, where, "episode with probes/facts", episode.episode_id))


def _spy_tokenizer(tok, net: _Net) -> None:
    """Wrap ``__call__`` and ``encode`` of this one tokenizer object (a special method is looked up
    on the type, so the object gets a subclass of its own type: other tokenizers are untouched)."""
    base = type(tok)

    def __call__(self, *a, **k):
        net.check("tokenizer.__call__", (a, k))
        return base.__call__(self, *a, **k)

    def encode(self, *a, **k):
        net.check("tokenizer.encode", (a, k))
        return base.encode(self, *a, **k)

    tok.__class__ = type(base.__name__, (base,), {"__call__": __call__, "encode": encode, "_leak_net": True})


def _scan_files(files, net: _Net, patterns) -> None:
    """Search every file: Parquet cell by cell (strings and integer lists), the rest as text."""
    for p in files:
        if p.name.endswith(".parquet"):
            rows = pq.read_table(p).to_pylist()
            net.check(str(p), rows)
            net.check_ids(str(p) + ":ids", [ids for r in rows for ids in _int_lists(r)], patterns)
        else:
            net.check(str(p), p.read_bytes().decode("utf-8", errors="ignore"))


@pytest.fixture(scope="module")
def leak_run(tmp_path_factory, seed_test_model):
    tmp = tmp_path_factory.mktemp("leak")
    stream = _stream(tmp / "qa.jsonl")
    net = _Net(stream)
    calls: Counter = Counter()
    hooked: list = []
    seen = dict(nrem_kinds=Counter(), nrem_lti=set(), prompt_kinds=Counter(), targets=[], written=[],
                patterns=None)

    def hook_forward(tok, patterns):
        # on the token embedding: every forward pass, however PEFT wraps the model, goes through it
        def pre_hook(module, args, kwargs):
            calls["forward"] += 1
            ids = args[0] if args else kwargs["input"]
            rows = ids.tolist()
            net.check_ids("forward:ids", rows, patterns)
            for row in rows:
                net.check("forward:text", tok.decode(row, skip_special_tokens=True))
        pre_hook._leak_net = True
        return pre_hook

    def embedding_sentinel(module, args):
        # every token embedding run in the process must carry the hook (deep copies keep it)
        if isinstance(module, torch.nn.Embedding):
            if any(getattr(h, "_leak_net", False) for h in module._forward_pre_hooks.values()):
                calls["embedding_hooked"] += 1
            else:
                calls["embedding_unhooked"] += 1

    real_call, real_encode = PreTrainedTokenizerBase.__call__, PreTrainedTokenizerBase.encode

    def tokenizer_call(self, *a, **k):
        # every tokenizer in the process: one ``load_model`` did not wrap is counted, and searched too
        if not getattr(type(self), "_leak_net", False):
            calls["tokenizer_unwrapped"] += 1
            net.check("unwrapped tokenizer.__call__", (a, k))
        return real_call(self, *a, **k)

    def tokenizer_encode(self, *a, **k):
        if not getattr(type(self), "_leak_net", False):
            calls["tokenizer_unwrapped"] += 1
            net.check("unwrapped tokenizer.encode", (a, k))
        return real_encode(self, *a, **k)

    real_load = models.load_model

    def load_model(*a, **k):
        model, tok = real_load(*a, **k)
        # the tokenizer itself, past every net: the nets' own needles are not a leak
        patterns = net.patterns(lambda text: real_encode(tok, text, add_special_tokens=False))
        seen["patterns"] = seen["patterns"] or patterns
        model.get_input_embeddings().register_forward_pre_hook(hook_forward(tok, patterns), with_kwargs=True)
        _spy_tokenizer(tok, net)
        hooked.append((model, tok, patterns))
        return model, tok

    real_nll, real_nrem = lm.token_nll, nrem.run_nrem
    real_write, real_train, real_targets = rem.write_dreams, rem.train_dreams, rem.teacher_probe_targets
    real_prompts, real_writer = prompts_mod.consolidation_prompts, prompts_mod.model_question_writer
    real_answer, real_sleep = eval_run.answer_episode, eval_methods.Method.sleep

    def token_nll(model, tok, texts, prompts=None):
        calls["token_nll"] += 1
        net.check("token_nll", (list(texts), list(prompts or [])))
        return real_nll(model, tok, texts, prompts)

    def run_nrem(bank, tok, prompts, ncfg, *a, **k):
        calls["run_nrem"] += 1
        seen["nrem_lti"].add(ncfg.use_lti)
        seen["nrem_kinds"].update(p.kind for p in prompts)
        net.check("run_nrem", [f"{p.context}\n{p.prompt}" for p in prompts])
        return real_nrem(bank, tok, prompts, ncfg, *a, **k)

    def consolidation_prompts(episode, *a, **k):
        calls["consolidation_prompts"] += 1
        net.check_episode("consolidation_prompts:episode", episode)
        out = real_prompts(episode, *a, **k)
        seen["prompt_kinds"].update(p.kind for p in out)
        net.check("consolidation_prompts", [p.teacher_prompt for p in out])
        return out

    def model_question_writer(*a, **k):
        write = real_writer(*a, **k)

        def spied(context, n):
            calls["question_writer"] += 1
            net.check("question_writer:context", context)
            qs = write(context, n)
            seen["written"] += qs
            net.check("question_writer", qs)
            return qs
        return spied

    def teacher_probe_targets(bank, tok, episode, *a, **k):
        calls["teacher_probe_targets"] += 1
        net.check_episode("teacher_probe_targets:episode", episode)
        out = real_targets(bank, tok, episode, *a, **k)
        seen["targets"] += [(t.question, t.target) for t in out]
        net.check("teacher_probe_targets", [(t.prompt, t.text) for t in out])
        return out

    def write_dreams(bank, tok, episode, *a, **k):
        calls["write_dreams"] += 1
        net.check_episode("write_dreams:episode", episode)
        dreams = real_write(bank, tok, episode, *a, **k)
        net.check("dream", [d.prompt + d.text for d in dreams])
        return dreams

    def train_dreams(bank, tok, dreams, *a, **k):
        calls["train_dreams"] += 1
        net.check("train_dreams", [d.prompt + d.text for d in dreams])
        return real_train(bank, tok, dreams, *a, **k)

    def answer_episode(*a, **k):  # the scorer: the one place a question may reach a model
        calls["answer_episode"] += 1
        net.zone = "score"
        try:
            return real_answer(*a, **k)
        finally:
            net.zone = "train"

    def method_sleep(self, i):
        net.method = f"{self.name}/sleep{i + 1}"
        try:
            return real_sleep(self, i)
        finally:
            net.method = None

    cfg = load_config(None, TINY + ["world.source=file", f"world.data_path={tmp / 'qa.jsonl'}",
                                    f"eval.methods=[{','.join(METHODS)}]"])
    handle = torch.nn.modules.module.register_module_forward_pre_hook(embedding_sentinel)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(PreTrainedTokenizerBase, "__call__", tokenizer_call)
            mp.setattr(PreTrainedTokenizerBase, "encode", tokenizer_encode)
            # the sentinels' own controls: a token embedding without the hook, a tokenizer not wrapped
            torch.nn.Embedding(4, 2)(torch.tensor([1]))
            AutoTokenizer.from_pretrained(seed_test_model).encode("a")
            assert calls.pop("embedding_unhooked") == 1 and calls.pop("tokenizer_unwrapped") == 1
            mp.setattr(models, "load_model", load_model)
            mp.setattr(lm, "token_nll", token_nll)
            mp.setattr(nrem, "run_nrem", run_nrem)
            mp.setattr(prompts_mod, "consolidation_prompts", consolidation_prompts)
            mp.setattr(prompts_mod, "model_question_writer", model_question_writer)
            mp.setattr(rem, "model_question_writer", model_question_writer)
            mp.setattr(rem, "teacher_probe_targets", teacher_probe_targets)
            mp.setattr(rem, "write_dreams", write_dreams)
            mp.setattr(rem, "train_dreams", train_dreams)
            mp.setattr(eval_run, "answer_episode", answer_episode)
            mp.setattr(eval_methods.Method, "sleep", method_sleep)
            results = run_eval(cfg, tmp / "out", progress=False)
    finally:
        handle.remove()
    # the counts as the run left them (the hooks stay on the loaded models for the controls)
    return dict(results=results, stream=stream, net=net, calls=Counter(calls), out=tmp / "out", hooked=hooked,
                cfg=cfg, seen=seen)


def _run(leak_run, method: str) -> dict:
    return next(r for r in leak_run["results"]["runs"] if r["method"] == method)


def test_every_training_method_runs():
    trains = sorted(n for n, m in eval_methods.METHODS.items() if m.trains)
    assert sorted(METHODS) == trains, "a method that trains is missing from this test"


def test_no_question_or_answer_reaches_any_model_input_tokenizer_or_training_text(leak_run):
    net, calls = leak_run["net"], leak_run["calls"]
    # every net was used: models ran, SFT/NREM/REM trained, dreams were written and trained
    assert calls["forward"] > 100 and calls["token_nll"] > 5
    assert calls["embedding_unhooked"] == 0 and calls["embedding_hooked"] == calls["forward"]
    assert calls["tokenizer_unwrapped"] == 0
    # two sleeps over the three episodes; per method: one call per sleep, or one per episode
    assert calls["run_nrem"] == 2 * 6  # distill_no_expansion, no_expansion and the four sleeps
    assert calls["consolidation_prompts"] == 3 * 6
    assert calls["write_dreams"] == 3 * 4  # seal and the three sleeps with REM
    assert calls["teacher_probe_targets"] == 3 * 4  # sft_self_qa and the three sleeps with REM
    assert calls["train_dreams"] >= 2 * 4  # (and more with repair rounds)
    assert net.seen["tokenizer.encode"] > 100 and net.seen["tokenizer.__call__"] > 0
    assert sum(net.seen.values()) > 1000
    assert net.leaks == [], net.leaks[:10]


def test_the_sleep_trained_on_self_written_questions(leak_run):
    seen = leak_run["seen"]
    # the guard is not vacuous: the model wrote questions, the teacher answered them
    assert seen["written"], "the seed model wrote no question at all"
    assert seen["targets"] and all(q and a for q, a in seen["targets"])
    assert seen["prompt_kinds"]["query"] > 0 and seen["nrem_kinds"]["query"] > 0
    assert seen["nrem_lti"] == {True, False}  # NREM with LTI, and distillation without it
    written = {q.lower() for q in seen["written"]}
    assert not written & {q.lower() for q in leak_run["stream"]["questions"]}


def test_a_whole_sleep_ran_rem_trials_restem_replay_and_retention(leak_run):
    runs = {m: _run(leak_run, m) for m in METHODS}
    assert all(len(r["sleeps"]) == 2 for r in runs.values())
    rem_sleeps = ("sleep", "sleep_no_lti", "sleep_no_replay")
    for m in rem_sleeps:
        for s in runs[m]["sleeps"]:
            assert s["phases"][:2] == ["nrem", "rem"] and s["rem_enabled"] is True
            assert s["rem_dreams"] > 0 and s["rem_kept"] > 0  # dreams were written, selected and tried
        assert runs[m]["sleeps"][0]["rem_probe_targets"] > 0  # on the model's own questions
    assert all(s["phases"][:2] == ["nrem", "publish"] for s in runs["sleep_no_rem"]["sleeps"])
    assert runs["sft_self_qa"]["sleeps"][0]["pairs"] > 0  # SFT on self-written Q/A
    # ReST-EM trained the dream writer on rewarded dreams
    assert sum(s["rem_restem_steps"] for m in rem_sleeps for s in runs[m]["sleeps"]) > 0
    # replay: the second sleep trained on rows of the first one's buffer
    for m in ("sleep", "sleep_no_lti"):
        s1, s2 = runs[m]["sleeps"]
        assert s1["rem_buffer_size"] > 0 and s2["rem_replayed"] > 0
    assert all(s["rem_buffer_size"] == 0 for s in runs["sleep_no_replay"]["sleeps"])
    # the retention check of the second sleep asked the probe answers the first one had learned
    # (as many as there were, up to rem.retention_probes); then repair and scaling, when it forgot
    out = leak_run["out"] / "runs"
    for m in ("sleep", "sleep_no_lti"):
        buf = pq.read_table(out / m / "seed0" / "replay" / "buffer.parquet").to_pylist()
        first = min(r["sleep_id"] for r in buf)  # "s0001"
        learned = [r for r in buf if r["sleep_id"] == first and r["format"] == "qa" and not r["kept"]
                   and r["learned"] is not False]
        s2 = runs[m]["sleeps"][1]
        assert s2["rem_retention_probes"] == min(4, len(learned)), (m, len(learned), s2)
        if learned:
            assert s2["rem_retention_accuracy_before_sleep"] is not None
    assert any(runs[m]["sleeps"][1]["rem_retention_probes"] > 0 for m in ("sleep", "sleep_no_lti")), \
        "the first sleep learned none of its probe answers: the retention check asked nothing"


def test_every_file_the_runs_leave_is_free_of_questions_and_answers(leak_run):
    runs = leak_run["out"] / "runs"
    net = _Net(leak_run["stream"])
    patterns = leak_run["seen"]["patterns"]
    files = [p for p in runs.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"dreams.parquet", "probes.parquet", "buffer.parquet", "ledger.jsonl"} <= names
    assert any(p.parent.name == "segments" and p.suffix == ".parquet" for p in files)
    _scan_files(files, net, patterns)
    assert net.leaks == [], net.leaks[:10]
    # the scan reads the memory segments' contents: it finds the documents there
    docs = _Net(dict(answers=[d for d in leak_run["stream"]["documents"]], questions=[], codes=[]))
    _scan_files([p for p in files if p.parent.name == "segments"], docs, patterns)
    assert {w for *_, w in docs.leaks} == {d.lower() for d in leak_run["stream"]["documents"]}
    # the memory stores hold documents only: no question, no answer, no fact, in any column
    stores = [MemoryStore(p.parent) for p in runs.rglob("ledger.jsonl")]
    assert len(stores) == len(METHODS)
    want = {e.episode_id: e.documents for e in load_episodes(leak_run["cfg"].world.data_path)}
    for store in stores:
        eps = store.export_episodes("all")
        assert {e.episode_id: e.documents for e in eps} == want
        assert all(not e.probes and not e.facts for e in eps)
        for seg in sorted((store.root / "segments").glob("*.parquet")):
            for row in pq.read_table(seg).to_pylist():
                assert row["probes"] == [] and row["eval_answers"] is None and row["eval_facts"] == []


def test_the_nets_fire_on_a_question(leak_run, tmp_path):
    net = leak_run["net"]
    model, tok, patterns = leak_run["hooked"][0]
    q, answer = leak_run["stream"]["questions"][0], leak_run["stream"]["answers"][0]
    before = len(net.leaks)
    try:
        # (b) tokenizing a question through a wrapped tokenizer is caught, by __call__ and encode
        ids = tok(f"Q: {q}\nA:")["input_ids"]
        assert ("tokenizer.__call__", "question", q.lower()) in [l[2:] for l in net.leaks[before:]]
        q_ids = tok.encode(q, add_special_tokens=False)
        assert ("tokenizer.encode", "question", q.lower()) in [l[2:] for l in net.leaks[before:]]
        # (a) a forward pass over text with the question is caught by string and by token sequence
        mark = len(net.leaks)
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
        got = {l[2:] for l in net.leaks[mark:]}
        assert {("forward:text", "question", q.lower()), ("forward:ids", "question", q.lower())} <= got
        # ... and so is a forward pass fed the question's token ids alone
        mark = len(net.leaks)
        with torch.no_grad():
            model(input_ids=torch.tensor([q_ids]))
        got = {l[2:] for l in net.leaks[mark:]}
        assert {("forward:text", "question", q.lower()), ("forward:ids", "question", q.lower())} <= got
        # the token-sequence net alone, with no text net: the question's ids inside other ids
        only_ids = _Net(leak_run["stream"])
        only_ids.check_ids("ids", [[5, 6] + q_ids + [7]], patterns)
        assert [l[3:] for l in only_ids.leaks] == [("question", q.lower())]
        # the question's code alone is caught too, and an answer too
        mark = len(net.leaks)
        net.check("text", f"something about {leak_run['stream']['codes'][0]} and {answer}")
        assert {l[3:] for l in net.leaks[mark:]} == {("question", q.lower()), ("answer", answer.lower())}
    finally:
        del net.leaks[before:]
    # (c) a file under a run's storage that holds a question is caught by the file scan
    storage = leak_run["out"] / "runs" / "sleep" / "seed0"
    planted = storage / "planted"
    planted.mkdir()
    try:
        pq.write_table(pa.table({"text": [f"Q: {q}"]}), planted / "text.parquet")
        (planted / "record.json").write_text(json.dumps({"question": q}))
        pq.write_table(pa.table({"ids": [[1] + q_ids]}), planted / "ids.parquet")
        scan = _Net(leak_run["stream"])
        _scan_files(sorted(planted.iterdir()), scan, patterns)
        assert sorted((Path(l[2]).name, l[3]) for l in scan.leaks) == [
            ("ids.parquet:ids", "question"), ("record.json", "question"), ("text.parquet", "question")]
    finally:
        for p in planted.iterdir():
            p.unlink()
        planted.rmdir()


def test_a_memory_record_with_evaluation_data_is_refused(tmp_path):
    # (d) a record carrying probes, answers or facts never enters memory
    store = MemoryStore(tmp_path / "memory")
    probe = {"question": "What is the code word of Alba Trent in ledger vkx?", "entity": "", "attribute": "user"}
    for key, value in (("probes", [probe]), ("eval_answers", ["zqx"]),
                       ("facts", [{"entity": "a", "kind": "b", "attribute": "c", "value": "zqx"}]),
                       ("eval_facts", [{"entity": "a", "kind": "b", "attribute": "c", "value": "zqx"}])):
        with pytest.raises(ValueError, match="evaluation data"):
            store.append({"episode_id": "e1", "text": "Alba Trent was born in Vinmoor.", key: value})
    assert len(store) == 0
    # an Episode is stored as its documents alone
    store.append(Episode("e2", ["Alba Trent was born in Vinmoor."], [],
                         [Probe("What is the code word of Alba Trent in ledger vkx?", "zqx", entity="",
                                attribute="user")]))
    (ep,) = store.export_episodes("all")
    assert ep.documents == ["Alba Trent was born in Vinmoor."] and ep.probes == [] and ep.facts == []
    rows = [r for seg in (tmp_path / "memory" / "segments").glob("*.parquet") for r in pq.read_table(seg).to_pylist()]
    assert len(rows) == 1 and "vkx" not in _flat(rows) and "zqx" not in _flat(rows)


def test_the_scorer_got_every_question_and_answer(leak_run):
    net, stream = leak_run["net"], leak_run["stream"]
    questions = {q.lower() for q in stream["questions"]}
    # the nets saw every question where the scorer fed it to a model: tokenizer, ids and text
    for where in ("tokenizer.__call__", "forward:ids", "forward:text"):
        assert {q for w, q in net.scored if w == where} == questions, where
    # (e) answers.parquet holds every question and answer, for every method and both sleeps
    t = pq.read_table(leak_run["out"] / "answers.parquet").to_pylist()
    n_q = len(stream["questions"])
    for m in METHODS:
        rows = [r for r in t if r["method"] == m and r["mode"] == "closed_book"]
        assert len(rows) == 2 * n_q
        assert {r["question"] for r in rows} == set(stream["questions"])
        assert {r["gold"] for r in rows} == set(stream["answers"])
    # the user stream is what ran: its episodes
    eps = load_episodes(leak_run["cfg"].world.data_path)
    assert leak_run["results"]["episodes"] == [e.episode_id for e in eps]
