"""No evaluation answer reaches any training input over a whole evaluation run.

The stream is user data whose answers are unique random tokens that appear in no
document, so that they could only reach training through a leak. Every method that
trains runs on it (with REM, ReST-EM and replay on), and four nets catch a leak:

* every forward pass of every model loaded during the run (training, sampling, scoring,
  answering) has its input decoded and searched for the answers;
* the text-level training entry points are spied on: ``lm.token_nll`` (all SFT, dream
  scoring, trials, ReST-EM), ``nrem.run_nrem`` (consolidation prompts and contexts),
  ``rem.write_dreams`` (the episodes dreams are written about) and ``rem.train_dreams``;
* every file the runs leave (dreams, probes, replay buffer, lineage, phase records)
  is searched, and the memory store hands the episodes out without answers;
* controls: the nets do fire on an answer, and the answers did reach the scorer.
"""
import json
import random
import string
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import sleepray.lm as lm
import sleepray.models as models
import sleepray.nrem as nrem
import sleepray.rem as rem
from sleepray.config import load_config
from sleepray.eval_run import run_eval
from sleepray.memory import MemoryStore
from sleepray.userdata import load_episodes

TINY = ["nrem.steps=1", "nrem.batch_size=3", "nrem.prompts_per_episode=6", "nrem.judge=exact",
        "nrem.lti_group_size=2", "nrem.max_new_tokens=12",
        "rem.dreams_per_episode=3", "rem.formats=[qa,rewrite,implications]", "rem.keep_top_k=2",
        "rem.keep_random=1", "rem.trial_steps=1", "rem.restem_steps=2",
        "rem.sft_steps=2", "rem.probes_per_episode=2", "rem.max_new_tokens=16", "rem.replay_fraction=0.5",
        "eval.baseline_steps=2", "eval.drift_texts=2", "eval.drift_world_episodes=1",
        "eval.answer_max_new_tokens=6", "eval.seeds=1", "eval.in_context=false", "eval.keep_runs=true",
        "cycle.n_sleeps=2", "world.n_episodes=3", "model.path=seed:test", "eval.num_threads=1"]
METHODS = ["sft", "seal", "distill_no_expansion", "no_expansion", "sleep"]


def _secret(rng: random.Random) -> str:
    # no English word, not in any lexicon pool: it can't turn up by chance
    return "zq" + "".join(rng.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _stream(path: Path) -> list[str]:
    rng = random.Random(20260)
    people = [("Alba Trent", "Vinmoor", "sailing"), ("Corin Dale", "Ashford", "pottery"),
              ("Mira Holt", "Kestrel Bay", "chess")]
    secrets, recs = [], []
    for k, (name, city, hobby) in enumerate(people):
        ep = f"user-{k}"
        recs += [{"document": f"{name} was born in {city}. {name} enjoys {hobby}.", "episode": ep},
                 {"document": f"{name}'s birthplace is {city}. In free time, {name} likes {hobby}.",
                  "episode": ep}]
        for q in (f"What is the code word of {name}?", f"What is {name}'s locker number?"):
            s = _secret(rng)
            secrets.append(s)
            recs.append({"question": q, "answer": s, "episode": ep})
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    docs = " ".join(r.get("document", "") for r in recs).lower()
    assert not [s for s in secrets if s in docs]
    return secrets


class _Net:
    """Records every leak of a secret into a text it is shown."""

    def __init__(self, secrets):
        self.secrets = [s.lower() for s in secrets]
        self.leaks: list[tuple[str, str]] = []
        self.seen = 0

    def check(self, where: str, text) -> None:
        self.seen += 1
        t = str(text).lower()
        self.leaks += [(where, s) for s in self.secrets if s in t]


@pytest.fixture(scope="module")
def leak_run(tmp_path_factory, seed_test_model):
    tmp = tmp_path_factory.mktemp("leak")
    secrets = _stream(tmp / "qa.jsonl")
    net = _Net(secrets)
    calls = {"forward": 0, "token_nll": 0, "run_nrem": 0, "write_dreams": 0, "train_dreams": 0}
    hooked: list = []

    def hook_forward(tok):
        # on the token embedding: every forward pass, however PEFT wraps the model, goes through it
        def pre_hook(module, args):
            calls["forward"] += 1
            for row in args[0].tolist():
                net.check("forward", tok.decode(row, skip_special_tokens=True))
        return pre_hook

    real_load = models.load_model

    def load_model(*a, **k):
        model, tok = real_load(*a, **k)
        model.get_input_embeddings().register_forward_pre_hook(hook_forward(tok))
        hooked.append((model, tok))
        return model, tok

    real_nll, real_nrem = lm.token_nll, nrem.run_nrem
    real_write, real_train = rem.write_dreams, rem.train_dreams

    def token_nll(model, tok, texts, prompts=None):
        calls["token_nll"] += 1
        for t in list(texts) + list(prompts or []):
            net.check("token_nll", t)
        return real_nll(model, tok, texts, prompts)

    def run_nrem(bank, tok, prompts, *a, **k):
        calls["run_nrem"] += 1
        for p in prompts:
            net.check("run_nrem", f"{p.context}\n{p.prompt}")
        return real_nrem(bank, tok, prompts, *a, **k)

    def write_dreams(bank, tok, episode, *a, **k):
        calls["write_dreams"] += 1
        net.check("write_dreams", (episode.context, [(p.question, p.answer) for p in episode.probes],
                                   episode.facts))
        dreams = real_write(bank, tok, episode, *a, **k)
        for d in dreams:
            net.check("dream", d.prompt + d.text)
        return dreams

    def train_dreams(bank, tok, dreams, *a, **k):
        calls["train_dreams"] += 1
        for d in dreams:
            net.check("train_dreams", d.prompt + d.text)
        return real_train(bank, tok, dreams, *a, **k)

    cfg = load_config(None, TINY + ["world.source=file", f"world.data_path={tmp / 'qa.jsonl'}",
                                    f"eval.methods=[{','.join(METHODS)}]"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "load_model", load_model)
        mp.setattr(lm, "token_nll", token_nll)
        mp.setattr(nrem, "run_nrem", run_nrem)
        mp.setattr(rem, "write_dreams", write_dreams)
        mp.setattr(rem, "train_dreams", train_dreams)
        results = run_eval(cfg, tmp / "out", progress=False)
    return dict(results=results, secrets=secrets, net=net, calls=calls, out=tmp / "out", hooked=hooked,
                cfg=cfg)


def test_no_answer_reaches_any_model_input_or_training_text(leak_run):
    net, calls = leak_run["net"], leak_run["calls"]
    # every net was used: models ran, SFT/NREM/REM trained, dreams were written and trained
    assert calls["forward"] > 100 and calls["token_nll"] > 5
    assert calls["run_nrem"] >= 2 * 3  # distill_no_expansion, no_expansion and sleep, two sleeps each
    assert calls["write_dreams"] >= 2 * 3 and calls["train_dreams"] >= 2 * 2  # seal and sleep's REM
    assert net.seen > 1000
    assert net.leaks == [], net.leaks[:5]


def test_every_file_the_runs_leave_is_free_of_answers(leak_run):
    runs = leak_run["out"] / "runs"
    net = _Net(leak_run["secrets"])
    files = [p for p in runs.rglob("*") if p.is_file() and "memory" not in p.parts]
    assert any(p.name == "dreams.parquet" for p in files) and any(p.name == "record.json" for p in files)
    for p in files:
        if p.suffix == ".parquet":
            net.check(str(p), pq.read_table(p).to_pylist())
        elif p.suffix in (".json", ".jsonl", ".txt", ".md"):
            net.check(str(p), p.read_text())
    assert net.leaks == [], net.leaks[:5]
    # the memory stores keep the answers (for evaluation) but hand episodes out without them
    stores = [MemoryStore(p.parent) for p in runs.rglob("ledger.jsonl")]
    assert len(stores) == len(METHODS)
    for store in stores:
        net.check("export", [(e.context, [(p.question, p.answer) for p in e.probes], e.facts)
                             for e in store.export_episodes("all")])
        assert net.leaks == []
        kept = [a for e in store.export_episodes("all", with_answers=True) for a in (p.answer for p in e.probes)]
        assert sorted(kept) == sorted(leak_run["secrets"])


def test_the_nets_fire_and_answers_reached_only_the_scorer(leak_run):
    secret = leak_run["secrets"][0]
    # control 1: a forward pass over a text with an answer in it is caught by the hook
    model, tok = leak_run["hooked"][0]
    net = leak_run["net"]
    before = len(net.leaks)
    import torch
    with torch.no_grad():
        model(input_ids=torch.tensor([tok.encode(f"Q: what is it?\nA: {secret}")]))
    assert len(net.leaks) == before + 1 and net.leaks[-1][1] == secret
    net.leaks.pop()
    # control 2: the scorer did get the answers, for every method, sleep and question
    t = pq.read_table(leak_run["out"] / "answers.parquet").to_pylist()
    golds = {r["gold"] for r in t}
    assert golds == set(leak_run["secrets"])
    n_q = len(leak_run["secrets"])
    for m in METHODS:
        rows = [r for r in t if r["method"] == m and r["mode"] == "closed_book"]
        assert len(rows) == 2 * n_q  # two sleeps, every question
    # the user stream is what ran: its episodes, and the answers are unlearnable here
    eps = load_episodes(leak_run["cfg"].world.data_path)
    assert leak_run["results"]["episodes"] == [e.episode_id for e in eps]
