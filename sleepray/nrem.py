"""NREM: Knowledge Seeding (DESIGN.md section 1), in one process.

Teacher: the model before expansion (frozen on-experts), WITH the episode in context.
Student: the model after expansion (new expert on), WITHOUT it. Only the new expert trains.

    maximise (1 - alpha) E[r] - alpha E[D]

D: generalized JSD(beta) per token on sequences sampled from the student (fraction
lambda) or the teacher (1 - lambda); no gradient through sampling.
r: Learning to Imitate: a teacher sample cut at a random prefix and completed by the
student, rewarded gamma * r_sem + (1 - gamma) * r_abs, trained by policy gradient with
a group baseline and a clipped importance ratio.

How a step runs (``NREMTrainer.step``; each choice has a config switch and a test that it
matches the plain path): the teacher's samples come from a pool drawn in one batched pass
before the first step (``nrem.teacher_samples``); every student sequence of the step --
GKD's samples and LTI's completions -- comes from one sampler call, and goes through one
forward pass; the teacher reads each episode's context once per run (``nrem.reuse_context_kv``);
the LM head and the losses are fused a chunk of positions at a time (``nrem.fused_loss``,
``sleepray.nrem_forward``). With ``nrem.sample_ahead`` k > 1 the sequences of k steps come
from one sampler call (a larger batch decodes in about the time of a small one), the
student's up to k - 1 optimizer steps old.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from sleepray.anchor import AnchorBatch, anchor_batch, anchor_loss
from sleepray.lm_forward import to_device
from sleepray.nrem_forward import Scorer, padded
from sleepray.nrem_samplers import LocalSampler, TeacherPool
from sleepray.prompts import ConsolidationPrompt
from sleepray.rewards import ExactJudge, clipped_pg_loss, group_advantages, lti_reward

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------ training

@dataclass
class NREMResult:
    steps: int
    history: list[dict] = field(default_factory=list)
    start: int = 0       # the step it resumed from

    @property
    def final(self) -> dict:
        tail = self.history[-10:]
        return {k: sum(h[k] for h in tail) / len(tail) for k in tail[0]} if tail else {}


def make_judge(ncfg, bank=None, tok=None):
    if ncfg.judge == "exact":
        return ExactJudge()
    if ncfg.judge == "embedding":
        from sleepray.rewards import EmbeddingJudge
        return EmbeddingJudge(ncfg.judge_threshold, dtype=ncfg.judge_dtype)
    from sleepray.rewards import ModelJudge

    class _FrozenModelJudge:  # the frozen model before expansion is asked
        def __init__(self):
            self.inner = ModelJudge(bank.model, tok)

        def same_meaning(self, a, b):
            with bank.teacher_mode():
                return self.inner.same_meaning(a, b)
    return _FrozenModelJudge()


def _old_logprobs(lp, old: list | None, non_blocking: bool = False):
    """The sampling policy's log-probs (rollout's), or the current ones where not given; they reach
    the device in one copy (``non_blocking``: without waiting, ``nrem.async_rows``)."""
    out = lp.detach()
    given = torch.zeros(out.shape, dtype=out.dtype)
    where = torch.zeros(out.shape, dtype=torch.bool)
    for i, row in enumerate(old or []):
        if row is not None:
            row = row[: out.shape[1]]
            given[i, : len(row)] = torch.tensor(row, dtype=out.dtype)
            where[i, : len(row)] = True
    if not where.any():
        return out.clone()
    return torch.where(to_device(where, out.device, non_blocking), to_device(given, out.device, non_blocking), out)


def _draw_samples(batch: list[ConsolidationPrompt], ncfg, rng: random.Random, sampler, use_lti: bool, tok):
    """One step's sequences: GKD's (a lambda mix of student and teacher samples) and LTI's
    (teacher samples cut at a random prefix, completed ``lti_group_size`` times by the
    student). The teacher's come from the sampler (a ``TeacherPool`` by default); every
    student sequence of the step comes from ONE sampler call."""
    from_student = [rng.random() < ncfg.lam for _ in batch]
    wanted = [p.teacher_prompt for p, s in zip(batch, from_student) if not s]
    n_tea = len(wanted)
    wanted += [p.teacher_prompt for p in batch] if use_lti else []
    drawn = sampler.teacher(wanted) if wanted else []
    tea, refs = iter(drawn[:n_tea]), drawn[n_tea:]
    lti_prompts, prefixes, ref_texts = [], [], []
    for p, d in zip(batch, refs):
        k = int(len(d) * rng.uniform(ncfg.prefix_min_frac, ncfg.prefix_max_frac))
        text = tok.decode(d, skip_special_tokens=True).strip()
        for _ in range(ncfg.lti_group_size):
            lti_prompts.append(p)
            prefixes.append(d[:k])
            ref_texts.append(text)
    stu = [p.prompt for p, s in zip(batch, from_student) if s]
    comps, old = sampler.complete(stu + [p.prompt for p in lti_prompts], [[]] * len(stu) + prefixes) \
        if stu or lti_prompts else ([], None)
    stu_ys = iter(comps[: len(stu)])
    ys = [next(stu_ys) if s else next(tea) for s in from_student]
    lti = (lti_prompts, prefixes, comps[len(stu):], (old or [None] * len(comps))[len(stu):], ref_texts)
    return ys, lti


def _lti_loss(scorer: Scorer, s_states, lti, ncfg, judge, batch_size: int, tok):
    """Learning to Imitate's clipped policy gradient on the student's completions of prefixes."""
    _, prefixes, comps, old, refs = lti
    preds = [tok.decode(pre + c, skip_special_tokens=True).strip() for pre, c in zip(prefixes, comps)]
    rewards = torch.tensor(lti_reward(preds, refs, judge, ncfg.gamma, ncfg.z0)).view(batch_size, -1)
    adv = group_advantages(rewards).view(-1)
    lp, mask = padded(scorer.token_logprobs(s_states, comps), [len(c) for c in comps])
    loss = clipped_pg_loss(lp, _old_logprobs(lp, old, scorer.async_rows), to_device(adv, lp.device, scorer.async_rows),
                           mask, ncfg.lti_clip)
    return loss, rewards.mean().item()


def _split_draws(ys: list, lti: tuple, rows: int, group: int) -> list[tuple[list, tuple]]:
    """One draw of ``_draw_samples`` over several steps' rows, cut back into each step's
    ``(ys, lti)`` (``rows`` GKD rows and ``rows * group`` LTI completions a step)."""
    out = []
    for a in range(0, len(ys), rows):
        b = a // rows * rows * group
        out.append((ys[a: a + rows], tuple(part[b: b + rows * group] for part in lti)))
    return out


def nrem_loss(bank, tok, batch: list[ConsolidationPrompt], ncfg, rng: random.Random, sampler,
              judge=None, anchor: AnchorBatch | None = None, scorer: Scorer | None = None,
              drawn: tuple | None = None) -> tuple[torch.Tensor, dict]:
    """The NREM objective on one batch: alpha * D - (1 - alpha) * PG surrogate (or D alone),
    plus the KL(frozen || student) anchor: drift control on unrelated text and rehearsal of
    older episodes' dreams (``sleepray.anchor``).

    D: generalized JSD between the student (no context) and the teacher (context) on the
    GKD sequences. The student's rows, GKD's and LTI's, go through ONE forward pass.
    ``drawn``: the batch's sequences drawn ahead (``_draw_samples``'s ``(ys, lti)``); by
    default they are drawn now. The record's losses are 0-d tensors (:func:`read_record` makes
    them numbers): reading one waits for the device, so a step reads them after its update."""
    scorer = scorer or Scorer(bank, tok, ncfg)
    use_lti = ncfg.lti_on
    ys, lti = drawn or _draw_samples(batch, ncfg, rng, sampler, use_lti, tok)
    lti_prompts, prefixes, comps = lti[:3]
    rows = [scorer.ids(p.prompt) for p in batch] + [scorer.ids(p.prompt) + pre
                                                     for p, pre in zip(lti_prompts, prefixes)]
    s_all = scorer.student(rows, ys + comps)
    n_gkd = sum(len(y) for y in ys)
    t = scorer.teacher([p.episode_id for p in batch], [scorer.ids(p.teacher_prompt) for p in batch], ys)
    div = scorer.jsd(s_all[:n_gkd], t, ncfg.beta)
    loss = ncfg.alpha * div if use_lti else div
    rec = {"divergence": div.detach(), "loss_tokens": n_gkd}
    if use_lti:
        pg, reward = _lti_loss(scorer, s_all[n_gkd:], lti, ncfg, judge, len(batch), tok)
        loss = loss + (1 - ncfg.alpha) * pg
        rec["reward"] = reward
    extra, anchor_rec = anchor_loss(bank, tok, ncfg, anchor, scorer=scorer)
    loss = loss + extra
    rec.update(anchor_rec)
    rec["loss"] = loss.detach()
    return loss, rec


def read_record(rec: dict) -> dict:
    """``rec`` with its tensors read as numbers (one read back from the device for all)."""
    keys = [k for k, v in rec.items() if isinstance(v, torch.Tensor)]
    if not keys:
        return dict(rec)
    values = torch.stack([rec[k].detach().reshape(()).double() for k in keys]).tolist()
    kinds = [float if rec[k].is_floating_point() else bool if rec[k].dtype == torch.bool else int for k in keys]
    return {**rec, **{k: kind(v) for k, v, kind in zip(keys, values, kinds)}}


def divergence(bank, tok, prompts: list[ConsolidationPrompt], ys: list[list[int]], ncfg) -> torch.Tensor:
    """GKD's divergence of the student from the teacher on given continuations (no sampling)."""
    scorer = Scorer(bank, tok, ncfg)
    s = scorer.student([scorer.ids(p.prompt) for p in prompts], ys)
    t = scorer.teacher([p.episode_id for p in prompts], [scorer.ids(p.teacher_prompt) for p in prompts], ys)
    return scorer.jsd(s, t, ncfg.beta)


def _by_episode(prompts: list[ConsolidationPrompt]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p in prompts:
        out.setdefault(p.episode_id, []).append(p.teacher_prompt)
    return out


def make_optimizer(params, ncfg):
    """AdamW over the open expert; ``nrem.fused_optimizer``: PyTorch's fused kernel (one launch for
    every tensor instead of a few per group: the LoRA layers are hundreds of small tensors)."""
    from sleepray.compiled_blocks import switched_on
    fused = bool(params) and switched_on(ncfg.fused_optimizer, params[0])
    return torch.optim.AdamW(params, lr=ncfg.lr, weight_decay=0.0, **({"fused": True} if fused else {}))


class NREMHooks:
    """What a data-parallel run adds to the one NREM loop; the defaults are one process.

    ``rank``/``world``: this worker among ``world``; each takes ``batch_size // world`` rows
    a step and the new expert's gradients are averaged over ``torch.distributed`` before
    every optimizer step (DDP's semantics by hand: one step runs two forward passes, GKD
    and LTI, before its backward, which the DDP wrapper does not allow). A runner such as
    Ray Train (``actors/learner.py``) overrides ``resume`` (a checkpoint's step),
    ``make_sampler`` (samples from generation engines) and ``after_step`` (report,
    checkpoint, publish a draft adapter to the engines).
    """

    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world = rank, world

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def allreduce(self, params: list) -> None:
        if self.world == 1:
            return
        import torch.distributed as dist
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        i = 0
        for p, g in zip(params, grads):
            p.grad = flat[i: i + g.numel()].view_as(p).clone()
            i += g.numel()

    def resume(self, params: list, opt) -> int:
        """The step to start from (0: a fresh run); restores ``params`` and ``opt`` if later."""
        return 0

    def make_sampler(self, bank, tok, ncfg, start: int):
        """NREM's sampler (None: ``LocalSampler``, the learner's own model)."""
        return None

    def after_step(self, done: int, metrics: dict, params: list, opt) -> None:
        """Called after optimizer step ``done`` (1-based)."""

    def summary(self) -> dict:
        """What the runner adds to NREM's metrics."""
        return {}


class NREMTrainer:
    """One NREM run's state and its step: the optimizer over the open expert, the sampler (with
    the teacher's pool drawn up front), the scorer (fused losses, the teacher's shared context),
    the judge and the run's random stream. ``run_nrem`` loops over :meth:`step`; the learner
    benchmark (``sleepray.learner_bench``) times the same step."""

    def __init__(self, bank, tok, prompts: list[ConsolidationPrompt], ncfg, seed: int = 0, judge=None,
                 sampler=None, anchor_texts: list[str] | None = None, replay_texts: list[str] | None = None,
                 hooks: NREMHooks | None = None):
        if not prompts:
            raise ValueError("NREM needs at least one consolidation prompt (is the short-term memory empty?)")
        if bank.training is None:
            raise RuntimeError("open a new expert (bank.open_new_expert()) before NREM")
        self.bank, self.tok, self.prompts, self.ncfg = bank, tok, prompts, ncfg
        self.anchor_texts, self.replay_texts = anchor_texts, replay_texts
        self.hooks = hooks = hooks or NREMHooks()
        self.params = bank.trainable_parameters()
        self.opt = make_optimizer(self.params, ncfg)
        self.start = hooks.resume(self.params, self.opt)
        self.done = self.start     # optimizer steps taken, a resumed run's included
        self.rng = random.Random(seed + 7919 * hooks.rank + self.start)
        torch.manual_seed(seed)
        if ncfg.lti_on and judge is None:
            judge = make_judge(ncfg, bank, tok) if ncfg.gamma > 0 else None
        self.judge = judge
        sampler = sampler or hooks.make_sampler(bank, tok, ncfg, self.start) \
            or LocalSampler.for_nrem(bank, tok, ncfg)
        bank.model.eval()  # no dropout; the LoRA weights still train
        if ncfg.teacher_samples and (ncfg.lam < 1 or ncfg.lti_on):
            sampler = TeacherPool(sampler, [p.teacher_prompt for p in prompts], ncfg.teacher_samples, self.rng)
        self.sampler = sampler
        self.per_rank = max(1, ncfg.batch_size // hooks.world)
        self.scorer = Scorer(bank, tok, ncfg, contexts=_by_episode(prompts), rows=self.per_rank)
        self._ahead: list[tuple[list, tuple]] = []    # (batch, drawn) of the next steps (nrem.sample_ahead)

    def _draw_ahead(self, batches: list[list[ConsolidationPrompt]]) -> None:
        """The sequences of ``len(batches)`` steps from ONE sampler call (``nrem.sample_ahead``).
        The student's samples of the later steps are then up to ``k - 1`` optimizer steps old,
        so LTI's importance ratio takes the log-probs of the student that drew them: the
        sampler's, or, where it gives none (the learner's own model), scored now."""
        use_lti = self.ncfg.lti_on
        flat = [p for b in batches for p in b]
        ys, lti = _draw_samples(flat, self.ncfg, self.rng, self.sampler, use_lti, self.tok)
        if use_lti and lti[2]:
            lti = lti[:3] + (self._drawn_logprobs(lti),) + lti[4:]
        group = self.ncfg.lti_group_size if use_lti else 0
        self._ahead = [(b, d) for b, d in zip(batches, _split_draws(ys, lti, self.per_rank, group))]

    @torch.no_grad()
    def _drawn_logprobs(self, lti: tuple) -> list:
        """Each LTI completion's token log-probs under the student now, where the sampler gave none."""
        prompts, prefixes, comps, old = lti[:4]
        if old and all(o is not None for o in old):
            return old
        rows = [self.scorer.ids(p.prompt) + pre for p, pre in zip(prompts, prefixes)]
        lp = self.scorer.token_logprobs(self.scorer.student(rows, comps), comps)
        mine = [part.tolist() for part in torch.split(lp.float(), [len(c) for c in comps])]
        return [o if o is not None else m for o, m in zip(old or [None] * len(comps), mine)]

    def step(self) -> dict:
        """One optimizer step on a fresh batch; its metrics."""
        k = max(1, min(self.ncfg.sample_ahead, self.ncfg.steps - self.done))   # none drawn past the run's end
        batches = [] if self._ahead else [[self.rng.choice(self.prompts) for _ in range(self.per_rank)]
                                          for _ in range(k)]
        anchor = anchor_batch(self.ncfg, self.anchor_texts, self.replay_texts, self.rng)
        if self.ncfg.sample_ahead == 1:
            batch, drawn = batches[0], None
        else:
            if not self._ahead:
                self._draw_ahead(batches)
            batch, drawn = self._ahead.pop(0)
        self.opt.zero_grad(set_to_none=True)    # before the passes: no gradient held into the next graphs
        self.scorer.begin_step()
        loss, rec = nrem_loss(self.bank, self.tok, batch, self.ncfg, self.rng, self.sampler, self.judge,
                              anchor=anchor, scorer=self.scorer, drawn=drawn)
        loss.backward()
        self.hooks.allreduce(self.params)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.done += 1
        return read_record(rec)


def run_nrem(bank, tok, prompts: list[ConsolidationPrompt], ncfg, seed: int = 0,
             progress: bool = True, judge=None, sampler=None, anchor_texts: list[str] | None = None,
             replay_texts: list[str] | None = None, hooks: NREMHooks | None = None) -> NREMResult:
    """Train the bank's open expert on ``prompts``; returns the per-step history.

    ``anchor_texts`` (``nrem.anchor_batch`` a step) and ``replay_texts`` (older episodes'
    dreams, ``nrem.anchor_replay`` a step) make the anchor batch when ``nrem.anchor_weight`` > 0.
    ``hooks``: rank, gradient all-reduce, resume, sampler, per-step report (:class:`NREMHooks`).
    """
    trainer = NREMTrainer(bank, tok, prompts, ncfg, seed, judge, sampler, anchor_texts, replay_texts, hooks)
    result = NREMResult(ncfg.steps, start=trainer.start)
    bar = tqdm(range(result.start, ncfg.steps), desc="NREM", disable=not progress)
    for step in bar:
        rec = trainer.step()
        result.history.append({"step": step + 1, **rec})
        trainer.hooks.after_step(step + 1, rec, trainer.params, trainer.opt)
        bar.set_postfix(D=f"{rec['divergence']:.3f}", r=f"{rec.get('reward', float('nan')):.2f}")
    return result
