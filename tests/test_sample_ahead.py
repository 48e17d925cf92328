"""``nrem.sample_ahead``: the sequences of k NREM steps from one sampler call."""
import random

import torch

from sleepray import nrem
from sleepray.config import load_config
from sleepray.experts import ExpertBank
from sleepray.models import load_model
from sleepray.nrem_samplers import LocalSampler
from sleepray.prompts import consolidation_prompts
from sleepray.world import World

QUICK = ["world.people_per_episode=1", "world.orgs_per_episode=0", "world.places_per_episode=0",
         "world.phrasings_per_fact=1", "nrem.judge=exact", "nrem.batch_size=2", "nrem.max_new_tokens=6",
         "nrem.lti_group_size=2", "nrem.alpha=0.5", "nrem.lam=1.0", "nrem.teacher_samples=2", "nrem.lr=0.05"]


def test_one_draw_is_cut_back_into_each_steps_rows():
    ys = [[i] for i in range(6)]                                   # 3 steps x 2 rows
    lti = tuple([f"{name}{j}" for j in range(12)] for name in "ABCDE")   # x 2 completions a row
    parts = nrem._split_draws(ys, lti, rows=2, group=2)
    assert [y for y, _ in parts] == [[[0], [1]], [[2], [3]], [[4], [5]]]
    assert [d[2] for _, d in parts] == [["C0", "C1", "C2", "C3"], ["C4", "C5", "C6", "C7"],
                                       ["C8", "C9", "C10", "C11"]]
    no_lti = nrem._split_draws(ys, ([],) * 5, rows=2, group=0)
    assert [d for _, d in no_lti] == [([],) * 5] * 3


class _Recording:
    """The learner's own sampler, each student call's size recorded."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def teacher(self, prompts):
        return self.inner.teacher(prompts)

    def student(self, prompts):
        return self.inner.student(prompts)

    def complete(self, prompts, prefixes):
        self.calls.append(len(prompts))
        return self.inner.complete(prompts, prefixes)


def _trainer(seed_test_model, k: int):
    torch.manual_seed(0)
    cfg = load_config(None, QUICK + [f"nrem.sample_ahead={k}"])
    model, tok = load_model(str(seed_test_model))
    bank = ExpertBank(model, cfg.experts)
    bank.open_new_expert()
    prompts = consolidation_prompts(World(10_000_777, 1, 0, 0, 1).episode(0), 8, random.Random(1))
    sampler = _Recording(LocalSampler(bank, tok, cfg.nrem.max_new_tokens, cfg.nrem.temperature))
    return nrem.NREMTrainer(bank, tok, prompts, cfg.nrem, seed=0, sampler=sampler), sampler


def test_k_steps_sample_once_and_later_steps_use_the_drawing_students_logprobs(seed_test_model):
    """With k=3, six steps make two sampler calls of three steps' student rows each. A step's
    LTI completions carry the log-probs of the student that drew them: the first step of a draw
    scores them as it is, and the later ones (after optimizer steps) differ from the student
    now -- the importance ratio sees the staleness."""
    trainer, sampler = _trainer(seed_test_model, 3)
    rows, group = trainer.per_rank, trainer.ncfg.lti_group_size
    seen = []
    orig = nrem.nrem_loss

    def spy(*a, drawn=None, **k):
        if drawn is not None:
            batch = a[2]
            _, prefixes, comps, old, _ = drawn[1]
            sc = trainer.scorer
            with torch.no_grad():
                rows_ = [sc.ids(p.prompt) + pre for p, pre in zip([p for p in batch for _ in range(group)], prefixes)]
                now = sc.token_logprobs(sc.student(rows_, comps), comps).float()
            drew = torch.tensor([x for o in old for x in o])
            seen.append((drawn, (drew - now).abs().max().item()))
        return orig(*a, drawn=drawn, **k)
    nrem.nrem_loss = spy
    try:
        recs = [trainer.step() for _ in range(6)]
    finally:
        nrem.nrem_loss = orig
    assert sampler.calls == [3 * rows * (1 + group)] * 2     # GKD's rows and LTI's completions, 3 steps a call
    assert len(seen) == 6 and all(len(d[0]) == rows and len(d[1][2]) == rows * group for d, _ in seen)
    gaps = [g for _, g in seen]
    assert gaps[0] < 1e-4 and gaps[3] < 1e-4, gaps              # drawn by the student as it is
    assert min(gaps[1], gaps[2], gaps[4], gaps[5]) > 1e-3, gaps  # drawn by the student of earlier steps
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)


def test_k_one_samples_every_step(seed_test_model):
    trainer, sampler = _trainer(seed_test_model, 1)
    for _ in range(3):
        trainer.step()
    assert sampler.calls == [trainer.per_rank * (1 + trainer.ncfg.lti_group_size)] * 3
    assert trainer._ahead == []


def test_no_group_is_drawn_past_the_runs_end(seed_test_model):
    """With 5 steps and k=3, the second draw is for the 2 steps left, not 3."""
    trainer, sampler = _trainer(seed_test_model, 3)
    trainer.ncfg = trainer.ncfg.model_copy(update={"steps": 5})
    for _ in range(5):
        trainer.step()
    per_step = trainer.per_rank * (1 + trainer.ncfg.lti_group_size)
    assert sampler.calls == [3 * per_step, 2 * per_step] and trainer._ahead == []


def test_the_drawing_policys_logprobs_stand_in_where_given_and_nowhere_else():
    """LTI's importance ratio: rows whose sampler gave log-probs take them (cut to the row's
    width), the others keep the current ones; one copy to the device, the input untouched."""
    lp = torch.arange(12, dtype=torch.float32).view(3, 4).requires_grad_()
    old = nrem._old_logprobs(lp, [[-1.0, -2.0], None, [-3.0, -4.0, -5.0, -6.0, -7.0]])
    assert old.tolist() == [[-1, -2, 2, 3], [4, 5, 6, 7], [-3, -4, -5, -6]]
    assert not old.requires_grad and lp[0, 0].item() == 0
    assert torch.equal(nrem._old_logprobs(lp, None), lp.detach()) and torch.equal(
        nrem._old_logprobs(lp, [None] * 3, non_blocking=True), lp.detach())


def test_a_steps_record_is_read_in_one_go_with_its_kinds_kept():
    rec = {"divergence": torch.tensor(0.25), "loss": torch.tensor(1.5, dtype=torch.bfloat16),
           "hits": torch.tensor(3), "ok": torch.tensor(True), "loss_tokens": 7}
    out = nrem.read_record(rec)
    assert out == {"divergence": 0.25, "loss": 1.5, "hits": 3, "ok": True, "loss_tokens": 7}
    assert [type(out[k]) for k in ("divergence", "hits", "ok")] == [float, int, bool]
