"""REM: Dreaming (DESIGN.md section 1), in one process.

SEAL-style self-written curriculum, with the paper's three changes, on the expert that
NREM opened (``bank.training``):

1. :func:`write_dreams` -- per episode, ``m`` dreams sampled from the frozen model (the
   on-experts, not the training one) WITH the episode in context, in the formats
   "implications", "qa" and "rewrite", with one random unused expert slot switched on
   while sampling (diversity) and the dream writer adapter on when there is one.
2. :func:`teacher_probe_targets` -- questions the model writes about the episode with it
   in context (never the evaluation's questions: an episode's ``probes`` are not read),
   answered greedily by the teacher with the episode in context; those answers are the
   targets.
   :func:`score_dreams` scores each dream by its SFT gradient on the training expert:
   cosine with the probe-loss gradient ("grad_align") or its norm ("grad_norm");
   :func:`select` keeps the top k plus b random others.
3. :func:`run_trials` -- each kept dream fine-tunes an isolated copy of the expert
   (snapshot, ``trial_steps`` of SFT, closed-book probe score, exact restore);
   reward 1 when the probe score improves.
4. :func:`restem_update` -- ReST-EM: SFT of the :class:`DreamWriter` on the rewarded
   (prompt -> dream) pairs, so that dreams get better across sleeps.
5. :func:`train_dreams` -- SFT of the expert on the rewarded dreams plus replayed older
   dreams (:class:`~sleepray.replay.ReplayBuffer`), ordered by a curriculum, with the
   KL anchor on unrelated text and on older episodes' dreams (rehearsal). Like a
   trial, the whole SFT is kept only if neither the probe loss nor the closed-book
   accuracy on the teacher's answers got worse, nor the accuracy on older episodes'
   probe answers from the buffer (``rem.revert_if_worse``, ``rem.retention_probes``);
   otherwise the expert stays as NREM left it and none of the sleep's dreams enter the
   buffer.
6. Retention of the whole sleep (NREM and REM share the expert): each older episode's
   learned probe answers (:func:`older_probe_targets`) are asked again; one more than
   ``rem.retention_tolerance`` below the model before the sleep is rehearsed beside the
   new episode (:func:`repair_forgetting`, ``rem.repair_steps``), and past that the
   expert is scaled down (:func:`shrink_to_retain`, ``rem.retention_scales``).

:func:`run_rem` runs them all for one sleep and writes ``dreams.parquet`` (every dream,
why it was kept, its reward) and ``probes.parquet`` (the teacher's probe targets, and
whether the model gives each closed-book as the sleep leaves it: ``learned``).

Neither an episode's evaluation questions nor their answers (``Episode.probes``) are read
in this module: every probe, trial, revert check, retention check, repair and replayed
probe row comes from the model's own questions and the teacher's answers to them.

The dream writer is a separate PEFT LoRA adapter named ``"dream_writer"`` added to
``bank.model`` next to the expert slots. It is not one of the bank's slots, so
``ExpertBank`` never switches it on, never trains it, and never saves, exports or
merges it (``save``/``export_combined``/``deep_sleep`` only name expert slots;
``deep_sleep`` unloads it with the rest). It is saved on its own
(:meth:`DreamWriter.save`, PEFT safetensors) and re-attached to a new bank with
:meth:`DreamWriter.load`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import pyarrow as pa
import torch

from sleepray import lm
from sleepray.anchor import anchor_batch, anchor_loss, rehearses
from sleepray.dream_formats import FORMAT_CUES, dream_prompt
from sleepray.experts import replace_dir
from sleepray.prompts import QuestionWriter, model_question_writer
from sleepray.replay import Dream, ReplayBuffer, probe_dream, probe_row, write_table_atomic
from sleepray.sampling import sample_ids
from sleepray.world import Episode, qa_prompt

log = logging.getLogger(__name__)

__all__ = [
    "DREAMS_COLUMNS", "FORMAT_CUES", "WRITER_ADAPTER", "Dream", "DreamWriter", "ProbeTarget",
    "ReplayBuffer", "TrialResult", "dream_prompt", "probe_accuracy", "probe_loss", "restem_update",
    "run_rem", "run_trials", "sample_text", "score_dreams", "select", "select_indices",
    "teacher_probe_targets", "train_dreams", "write_dreams",
]

WRITER_ADAPTER = "dream_writer"
WRITER_META = "writer.json"

# dreams.parquet: the buffer's dream columns, then why each dream was kept and what its trial did
DREAMS_COLUMNS = ["episode_id", "format", "prompt", "text", "score", "trial_reward", "kept", "sleep_id",
                  "selected_by", "trial_metric", "probe_before", "probe_after", "trained"]
DREAMS_SCHEMA = pa.schema([
    ("episode_id", pa.string()), ("format", pa.string()), ("prompt", pa.string()), ("text", pa.string()),
    ("score", pa.float64()), ("trial_reward", pa.int8()), ("kept", pa.bool_()), ("sleep_id", pa.string()),
    ("selected_by", pa.string()), ("trial_metric", pa.string()), ("probe_before", pa.float64()),
    ("probe_after", pa.float64()), ("trained", pa.bool_()),
])
PROBES_SCHEMA = pa.schema([("episode_id", pa.string()), ("question", pa.string()),
                           ("teacher_answer", pa.string()), ("learned", pa.bool_())])


# ------------------------------------------------------------------ adapters

def _device(model) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _only_adapters(bank, names: Sequence[str]):
    """Exactly ``names`` switched on (no tensor trainable); the bank's state comes back on exit.

    ``bank.teacher_mode()`` switches everything off through ``disable_adapter()`` when no
    expert is on, which would also silence the random expert and the dream writer, so
    the frozen model plus extra adapters is set up here instead.
    """
    names = list(dict.fromkeys(names))
    grads = {id(p): p.requires_grad for p in bank.model.parameters()}
    try:
        if names:
            bank.model.base_model.set_adapter(names, inference_mode=True)
            yield
        else:
            with bank.model.disable_adapter():
                yield
    finally:
        bank._apply()
        for p in bank.model.parameters():
            p.requires_grad_(grads.get(id(p), False))


# ------------------------------------------------------------------ sampling

def sample_text(model, tok, prompts: list[str], max_new_tokens: int, temperature: float,
                seed: int) -> list[str]:
    """Sampled continuations of ``prompts`` (several lines: stops at EOS or the length only),
    seeded by ``seed`` without touching the global torch RNG state."""
    outs = sample_ids(model, tok, prompts, max_new_tokens, temperature, stop_at_newline=False, seed=seed)
    return [tok.decode(ids, skip_special_tokens=True).rstrip() for ids in outs]


def write_dreams(bank, tok, episode: Episode, rcfg, rng: random.Random,
                 writer: Optional["DreamWriter"] = None) -> list[Dream]:
    """``rcfg.dreams_per_episode`` dreams about ``episode``, formats taken in turn from ``rcfg.formats``.

    Sampled from the frozen model (on-experts only) with the episode in context, plus the
    random unused expert (``rcfg.random_expert``) and the dream writer when given.
    """
    formats = list(rcfg.formats)
    if not formats:
        raise ValueError("rem.formats is empty: no dream format to write")
    fmts = [formats[i % len(formats)] for i in range(rcfg.dreams_per_episode)]
    prompts = [dream_prompt(episode.context, f) for f in fmts]
    # drawn before the random expert takes its draws: the same rng gives the same sampling
    # noise with and without it, so only the expert changes the dreams
    seed = rng.randrange(2**31)
    extra = [writer.name] if writer is not None else []
    with contextlib.ExitStack() as stack:
        if rcfg.random_expert:
            if bank.free_slots:
                extra.append(stack.enter_context(
                    bank.random_free_slot_context(rng, rcfg.random_expert_scale)))
            else:
                log.warning("no free expert slot: dreaming without the random expert")
        stack.enter_context(_only_adapters(bank, list(bank.on) + extra))
        bank.model.eval()
        texts = sample_text(bank.model, tok, prompts, rcfg.max_new_tokens, rcfg.temperature, seed)
    return [Dream(episode.episode_id, f, p, t) for f, p, t in zip(fmts, prompts, texts)]


# ------------------------------------------------------------------ probes

@dataclass(frozen=True)
class ProbeTarget:
    """A probe question and the teacher's answer to it (with the episode in context)."""
    episode_id: str
    question: str
    target: str

    @property
    def prompt(self) -> str:
        return qa_prompt(self.question)

    @property
    def text(self) -> str:  # the pretraining format: "Q: ...\nA: answer\n"
        return f"{self.prompt} {self.target}\n"


def teacher_probe_targets(bank, tok, episode: Episode, n: int, question_writer: QuestionWriter,
                          max_new_tokens: int = 12) -> list[ProbeTarget]:
    """Up to ``n`` questions the model wrote about the episode (``question_writer``: the frozen
    model with the episode in context, :func:`sleepray.prompts.model_question_writer`),
    answered greedily by the teacher with the episode in context. The episode's own
    ``probes`` (evaluation data) are never read. Empty answers are dropped."""
    from sleepray.qa import generate_answers
    questions = list(dict.fromkeys(question_writer(episode.context, n)))[:n]
    if not questions:
        return []
    with bank.teacher_mode():
        answers = generate_answers(bank.model, tok, [qa_prompt(q, episode.context) for q in questions],
                                   max_new_tokens)
    return [ProbeTarget(episode.episode_id, q, a) for q, a in zip(questions, answers) if a.strip()]


def _mean_nll(model, tok, texts: list[str], prompts: Optional[list[str]] = None):
    nll, cnt = lm.token_nll(model, tok, texts, prompts)
    return nll.sum() / cnt.sum().clamp_min(1)


def probe_loss(bank, tok, targets: list[ProbeTarget]) -> float:
    """Closed-book per-token NLL of the teacher's answers (the student as the bank stands now)."""
    if not targets:
        return float("nan")
    with torch.no_grad():
        return float(_mean_nll(bank.model, tok, [t.text for t in targets], [t.prompt for t in targets]))


def probe_hits(bank, tok, targets: list[ProbeTarget], max_new_tokens: int = 12) -> list[bool]:
    """For each target: does the model give the teacher's answer closed-book (greedy, exact match)?"""
    from sleepray.qa import exact_match, generate_answers
    if not targets:
        return []
    answers = generate_answers(bank.model, tok, [t.prompt for t in targets], max_new_tokens)
    return [bool(exact_match(a, t.target)) for a, t in zip(answers, targets)]


def probe_accuracy(bank, tok, targets: list[ProbeTarget], max_new_tokens: int = 12) -> float:
    """Closed-book greedy exact match against the teacher's answers."""
    hits = probe_hits(bank, tok, targets, max_new_tokens)
    return sum(hits) / len(hits) if hits else float("nan")


def accuracy_by_episode(targets: list[ProbeTarget], hits: Sequence[bool]) -> dict[str, float]:
    """The fraction of each episode's targets that were hit."""
    out: dict[str, list[bool]] = {}
    for t, h in zip(targets, hits):
        out.setdefault(t.episode_id, []).append(bool(h))
    return {e: sum(v) / len(v) for e, v in out.items()}


def older_probe_targets(buffer: Optional[ReplayBuffer], episodes: Sequence[Episode], rcfg,
                        seed: int = 0) -> list[ProbeTarget]:
    """Up to ``rcfg.retention_probes`` probe answers about older episodes from the buffer (the
    teacher's, written by earlier sleeps): the retention check. Only those the model gave
    closed-book after their own sleep (what it had learned), spread evenly over the older
    episodes so that the first one is not outweighed as episodes pile up; random within each."""
    if buffer is None or rcfg.retention_probes <= 0:
        return []
    rng = random.Random(seed)
    pools: dict[str, list[ProbeTarget]] = {}
    for e, q, a in buffer.probe_answers([ep.episode_id for ep in episodes], learned_only=True):
        pools.setdefault(e, []).append(ProbeTarget(e, q, a))
    for pool in pools.values():
        rng.shuffle(pool)
    picked: list[ProbeTarget] = []
    while len(picked) < rcfg.retention_probes and any(pools.values()):
        for pool in pools.values():  # round robin over the episodes
            if pool and len(picked) < rcfg.retention_probes:
                picked.append(pool.pop())
    return picked


def shrink_to_retain(bank, tok, older: list[ProbeTarget], floors: dict[str, float], scales: Sequence[float],
                     accuracy: dict[str, float], max_new_tokens: int = 12) -> tuple[float, dict[str, float]]:
    """Scale the training expert's weight delta down, by each of ``scales`` in turn (largest
    first), until every older episode's accuracy on its probe answers is back to its floor
    (``floors``: episode -> accuracy); returns (the scale kept, the accuracies by episode).
    ``accuracy`` is the unscaled expert's; with every episode at its floor nothing changes.
    When no scale reaches it, the smallest one stays (0: this sleep leaves the model as it was)."""
    if not below_floor(floors, accuracy) or not scales:
        return 1.0, accuracy
    current = 1.0
    for s in sorted(set(scales), reverse=True):
        bank.scale_training(s / current)  # current > 0: 0, the smallest, comes last
        current = s
        accuracy = accuracy_by_episode(older, probe_hits(bank, tok, older, max_new_tokens))
        log.info("REM: new expert scaled by %.2f; older episodes below their floor: %s", s,
                 below_floor(floors, accuracy) or "none")
        if not below_floor(floors, accuracy):
            break
    return current, accuracy


def below_floor(floors: dict[str, float], accuracy: dict[str, float]) -> list[str]:
    """The episodes whose accuracy is below their floor."""
    return [e for e, f in floors.items() if accuracy.get(e, 1.0) < f]


def repair_forgetting(bank, tok, older: list[ProbeTarget], floors: dict[str, float],
                      accuracy: dict[str, float], own: list[ProbeTarget], buffer: ReplayBuffer, rcfg,
                      rng: random.Random, anchor_texts: Optional[list[str]] = None,
                      exclude_episodes: Sequence[str] = ()) -> tuple[dict[str, float], int]:
    """Rehearse what this sleep made the model forget, beside what it learned: up to
    ``rcfg.repair_rounds`` rounds of ``rcfg.repair_steps`` dream-SFT steps on the buffer's rows
    about each older episode below its floor together with this sleep's own probe answers, so
    that the expert has to tell the old facts from the new ones (the same questions about
    different people, in one batch) instead of writing the new over the old. Stops once no
    episode is below its floor; returns (the accuracies by episode, the rounds run)."""
    rounds = 0
    while rounds < rcfg.repair_rounds and (short := below_floor(floors, accuracy)):
        items = [d for d in buffer.dreams() if d.episode_id in short] + [probe_dream(t.episode_id, t.question, t.target) for t in own]
        train_dreams(bank, tok, items, rcfg.model_copy(update={"sft_steps": rcfg.repair_steps}), buffer, rng,
                     exclude_episodes=exclude_episodes, anchor_texts=anchor_texts)
        rounds += 1
        accuracy = accuracy_by_episode(older, probe_hits(bank, tok, older, rcfg.probe_max_new_tokens))
        log.info("REM: repair round %d on %s; older episodes below their floor: %s", rounds, short,
                 below_floor(floors, accuracy) or "none")
    return accuracy, rounds


def sft_made_worse(loss: tuple, accuracy: tuple, retention: tuple, tolerance: float = 0.0) -> bool:
    """The dream SFT's verdict from (before, after) pairs: probe loss rose, fewer of the
    teacher's answers came out, or the older episodes' accuracy fell by more than
    ``tolerance`` (None or NaN: not measured)."""
    def measured(pair):
        return all(v is not None and not math.isnan(v) for v in pair)
    return ((measured(loss) and loss[1] > loss[0]) or (measured(accuracy) and accuracy[1] < accuracy[0])
            or (measured(retention) and retention[1] < retention[0] - tolerance))


def _mean(values: Sequence) -> Optional[float]:
    return sum(values) / len(values) if values else None


def _probe_metric(bank, tok, targets, rcfg) -> float:
    if rcfg.trial_metric == "accuracy":
        return probe_accuracy(bank, tok, targets, rcfg.probe_max_new_tokens)
    return probe_loss(bank, tok, targets)


def _improved(before: float, after: float, metric: str) -> bool:
    if math.isnan(before) or math.isnan(after):
        return False
    return after > before if metric == "accuracy" else after < before


def _by_episode(targets: list[ProbeTarget]) -> dict[str, list[ProbeTarget]]:
    out: dict[str, list[ProbeTarget]] = {}
    for t in targets:
        out.setdefault(t.episode_id, []).append(t)
    return out


# ------------------------------------------------------------------ selection

def _flat_grad(loss, params) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                      for g, p in zip(grads, params)])


def score_dreams(bank, tok, dreams: list[Dream], probe_targets: list[ProbeTarget],
                 method: str = "grad_align") -> list[float]:
    """One score per dream from its SFT gradient on the training expert's parameters.

    "grad_align": cosine between the dream's gradient and the gradient of the closed-book
    probe loss of its episode (descending the dream's loss then lowers the probe loss to
    first order); "grad_norm": the dream gradient's norm.
    """
    if method not in ("grad_align", "grad_norm"):
        raise ValueError(f"unknown selection method {method!r}")
    params = bank.trainable_parameters()
    bank.model.eval()
    targets = _by_episode(probe_targets)
    probe_grads: dict[str, Optional[torch.Tensor]] = {}
    scores = []
    for d in dreams:
        if not d.sft_text.strip():
            scores.append(0.0)
            continue
        g = _flat_grad(_mean_nll(bank.model, tok, [d.sft_text]), params)
        if method == "grad_norm":
            scores.append(float(g.norm()))
            continue
        if d.episode_id not in probe_grads:
            ts = targets.get(d.episode_id, [])
            probe_grads[d.episode_id] = _flat_grad(
                _mean_nll(bank.model, tok, [t.text for t in ts], [t.prompt for t in ts]), params) if ts else None
            if not ts:
                log.warning("no probe targets for %s: its dreams score 0", d.episode_id)
        pg = probe_grads[d.episode_id]
        denom = float(g.norm()) * (float(pg.norm()) if pg is not None else 0.0)
        scores.append(float(g @ pg) / denom if denom > 0 else 0.0)
    return scores


def select_indices(scores: Sequence[float], k: int, b: int, rng: random.Random) -> list[int]:
    """Indices of the top ``k`` scores (ties: earlier first) then ``b`` random others."""
    key = [s if isinstance(s, (int, float)) and math.isfinite(s) else -math.inf for s in scores]
    order = sorted(range(len(key)), key=lambda i: (-key[i], i))
    top = order[: max(0, k)]
    rest = order[max(0, k):]
    return top + rng.sample(rest, min(max(0, b), len(rest)))


def select(dreams: list[Dream], scores: Sequence[float], k: int, b: int,
           rng: random.Random) -> list[Dream]:
    """The top ``k`` dreams by score plus ``b`` random others (distinct)."""
    if len(dreams) != len(scores):
        raise ValueError(f"{len(dreams)} dreams but {len(scores)} scores")
    return [dreams[i] for i in select_indices(scores, k, b, rng)]


# ------------------------------------------------------------------ trials

@dataclass
class TrialResult:
    reward: int
    before: float
    after: float
    metric: str


def _snapshot(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def _restore(params: list[torch.nn.Parameter], snapshot: list[torch.Tensor]) -> None:
    """Copy ``snapshot`` back into ``params`` exactly, and drop their gradients."""
    with torch.no_grad():
        for p, v in zip(params, snapshot):
            p.copy_(v)
            p.grad = None


def run_trials(bank, tok, kept: list[Dream], probe_targets: list[ProbeTarget], rcfg,
               seed: int = 0) -> list[TrialResult]:
    """Fine-tune an isolated copy of the training expert on each kept dream; reward 1 if the probes improve.

    The expert's tensors are snapshotted before each trial and copied back after it, so
    trials are independent and the expert is exactly as before when this returns.
    """
    params = bank.trainable_parameters()
    bank.model.eval()
    targets = _by_episode(probe_targets)
    before: dict[str, float] = {}
    results = []
    for i, d in enumerate(kept):
        ts = targets.get(d.episode_id, [])
        if d.episode_id not in before:
            before[d.episode_id] = _probe_metric(bank, tok, ts, rcfg)
        pre = before[d.episode_id]
        if not ts or not d.sft_text.strip():
            results.append(TrialResult(0, pre, float("nan"), rcfg.trial_metric))
            continue
        snapshot = _snapshot(params)
        try:
            lm.sft(params, bank.model, tok, [d.sft_text], rcfg.trial_steps, rcfg.trial_lr,
                   batch_size=1, seed=seed + i)
            post = _probe_metric(bank, tok, ts, rcfg)
        finally:
            _restore(params, snapshot)
        results.append(TrialResult(int(_improved(pre, post, rcfg.trial_metric)), pre, post,
                                   rcfg.trial_metric))
    return results


# ------------------------------------------------------------------ ReST-EM

class DreamWriter:
    """The dream writer: a LoRA adapter ``name`` on ``bank.model``, outside the expert slots.

    It is switched on only while dreams are written and while ReST-EM trains it; the bank
    never activates, trains, saves, exports or merges it (see the module docstring).
    """

    def __init__(self, bank, tok, rank: Optional[int] = None, name: str = WRITER_ADAPTER,
                 _lora_config=None):
        from sleepray.experts import _lora_config as expert_lora_config
        if name in bank.slots:
            raise ValueError(f"{name!r} is an expert slot name")
        if name in bank.model.peft_config:
            raise ValueError(f"bank.model already has an adapter named {name!r}")
        lcfg = _lora_config or expert_lora_config(
            bank.cfg.model_copy(update={"rank": int(rank or bank.cfg.rank)}))
        bank.model.add_adapter(name, lcfg)
        bank._apply()  # PEFT marks new adapters trainable: give the bank its own state back
        self.bank, self.tok, self.name = bank, tok, name
        self.updates = 0

    @classmethod
    def from_config(cls, bank, tok, rcfg) -> "DreamWriter":
        return cls(bank, tok, rank=rcfg.writer_rank)

    def parameters(self) -> list[torch.nn.Parameter]:
        return self.bank._slot_params(self.name)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.bank.model.named_parameters() if f".{self.name}." in n}

    def save(self, folder: Union[str, os.PathLike]) -> Path:
        """PEFT adapter (safetensors + adapter_config.json) and writer.json in ``folder``, swapped in atomically."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex}"
        try:
            self.bank.model.save_pretrained(str(tmp), selected_adapters=[self.name], safe_serialization=True)
            src = tmp / self.name  # PEFT nests non-"default" adapters in a subfolder
            for f in src.iterdir():
                os.replace(f, tmp / f.name)
            src.rmdir()
            (tmp / "README.md").unlink(missing_ok=True)
            (tmp / WRITER_META).write_text(json.dumps({"name": self.name, "updates": self.updates}, indent=2))
            replace_dir(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder

    @classmethod
    def load(cls, bank, tok, folder: Union[str, os.PathLike]) -> "DreamWriter":
        """Attach a writer saved by :meth:`save` to ``bank`` (safetensors only)."""
        from peft import LoraConfig
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        from sleepray.experts import ADAPTER_WEIGHTS, check_adapter_compatible
        folder = Path(folder)
        check_adapter_compatible(bank.model, folder)
        meta = json.loads((folder / WRITER_META).read_text()) if (folder / WRITER_META).is_file() else {}
        writer = cls(bank, tok, name=meta.get("name", WRITER_ADAPTER),
                     _lora_config=LoraConfig.from_pretrained(str(folder)))
        res = set_peft_model_state_dict(bank.model, load_file(str(folder / ADAPTER_WEIGHTS)),
                                        adapter_name=writer.name)
        unexpected = [k for k in getattr(res, "unexpected_keys", []) if "lora_" in k]
        if unexpected:
            raise ValueError(f"{folder}: tensors not in the model: {unexpected[:5]}")
        bank._apply()
        writer.updates = int(meta.get("updates", 0))
        return writer


def restem_update(writer: DreamWriter, rewarded: list[Dream], rcfg, seed: int = 0) -> list[float]:
    """ReST-EM M-step: SFT of the writer on (prompt -> dream) for the rewarded dreams (the E-step filter).

    The writer trains on top of the frozen model (on-experts), as it samples; nothing
    else trains. Returns the per-step losses ([] when there is nothing to do).
    """
    rewarded = [d for d in rewarded if d.text.strip()]
    if not rewarded or rcfg.restem_steps <= 0:
        return []
    bank = writer.bank
    params = writer.parameters()
    with _only_adapters(bank, list(bank.on) + [writer.name]):
        for p in params:
            p.requires_grad_(True)
        bank.model.eval()
        losses = lm.sft(params, bank.model, writer.tok, [d.prompt + d.text for d in rewarded],
                        rcfg.restem_steps, rcfg.restem_lr, batch_size=min(rcfg.batch_size, len(rewarded)),
                        seed=seed, prompts=[d.prompt for d in rewarded])
        for p in params:
            p.grad = None
    writer.updates += 1
    return losses


# ------------------------------------------------------------------ training

@torch.no_grad()
def dream_difficulty(bank, tok, dreams: list[Dream], batch_size: int = 8) -> list[float]:
    """The student's per-token loss on each dream's SFT text (the bank as it stands)."""
    out: list[float] = []
    for i in range(0, len(dreams), batch_size):
        nll, cnt = lm.token_nll(bank.model, tok, [d.sft_text for d in dreams[i: i + batch_size]])
        out += (nll / cnt.clamp_min(1)).tolist()
    return out


def _curriculum(difficulty: list[float], kind: str, rng: random.Random) -> list[int]:
    idx = list(range(len(difficulty)))
    if kind == "easy_to_hard":
        return sorted(idx, key=lambda i: (difficulty[i], i))
    if kind == "hard_to_easy":
        return sorted(idx, key=lambda i: (-difficulty[i], i))
    if kind == "random":
        rng.shuffle(idx)
        return idx
    raise ValueError(f"unknown curriculum {kind!r}")


def _n_replay(n_new: int, fraction: float, cap: int) -> int:
    if fraction <= 0:
        return 0
    if fraction >= 1:
        return cap
    return math.ceil(max(n_new, 1) * fraction / (1 - fraction))


def train_dreams(bank, tok, dreams: list[Dream], rcfg, buffer: Optional[ReplayBuffer] = None,
                 rng: Optional[random.Random] = None,
                 exclude_episodes: Optional[Sequence[str]] = None,
                 anchor_texts: Optional[list[str]] = None) -> dict:
    """SFT of the training expert on ``dreams`` plus replayed older dreams, in curriculum order.

    Replay: older dreams from ``buffer`` (none about ``exclude_episodes``, by default the
    episodes of ``dreams``) so that they make about ``rcfg.replay_fraction`` of the mix.
    Curriculum: each dream's difficulty is the student's loss on it before training;
    the ordered list is stretched over ``rcfg.sft_steps`` batches of ``rcfg.batch_size``.
    Drift control: ``rcfg.anchor_weight`` * KL(frozen || student) on ``rcfg.anchor_batch``
    of ``anchor_texts`` a step (``sleepray.anchor``), plus ``rcfg.anchor_replay`` of the
    buffer's dreams about older episodes: the SFT on older dreams alone did not keep
    them; the KL to the model before the sleep, which knows them, does.
    """
    rng = rng or random.Random(0)
    params = bank.trainable_parameters()
    new = [d for d in dreams if d.sft_text.strip()]
    replayed: list[Dream] = []
    rehearse: list[str] = []
    if rcfg.replay and buffer is not None:
        exclude = set(exclude_episodes) if exclude_episodes is not None else {d.episode_id for d in dreams}
        replayed = [d for d in buffer.sample(_n_replay(len(new), rcfg.replay_fraction, rcfg.buffer_size),
                                             exclude, rng) if d.sft_text.strip()]
        rehearse = buffer.texts(exclude) if rehearses(rcfg) else []
    items = new + replayed
    info = {"trained_dreams": len(new), "replayed": len(replayed), "rehearsal_texts": len(rehearse), "sft_steps": 0,
            "sft_loss_first": float("nan"), "sft_loss_last": float("nan")}
    if not items or rcfg.sft_steps <= 0:
        return info
    bank.model.eval()
    difficulty = dream_difficulty(bank, tok, items, rcfg.batch_size)
    order = _curriculum(difficulty, rcfg.curriculum, rng)
    n, steps, bs = len(items), rcfg.sft_steps, min(rcfg.batch_size, len(items))
    opt = torch.optim.AdamW(params, lr=rcfg.sft_lr, weight_decay=0.0)
    losses = []
    for s in range(steps):
        start = (s * n) // steps
        batch = [items[order[(start + j) % n]] for j in range(bs)]
        loss = _mean_nll(bank.model, tok, [d.sft_text for d in batch])
        loss = loss + anchor_loss(bank, tok, rcfg, anchor_batch(rcfg, anchor_texts, rehearse, rng))[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
    for p in params:
        p.grad = None
    info.update(sft_steps=steps, sft_loss_first=losses[0], sft_loss_last=losses[-1],
                difficulty_order=[difficulty[i] for i in order])
    return info


# ------------------------------------------------------------------ one REM phase

def run_rem(bank, tok, episodes: list[Episode], rcfg, out_dir: Union[str, os.PathLike],
            rng: Optional[random.Random] = None, buffer: Optional[ReplayBuffer] = None,
            writer: Optional[DreamWriter] = None, sleep_id: Optional[str] = None,
            question_writer: Optional[QuestionWriter] = None,
            anchor_texts: Optional[list[str]] = None) -> dict:
    """REM for one sleep on the bank's open expert; writes ``out_dir/dreams.parquet`` and
    ``out_dir/probes.parquet`` (and ``out_dir/dream_writer/`` when a writer is given).

    Returns metrics: dream/kept/rewarded counts, reward rate, closed-book probe loss vs
    the teacher's answers before and after the dream SFT, replay and SFT numbers, seconds.
    """
    if not rcfg.enabled:
        return {"enabled": False}
    if bank.training is None:
        raise RuntimeError("open a new expert (bank.open_new_expert()) before REM")
    if not episodes:
        raise ValueError("REM needs at least one episode")
    t0 = time.time()
    rng = rng or random.Random(0)
    out_dir = Path(out_dir)
    sleep_id = sleep_id or out_dir.name
    seed = rng.randrange(2**31)
    if question_writer is None:  # the frozen model writes the probe questions itself
        question_writer = model_question_writer(bank, tok, seed=seed)

    dreams: list[Dream] = []
    targets: list[ProbeTarget] = []
    for ep in episodes:
        dreams += write_dreams(bank, tok, ep, rcfg, rng, writer)
        targets += teacher_probe_targets(bank, tok, ep, rcfg.probes_per_episode, question_writer,
                                         rcfg.probe_max_new_tokens)
    t_write = time.time()
    scores = score_dreams(bank, tok, dreams, targets, rcfg.selection)

    selected_by: dict[int, str] = {}
    for ep in episodes:
        idx = [i for i, d in enumerate(dreams) if d.episode_id == ep.episode_id]
        picked = select_indices([scores[i] for i in idx], rcfg.keep_top_k, rcfg.keep_random, rng)
        for rank, j in enumerate(picked):
            selected_by[idx[j]] = "top_k" if rank < rcfg.keep_top_k else "random"
    kept_idx = sorted(selected_by)
    trials = dict(zip(kept_idx, run_trials(bank, tok, [dreams[i] for i in kept_idx], targets, rcfg, seed)))
    rewarded_idx = [i for i in kept_idx if trials[i].reward == 1]
    rewarded = [dreams[i] for i in rewarded_idx]

    restem_losses: list[float] = []
    if rcfg.restem and writer is not None:
        restem_losses = restem_update(writer, rewarded, rcfg, seed)

    checks = rcfg.revert_if_worse or rcfg.retention_scales or rcfg.repair_steps
    older = older_probe_targets(buffer, episodes, rcfg, seed) if checks else []
    n_tok = rcfg.probe_max_new_tokens
    before = probe_loss(bank, tok, targets)
    acc_before = probe_accuracy(bank, tok, targets, n_tok) if rcfg.revert_if_worse else None
    hits_before = probe_hits(bank, tok, older, n_tok)
    kept_before = _mean(hits_before)
    snapshot = _snapshot(bank.trainable_parameters())
    train_info = train_dreams(bank, tok, rewarded, rcfg, buffer, rng,
                              exclude_episodes=[e.episode_id for e in episodes], anchor_texts=anchor_texts)
    after = probe_loss(bank, tok, targets)
    acc_after = probe_accuracy(bank, tok, targets, n_tok) if rcfg.revert_if_worse else None
    hits_after = probe_hits(bank, tok, older, n_tok)
    kept_after = _mean(hits_after)
    # the whole dream SFT is a trial too: it must not leave the expert worse on the probes, by
    # their loss or by how many of the teacher's answers it gives closed-book, nor make it
    # forget what it answered about older episodes
    reverted = bool(rcfg.revert_if_worse and train_info["sft_steps"]
                    and sft_made_worse((before, after), (acc_before, acc_after), (kept_before, kept_after),
                                       rcfg.retention_tolerance))
    if reverted:
        log.info("REM: the dream SFT left the probes worse (loss %.3f -> %.3f, accuracy %.2f -> %.2f, older "
                 "episodes %s -> %s); the expert stays as NREM left it", before, after, acc_before, acc_after,
                 kept_before, kept_after)
        _restore(bank.trainable_parameters(), snapshot)
    trained = set(rewarded_idx) if train_info["sft_steps"] and not reverted else set()
    # the whole sleep (NREM and REM share the expert) must not make the model forget, episode by
    # episode, what it answered about older episodes before this sleep: what it forgot is
    # rehearsed beside the new (rem.repair_steps), and past that the expert is scaled down
    kept_sleep, worst_drop, scale, repairs = None, None, 1.0, 0
    kept_final = accuracy_by_episode(older, hits_before if reverted else hits_after)
    if older and (rcfg.retention_scales or rcfg.repair_steps):
        with bank.teacher_mode():  # the model before this sleep
            by_ep = accuracy_by_episode(older, probe_hits(bank, tok, older, n_tok))
        kept_sleep = _mean(list(by_ep.values()))
        floors = {e: a - rcfg.retention_tolerance for e, a in by_ep.items()}
        if rcfg.repair_steps:
            kept_final, repairs = repair_forgetting(bank, tok, older, floors, kept_final, targets, buffer, rcfg,
                                                    rng, anchor_texts, [e.episode_id for e in episodes])
        scale, kept_final = shrink_to_retain(bank, tok, older, floors, rcfg.retention_scales, kept_final, n_tok)
        worst_drop = max(by_ep[e] - kept_final[e] for e in by_ep)
    learned = probe_hits(bank, tok, targets, n_tok)  # this episode, closed-book, as the sleep leaves it

    rows = []
    for i, d in enumerate(dreams):
        tr = trials.get(i)
        rows.append({"episode_id": d.episode_id, "format": d.format, "prompt": d.prompt, "text": d.text,
                     "score": scores[i], "trial_reward": tr.reward if tr else None,
                     "kept": i in selected_by, "sleep_id": sleep_id,
                     "selected_by": selected_by.get(i, ""), "trial_metric": rcfg.trial_metric,
                     "probe_before": tr.before if tr else None,
                     "probe_after": tr.after if tr and not math.isnan(tr.after) else None,
                     "trained": i in trained})
    write_table_atomic(pa.Table.from_pylist(rows, schema=DREAMS_SCHEMA), out_dir / "dreams.parquet")
    write_table_atomic(pa.Table.from_pylist(
        [{"episode_id": t.episode_id, "question": t.question, "teacher_answer": t.target, "learned": h}
         for t, h in zip(targets, learned)], schema=PROBES_SCHEMA), out_dir / "probes.parquet")
    if buffer is not None:
        keep = [{c: rows[i][c] for c in ("episode_id", "format", "prompt", "text", "score",
                                         "trial_reward", "kept", "sleep_id")} for i in sorted(trained)]
        if rcfg.replay_probes:  # what the model answered with the memory in context, for rehearsal later
            keep += [probe_row(t.episode_id, t.question, t.target, sleep_id, h) for t, h in zip(targets, learned)]
        if keep:
            buffer.append(keep)
    if writer is not None:
        writer.save(out_dir / WRITER_ADAPTER)

    n_kept = len(kept_idx)
    return {
        "enabled": True, "dreams": len(dreams), "kept": n_kept, "rewarded": len(rewarded),
        "reward_rate": len(rewarded) / n_kept if n_kept else 0.0,
        "mean_score": sum(scores) / len(scores) if scores else float("nan"),
        "probe_targets": len(targets), "probe_loss_before": before, "probe_loss_after": after,
        "probe_accuracy_before": acc_before, "probe_accuracy_after": acc_after, "sft_reverted": reverted,
        "retention_probes": len(older), "retention_accuracy_before": kept_before,
        "retention_accuracy_after": kept_after, "retention_accuracy_before_sleep": kept_sleep,
        "expert_scale": scale, "retention_accuracy_final": _mean(list(kept_final.values())),
        "retention_worst_episode_drop": worst_drop, "repair_rounds": repairs, "probe_accuracy_final": _mean(learned),
        "restem_steps": len(restem_losses),
        "restem_loss_last": restem_losses[-1] if restem_losses else float("nan"),
        **{k: v for k, v in train_info.items() if k != "difficulty_order"},
        "buffer_size": len(buffer) if buffer is not None else 0,
        "seconds_writing": round(t_write - t0, 2), "seconds": round(time.time() - t0, 2),
    }
