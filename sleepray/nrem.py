"""NREM: Knowledge Seeding (DESIGN.md section 1), in one process.

Teacher: the model before expansion (frozen on-experts), WITH the episode in context.
Student: the model after expansion (new expert on), WITHOUT it. Only the new expert trains.

    maximise (1 - alpha) E[r] - alpha E[D]

D: generalized JSD(beta) per token on sequences sampled from the student (fraction
lambda) or the teacher (1 - lambda); no gradient through sampling.
r: Learning to Imitate: a teacher sample cut at a random prefix and completed by the
student, rewarded gamma * r_sem + (1 - gamma) * r_abs, trained by policy gradient with
a group baseline and a clipped importance ratio.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from sleepray.anchor import AnchorBatch, anchor_batch, anchor_loss
from sleepray.losses import generalized_jsd
from sleepray.nrem_samplers import LocalSampler
from sleepray.prompts import ConsolidationPrompt
from sleepray.rewards import ExactJudge, clipped_pg_loss, group_advantages, lti_reward

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------ sampling

def _continuation_logits(model, tok, prompts: list[str], conts: list[list[int]]):
    """Logits predicting each continuation token: [B, L, V] and mask [B, L]."""
    rows = [tok.encode(p) for p in prompts]
    seqs = [r + c for r, c in zip(rows, conts)]
    n = max(len(s) for s in seqs)
    device = next(model.parameters()).device
    ids = torch.full((len(seqs), n), tok.pad_token_id, dtype=torch.long, device=device)
    attn = torch.zeros_like(ids)
    for i, s in enumerate(seqs):  # right padding keeps positions as in sampling without context
        ids[i, : len(s)] = torch.tensor(s, device=device)
        attn[i, : len(s)] = 1
    logits = model(input_ids=ids, attention_mask=attn).logits
    L = max(len(c) for c in conts)
    out = logits.new_zeros((len(seqs), L, logits.shape[-1]))
    mask = torch.zeros((len(seqs), L), dtype=torch.bool, device=device)
    for i, (r, c) in enumerate(zip(rows, conts)):
        out[i, : len(c)] = logits[i, len(r) - 1: len(r) - 1 + len(c)]
        mask[i, : len(c)] = True
    return out, mask


def _token_logprobs(logits, conts: list[list[int]]):
    L = logits.shape[1]
    target = torch.tensor([c + [0] * (L - len(c)) for c in conts], device=logits.device)
    return torch.log_softmax(logits.float(), -1).gather(-1, target[..., None])[..., 0]


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
        return EmbeddingJudge(ncfg.judge_threshold)
    from sleepray.rewards import ModelJudge

    class _FrozenModelJudge:  # the frozen model before expansion is asked
        def __init__(self):
            self.inner = ModelJudge(bank.model, tok)

        def same_meaning(self, a, b):
            with bank.teacher_mode():
                return self.inner.same_meaning(a, b)
    return _FrozenModelJudge()


def _old_logprobs(lp, old: list | None):
    """The sampling policy's log-probs (rollout's), or the current ones where not given."""
    out = lp.detach().clone()
    for i, row in enumerate(old or []):
        if row is not None:
            out[i, : len(row)] = torch.tensor(row, dtype=out.dtype, device=out.device)
    return out


def _lti_loss(student, tok, batch: list[ConsolidationPrompt], ncfg, rng: random.Random, judge, sampler):
    """Learning to Imitate: policy gradient on student completions of teacher-sample prefixes."""
    d = sampler.teacher([p.teacher_prompt for p in batch])
    G = ncfg.lti_group_size
    prompts, prefixes, refs = [], [], []
    for p, di in zip(batch, d):
        k = int(len(di) * rng.uniform(ncfg.prefix_min_frac, ncfg.prefix_max_frac))
        for _ in range(G):
            prompts.append(p.prompt)
            prefixes.append(di[:k])
            refs.append(tok.decode(di, skip_special_tokens=True).strip())
    comps, old = sampler.complete(prompts, prefixes)
    preds = [tok.decode(pre + c, skip_special_tokens=True).strip() for pre, c in zip(prefixes, comps)]
    rewards = torch.tensor(lti_reward(preds, refs, judge, ncfg.gamma, ncfg.z0)).view(len(batch), G)
    adv = group_advantages(rewards).view(-1)
    full_prompts = [p + tok.decode(pre) if pre else p for p, pre in zip(prompts, prefixes)]
    logits, mask = _continuation_logits(student, tok, full_prompts, comps)
    lp = _token_logprobs(logits, comps)
    loss = clipped_pg_loss(lp, _old_logprobs(lp, old), adv.to(lp.device), mask, ncfg.lti_clip)
    return loss, rewards.mean().item()


def gkd_loss(bank, tok, batch: list[ConsolidationPrompt], ncfg, rng: random.Random,
             sampler=None, student=None):
    """Generalized distillation on a lambda mix of student- and teacher-sampled sequences.

    ``student``: the module the gradient flows through (a DDP wrapper of ``bank.model``
    on a Ray Train worker); the teacher's logits come from ``bank.model`` in teacher mode.
    """
    sampler = sampler or LocalSampler(bank, tok, ncfg.max_new_tokens, ncfg.temperature)
    student = student if student is not None else bank.model
    from_student = [rng.random() < ncfg.lam for _ in batch]
    ys: list[list[int] | None] = [None] * len(batch)
    stu_idx = [i for i, s in enumerate(from_student) if s]
    tea_idx = [i for i, s in enumerate(from_student) if not s]
    if stu_idx:
        for i, y in zip(stu_idx, sampler.student([batch[i].prompt for i in stu_idx])):
            ys[i] = y
    if tea_idx:
        for i, y in zip(tea_idx, sampler.teacher([batch[i].teacher_prompt for i in tea_idx])):
            ys[i] = y
    with torch.no_grad(), bank.teacher_mode():
        t_logits, mask = _continuation_logits(bank.model, tok, [p.teacher_prompt for p in batch], ys)
    s_logits, _ = _continuation_logits(student, tok, [p.prompt for p in batch], ys)
    return generalized_jsd(s_logits, t_logits, ncfg.beta, mask=mask)


def nrem_loss(bank, tok, batch: list[ConsolidationPrompt], ncfg, rng: random.Random, sampler,
              judge=None, student=None, anchor: AnchorBatch | None = None) -> tuple[torch.Tensor, dict]:
    """The NREM objective on one batch: alpha * D - (1 - alpha) * PG surrogate (or D alone),
    plus the KL(frozen || student) anchor (``sleepray.anchor.anchor_loss``): drift control on
    unrelated text and rehearsal of older episodes' dreams."""
    student = student if student is not None else bank.model
    use_lti = ncfg.use_lti and ncfg.alpha < 1.0
    div = gkd_loss(bank, tok, batch, ncfg, rng, sampler, student)
    loss = ncfg.alpha * div if use_lti else div
    rec = {"divergence": div.item()}
    if use_lti:
        pg, reward = _lti_loss(student, tok, batch, ncfg, rng, judge, sampler)
        loss = loss + (1 - ncfg.alpha) * pg
        rec["reward"] = reward
    extra, anchor_rec = anchor_loss(bank, tok, ncfg, anchor, student)
    loss = loss + extra
    rec.update(anchor_rec)
    rec["loss"] = loss.item()
    return loss, rec


def make_optimizer(params, ncfg):
    return torch.optim.AdamW(params, lr=ncfg.lr, weight_decay=0.0)


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


def run_nrem(bank, tok, prompts: list[ConsolidationPrompt], ncfg, seed: int = 0,
             progress: bool = True, judge=None, sampler=None, anchor_texts: list[str] | None = None,
             replay_texts: list[str] | None = None, hooks: NREMHooks | None = None) -> NREMResult:
    """Train the bank's open expert on ``prompts``; returns the per-step history.

    ``anchor_texts`` (``nrem.anchor_batch`` a step) and ``replay_texts`` (older episodes'
    dreams, ``nrem.anchor_replay`` a step) make the anchor batch when ``nrem.anchor_weight`` > 0.
    ``hooks``: rank, gradient all-reduce, resume, sampler, per-step report (:class:`NREMHooks`).
    """
    if not prompts:
        raise ValueError("NREM needs at least one consolidation prompt (is the short-term memory empty?)")
    if bank.training is None:
        raise RuntimeError("open a new expert (bank.open_new_expert()) before NREM")
    hooks = hooks or NREMHooks()
    params = bank.trainable_parameters()
    opt = make_optimizer(params, ncfg)
    result = NREMResult(ncfg.steps, start=hooks.resume(params, opt))
    rng = random.Random(seed + 7919 * hooks.rank + result.start)
    torch.manual_seed(seed)
    if ncfg.use_lti and ncfg.alpha < 1.0 and judge is None:
        judge = make_judge(ncfg, bank, tok) if ncfg.gamma > 0 else None
    sampler = sampler or hooks.make_sampler(bank, tok, ncfg, result.start) \
        or LocalSampler(bank, tok, ncfg.max_new_tokens, ncfg.temperature)
    per_rank = max(1, ncfg.batch_size // hooks.world)
    bank.model.eval()  # no dropout; the LoRA weights still train
    bar = tqdm(range(result.start, ncfg.steps), desc="NREM", disable=not progress)
    for step in bar:
        batch = [rng.choice(prompts) for _ in range(per_rank)]
        anchor = anchor_batch(ncfg, anchor_texts, replay_texts, rng)
        loss, rec = nrem_loss(bank, tok, batch, ncfg, rng, sampler, judge, anchor=anchor)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        hooks.allreduce(params)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        result.history.append({"step": step + 1, **rec})
        hooks.after_step(step + 1, rec, params, opt)
        bar.set_postfix(D=f"{rec['divergence']:.3f}", r=f"{rec.get('reward', float('nan')):.2f}")
    return result
