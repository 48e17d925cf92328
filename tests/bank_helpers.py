"""Helpers of the learner's tests (tests/test_fused_losses.py, tests/test_compiled_blocks.py, the GPU tests)."""
import torch

from sleepray.experts import ExpertBank
from sleepray.models import load_model


def moved_bank(path, cfg, dtype: str = "auto") -> ExpertBank:
    """A bank on the model at ``path`` with one frozen expert and an open one, both moved off zero
    (a fresh expert's B is 0: teacher and student would be equal and every gradient trivial)."""
    torch.manual_seed(0)
    bank = ExpertBank(load_model(path, dtype=dtype)[0], cfg.experts)
    frozen = bank.open_new_expert()
    with torch.no_grad():
        for p in bank.slot_parameters(frozen):
            p.add_(0.05 * torch.randn_like(p))
    bank.freeze_current()
    bank.open_new_expert()
    with torch.no_grad():
        for p in bank.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    return bank


def losses_and_grads(sc, tok, prompts, ys) -> tuple:
    """A scorer's divergence, the student's log-probs of ``ys``, the anchor KL and every LoRA
    gradient of their sum: what the learner's equivalence tests compare between two paths."""
    rows = [tok.encode(p.prompt) for p in prompts]
    s = sc.student(rows, ys)
    t = sc.teacher([p.episode_id for p in prompts], [tok.encode(p.teacher_prompt) for p in prompts], ys)
    div = sc.jsd(s, t, 0.5)
    lp = sc.token_logprobs(s, ys)
    kl = sc.anchor_kl(["Some text that has nothing to do with it.", "Another line."])
    (div + lp.mean() + kl).backward()
    return div.item(), lp.detach(), kl.item(), [p.grad.clone() for p in sc.bank.trainable_parameters()]


def assert_same_losses(a: tuple, b: tuple, tight: bool = True) -> None:
    """Two paths' ``losses_and_grads`` agree: within 1e-5 (``tight``, float32 on a CPU), or the
    looser bounds of float32 on a GPU (TF32 off, kernels that sum in another order)."""
    import pytest
    rel, lp_atol, g_atol, g_rtol = (1e-5, 1e-5, 1e-5, 1e-4) if tight else (1e-3, 1e-3, 1e-4, 1e-2)
    (d0, lp0, kl0, g0), (d1, lp1, kl1, g1) = a, b
    assert d1 == pytest.approx(d0, rel=rel, abs=rel / 10 if tight else 1e-5) and d0 > 0
    assert kl1 == pytest.approx(kl0, rel=rel, abs=rel / 10 if tight else 1e-5)
    assert torch.allclose(lp0, lp1, atol=lp_atol)
    for x, y in zip(g0, g1):
        assert torch.allclose(x, y, atol=g_atol, rtol=g_rtol)


def bank_with_moved_experts(model, rank: int = 4) -> ExpertBank:
    """A bank on ``model`` with a frozen expert and an open one, each B drawn N(0, 0.05) (the sampling
    loops' tests: an expert at zero would not show whether it was merged)."""
    from sleepray.config import ExpertConfig
    bank = ExpertBank(model, ExpertConfig(rank=rank, max_slots=3))
    for freeze in (True, False):
        slot = bank.open_new_expert()
        with torch.no_grad():
            for layer in bank._lora_layers():
                layer.lora_B[slot].weight.normal_(0, 0.05)
        if freeze:
            bank.freeze_current()
    return bank


def two_episode_rows(tok) -> tuple[list, list[list[int]]]:
    """The consolidation prompts of two episodes of a small world, and a short answer for each."""
    import random

    from sleepray.prompts import consolidation_prompts
    from sleepray.world import World
    prompts = [p for e in World(3, 1, 0, 0, 1).episodes(2) for p in consolidation_prompts(e, 6, random.Random(0))]
    return prompts, [tok.encode(f" answer {i}\n", add_special_tokens=False) for i in range(len(prompts))]


def moving_expert_steps(path, tok, prompts, ys, overrides: list[str], device: str = "cuda", steps: int = 4):
    """A float32 :func:`moved_bank` under config ``overrides`` on ``device`` (float32: differences
    between two paths are theirs, not bf16's) and its ``Scorer``; ``steps`` steps of
    :func:`losses_and_grads`, the open expert moved in place after each as an optimizer step
    would (the same in every run), so a path that read stale weights would differ.
    Returns (scorer, each step's losses and gradients)."""
    from sleepray.config import load_config
    from sleepray.nrem import _by_episode
    from sleepray.nrem_forward import Scorer
    cfg = load_config(None, [*overrides, "experts.max_slots=3"])
    bank = moved_bank(path, cfg, dtype="float32")
    bank.model.to(device)
    sc = Scorer(bank, tok, cfg.nrem, contexts=_by_episode(prompts))
    out = []
    for i in range(steps):
        sc.begin_step()
        bank.model.zero_grad(set_to_none=True)
        out.append(losses_and_grads(sc, tok, prompts, ys))
        with torch.no_grad():
            for j, p in enumerate(bank.trainable_parameters()):
                p.add_(0.02 * torch.sin(torch.arange(p.numel(), device=p.device).view_as(p) + i + j))
    return sc, out
