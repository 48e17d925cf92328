"""Learner checkpoints round-trip exactly, without pickle, and refuse a mismatched expert."""
import pytest
import torch

from sleepray.train_state import load_train_state, save_train_state


def _setup(seed):
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    return params, torch.optim.AdamW(params, lr=0.1)


def _step(params, opt):
    loss = sum((p ** 2).sum() for p in params)
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_a_resumed_run_continues_exactly_like_an_uninterrupted_one(tmp_path):
    params, opt = _setup(0)
    _step(params, opt)
    save_train_state(tmp_path, params, opt, {"step": 1})
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))
    _step(params, opt)                                   # the uninterrupted run
    fresh, fresh_opt = _setup(1)                         # a new process, other values
    assert load_train_state(tmp_path, fresh, fresh_opt) == {"step": 1}
    _step(fresh, fresh_opt)                              # the resumed run
    for a, b in zip(params, fresh):
        assert torch.equal(a, b)


def test_a_checkpoint_of_another_shape_is_refused(tmp_path):
    params, opt = _setup(0)
    _step(params, opt)
    save_train_state(tmp_path, params, opt, {"step": 1})
    other = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match="shape"):
        load_train_state(tmp_path, other, torch.optim.AdamW(other))
