"""nrem.decode=fused on a GPU: each decode step replayed from one CUDA graph (torch.compile
"reduce-overhead", repeated calls' guards skipped) draws the eager loop's tokens, call after call,
as the student and as the teacher, with the open expert's weights changed in place between calls
(as the optimizer does): a replay that read stale merged weights, or a cache of the last call,
would fail.

CUDA graphs need a GPU: CI has none, so this module is skipped there; the CPU tests run the same
blocks eager and traced (tests/test_fused_decode.py). It was run on the lent H200 (the closing
note of the learner issue gives the revision and the output).
"""
import pytest
import torch

from bank_helpers import bank_with_moved_experts
from sleepray.models import load_model
from sleepray.nrem_samplers import LocalSampler
from sleepray.tiny_models import build_tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")

PROMPTS = ["the old farmer walked to the market", "a sailor", "every quiet sailor found the map near", "the"]


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_graphed_fused_steps_draw_the_eager_tokens_as_the_expert_moves(family, tmp_path):
    torch.backends.cuda.matmul.allow_tf32 = False
    model, tok = load_model(str(build_tiny_model(family, tmp_path / "m")), "float32", "cpu")
    torch.manual_seed(0)
    bank = bank_with_moved_experts(model.to("cuda"))
    samplers = {loop: LocalSampler(bank, tok, 16, 1e-4, loop, fast_guards=True) for loop in ("own", "fused")}
    draws = []
    for i in range(4):        # compile and record, replay, replay, replay
        got = {}
        for loop, sampler in samplers.items():
            torch.manual_seed(i)
            got[loop] = (sampler.student(PROMPTS), sampler.teacher(PROMPTS[::-1]))
        assert got["fused"] == got["own"], i
        draws.append(got["own"][0])
        with torch.no_grad():   # an optimizer step's in-place update of the open expert
            for j, p in enumerate(bank.trainable_parameters()):
                p.add_(0.3 * torch.sin(torch.arange(p.numel(), device=p.device).view_as(p) + i + j))
    assert any(d != draws[0] for d in draws[1:])   # the expert's moves changed what it draws
