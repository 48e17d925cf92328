"""nrem.merged_sampling: with the active experts merged into copies of the adapted weights and
LoRA off, the model gives the LoRA path's logits (float32, within 1e-5) as the student and as the
teacher; the sampler draws the same tokens; on exit every weight, adapter switch and grad flag
is the bank's again."""
import random

import pytest
import torch
from torch import nn

from bank_helpers import moved_bank
from sleepray.config import load_config
from sleepray.merged_sampling import MergedWeights
from sleepray.models import load_model
from sleepray.nrem_samplers import LocalSampler
from sleepray.prompts import consolidation_prompts
from sleepray.world import World


@pytest.fixture(scope="module")
def bank_tok(seed_test_model):
    return moved_bank(str(seed_test_model), load_config(None, [])), load_model(str(seed_test_model))[1]


def _state(bank):
    return ([id(m.base_layer.weight) for m in bank._lora_layers()],
            [list(m.active_adapters) for m in bank._lora_layers()],
            {id(p) for p in bank.model.parameters() if p.requires_grad})


def test_merged_weights_give_the_lora_logits_and_put_everything_back(bank_tok):
    bank, tok = bank_tok
    merged = MergedWeights(bank)
    x = torch.tensor([tok.encode("Q: Where does the person live?\nA: In the")])
    before = _state(bank)
    weights = [m.base_layer.weight.detach().clone() for m in bank._lora_layers()]
    with torch.no_grad():
        student = bank.model(input_ids=x).logits
        with bank.teacher_mode():
            teacher = bank.model(input_ids=x).logits
            with merged.on():
                teacher_merged = bank.model(input_ids=x).logits
                assert all(not m.active_adapters for m in bank._lora_layers())   # LoRA off inside
            assert torch.allclose(bank.model(input_ids=x).logits, teacher)      # teacher mode back
        for _ in range(2):                     # the buffers are reused: the second merge is fresh
            with merged.on():
                student_merged = bank.model(input_ids=x).logits
    assert not torch.allclose(student, teacher, atol=1e-3)   # the experts matter here
    assert torch.allclose(student_merged, student, atol=1e-5, rtol=1e-5)
    assert torch.allclose(teacher_merged, teacher, atol=1e-5, rtol=1e-5)
    assert _state(bank) == before
    assert all(torch.equal(w, m.base_layer.weight) for w, m in zip(weights, bank._lora_layers()))


def test_the_sampler_draws_the_same_tokens_merged(bank_tok):
    bank, tok = bank_tok
    prompts = [p for e in World(3, 1, 0, 0, 1).episodes(1) for p in consolidation_prompts(e, 4, random.Random(0))]
    out = {}
    for merged in (False, True):
        sampler = LocalSampler(bank, tok, 12, 1.0, "own", merged=merged)
        torch.manual_seed(3)
        stu = sampler.student([p.prompt for p in prompts])
        tea = sampler.teacher([p.teacher_prompt for p in prompts])
        out[merged] = (stu, tea)
    assert out[True] == out[False] and any(len(y) > 1 for y in out[True][0])


def test_layers_it_cannot_merge_are_refused_up_front():
    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.base_layer = nn.Conv2d(2, 2, 1)

        def get_delta_weight(self, name):
            raise AssertionError("never merged")

    class Bank:
        def _lora_layers(self):
            return [Layer()]
    with pytest.raises(ValueError, match="Conv2d"):
        MergedWeights(Bank())
