"""A helper of the learner's tests (tests/test_fused_losses.py, tests/test_compiled_blocks.py)."""
import torch

from sleepray.experts import ExpertBank
from sleepray.models import load_model


def moved_bank(path, cfg) -> ExpertBank:
    """A bank on the model at ``path`` with one frozen expert and an open one, both moved off zero
    (a fresh expert's B is 0: teacher and student would be equal and every gradient trivial)."""
    torch.manual_seed(0)
    bank = ExpertBank(load_model(path)[0], cfg.experts)
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
