"""Learner checkpoints without pickle: the trainable tensors and AdamW state as safetensors.

    dir/params.safetensors     the training expert's tensors, in bank order ("p0", "p1", ...)
    dir/optimizer.safetensors  AdamW moments per parameter ("3.exp_avg", "3.exp_avg_sq", "3.step")
    dir/state.json             step, rng seed and anything else JSON can hold
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def save_train_state(folder: str | Path, params: list[torch.Tensor], opt: torch.optim.Optimizer,
                     state: dict) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({f"p{i}": p.detach().cpu().contiguous() for i, p in enumerate(params)},
              str(folder / "params.safetensors"))
    tensors = {}
    for i, s in opt.state_dict()["state"].items():
        for k, v in s.items():
            tensors[f"{i}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
    save_file(tensors, str(folder / "optimizer.safetensors"))
    (folder / "state.json").write_text(json.dumps(state, indent=2))
    return folder


def load_train_state(folder: str | Path, params: list[torch.Tensor], opt: torch.optim.Optimizer) -> dict:
    """Copy a saved state into ``params`` and ``opt`` (same shapes, same order); returns state.json."""
    folder = Path(folder)
    saved = load_file(str(folder / "params.safetensors"))
    if len(saved) != len(params):
        raise ValueError(f"checkpoint has {len(saved)} tensors, the expert has {len(params)}")
    with torch.no_grad():
        for i, p in enumerate(params):
            src = saved[f"p{i}"]
            if src.shape != p.shape:
                raise ValueError(f"checkpoint tensor p{i} has shape {tuple(src.shape)}, expected {tuple(p.shape)}")
            p.copy_(src.to(p.device, p.dtype))
    sd = opt.state_dict()
    per: dict[int, dict] = {}
    for key, v in load_file(str(folder / "optimizer.safetensors")).items():
        i, k = key.split(".", 1)
        per.setdefault(int(i), {})[k] = v.to(params[int(i)].device) if k != "step" else v
    sd["state"] = per
    opt.load_state_dict(sd)
    return json.loads((folder / "state.json").read_text())
