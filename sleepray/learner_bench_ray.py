"""The learner benchmark's NREM step under Ray Train, beside the in-process one.

The same step ``learner_bench.bench_nrem`` times in process (``nrem.NREMTrainer.step``), run by
a Ray Train ``TorchTrainer`` on ``workers`` workers as the project's learner runs it
(``actors/learner.py``): one worker a GPU (NCCL) or a CPU (gloo), ``B // workers`` rows each,
the new expert's gradients all-reduced every step by ``nrem.NREMHooks.allreduce`` (DDP's
semantics by hand, the learner's own), every rank calling ``ray.train.report`` after every
step as ``nrem_step.LearnerHooks`` does (no checkpoint in the timed steps). Ray Train 2.60's
report waits until the controller has polled the previous one (a queue of one, polled every
``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s by default): a step that reports takes at least
that long; ``ray_train_poll_s`` records the interval a run had. Each worker builds
the same model (``learner_bench.build_model``, seed 0) on its own device.

``tok_s`` of a run: the loss tokens of one step summed over the ranks (median per rank) over
the slowest rank's median step time; ``fit_s``: the whole ``TorchTrainer.fit`` (worker start,
process group, model build, warm-up and timed steps), the fixed cost a Ray Train NREM pays
once per sleep.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from sleepray.nrem import NREMHooks


class ReportingHooks(NREMHooks):
    """``nrem.NREMHooks`` of a rank whose ``after_step`` reports to Ray Train, as the learner's do."""

    def after_step(self, done, metrics, params, opt) -> None:
        from ray import train
        train.report({"step": done, "divergence": float(metrics["divergence"])})


def _worker_loop(config: dict) -> None:
    """``train_loop_per_worker``: this rank's ``bench_nrem``, gathered on every rank and reported."""
    import torch
    import torch.distributed as dist
    from ray import train

    from sleepray import learner_bench as lb
    ctx = train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if config["use_gpu"]:
        from ray.train.torch import get_device
        device = get_device()
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tok = lb.bench_tokenizer()
    model = lb.build_model(config["shape"], device, dtype, tok)
    rec = lb.bench_nrem(model, tok, config["mode"], config["batch"], config["new_tokens"], device,
                        config["warm"], config["iters"], extra=tuple(config["extra"]),
                        hooks=ReportingHooks(rank, world))
    rec["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    ranks = [rec]
    if world > 1:
        ranks = [None] * world
        dist.all_gather_object(ranks, rec)
    with tempfile.TemporaryDirectory() as folder:   # rank 0's records travel as a checkpoint (Ray Train
        ckpt = None                                 # keeps a run's metrics only with one)
        if rank == 0:
            (Path(folder) / "ranks.json").write_text(json.dumps(ranks))
            ckpt = train.Checkpoint.from_directory(folder)
        train.report({"step": config["warm"] + config["iters"], "done": 1}, checkpoint=ckpt)


def summarize(ranks: list[dict]) -> dict:
    """One run's figures from its ranks' ``bench_nrem`` records."""
    step = max(r["step_s"] for r in ranks)
    step_nosample = max(r["step_s"] - r["sampling_s"] for r in ranks)
    toks = sum(r["loss_tokens"] for r in ranks)
    return {"workers": len(ranks), "loss_tokens": toks, "step_s": step, "tok_s": toks / step,
            "tok_s_nosample": toks / max(1e-9, step_nosample), "sampling_s": max(r["sampling_s"] for r in ranks),
            "rows_per_rank": [r["rows"] for r in ranks], "threads": [r["threads"] for r in ranks],
            "devices": [r["device_name"] for r in ranks]}


def bench_nrem_ray(shape: str, B: int, new_tokens: int, workers: int, use_gpu: bool, warm: int, iters: int,
                   mode: str = "alpha1", cpus_per_worker: float = 1, extra: tuple[str, ...] = ()) -> dict:
    """``bench_nrem`` (mode ``mode``, config overrides ``extra``) on ``workers`` Ray Train workers
    (Ray must be initialised): the run's figures (:func:`summarize`), its ``fit_s`` and each rank's
    record under ``ranks``."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    with tempfile.TemporaryDirectory(prefix="bench_nrem_ray_") as storage:
        trainer = TorchTrainer(
            _worker_loop,
            train_loop_config={"shape": shape, "batch": B, "new_tokens": new_tokens, "mode": mode,
                               "warm": warm, "iters": iters, "use_gpu": use_gpu, "extra": list(extra)},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": cpus_per_worker}),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            run_config=RunConfig(name=f"bench-nrem-{shape}-b{B}-w{workers}", storage_path=storage))
        t = time.perf_counter()
        result = trainer.fit()
        fit_s = time.perf_counter() - t
        with result.checkpoint.as_directory() as folder:
            ranks = json.loads((Path(folder) / "ranks.json").read_text())
    return {**summarize(ranks), "mode": mode, "overrides": list(extra), "B": B, "new_tokens": new_tokens, "use_gpu": use_gpu,
            "backend": "nccl" if use_gpu else "gloo", "cpus_per_worker": cpus_per_worker, "fit_s": fit_s,
            "ray_train_poll_s": float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0)),
            "ranks": ranks}


def headline(inproc: dict[str, dict], runs: list[dict]) -> dict:
    """The record's Ray Train fields: ``ray_train_mode``, ``ray_train_tok_s_<n>gpu`` (or ``cpu``)
    per run, and the 1-worker run's overhead over the in-process step of the same mode
    (``inproc``: the in-process records by mode) in percent (``inproc / ray - 1``; sampling
    included, and excluded under ``_nosample``)."""
    out = {}
    for r in runs:
        if "tok_s" not in r:
            continue
        kind = "gpu" if r["use_gpu"] else "cpu"
        out["ray_train_mode"] = r["mode"]
        out[f"ray_train_tok_s_{r['workers']}{kind}"] = r["tok_s"]
        out[f"ray_train_tok_s_nosample_{r['workers']}{kind}"] = r["tok_s_nosample"]
        same = inproc.get(r["mode"])
        if r["workers"] == 1 and same and same.get("nrem_tok_s"):
            out["ray_train_inproc_tok_s"] = same["nrem_tok_s"]
            out["ray_train_overhead_pct"] = (same["nrem_tok_s"] / r["tok_s"] - 1) * 100
            out["ray_train_overhead_pct_nosample"] = (same["nrem_tok_s_nosample"] / r["tok_s_nosample"] - 1) * 100
    return out
