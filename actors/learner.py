"""Learner: the library's NREM and REM steps as Ray Train runs (``TorchTrainer``).

NREM: ``nrem_step`` data-parallel on ``ray.num_learner_workers`` with ``LearnerHooks`` (rank, all-reduce,
rollout samples and drafts, checkpoints reported here); REM: ``rem_step`` on one worker. A dead worker
resumes from the last checkpoint; a Coordinator that comes back re-creates the same trainer.
"""
import json
import os
from contextlib import contextmanager, nullcontext

from ray import train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from sleepray.config import Config
from sleepray.console import log_to_file
from sleepray.nrem_step import LearnerHooks, nrem_step
from sleepray.raycluster import train_env
from sleepray.rem_step import rem_step
from sleepray.sleep_record import SleepRecord
from sleepray.storage import Storage


@contextmanager
def _last_checkpoint():
    ckpt = train.get_checkpoint()
    with (ckpt.as_directory() if ckpt else nullcontext()) as d:
        yield d


def _report(metrics: dict, folder) -> None:
    train.report(metrics, checkpoint=train.Checkpoint.from_directory(folder) if folder else None)


def _step_loop(config: dict):
    """``train_loop_per_worker`` of both runs."""
    cfg, store = Config.model_validate(config["cfg"]), Storage(config["storage"])
    rec, ctx = SleepRecord.read(config["record"]), train.get_context()
    log_to_file(store.logs / f"learner-{rec.sleep_id}-{config['step']}-rank{ctx.get_world_rank()}.log")
    if config["step"] == "rem":
        return rem_step(cfg, store, rec, pool=config.get("pool"))
    hooks = LearnerHooks(cfg, rec, ctx.get_world_rank(), ctx.get_world_size(), config["pool"],
                         config["teacher"], _report, _last_checkpoint)
    nrem_step(cfg, store, rec, hooks, progress=False)


def fit_step(cfg, store: Storage, rec, step: str, workers: int, **extra) -> dict:
    """Step ``step`` ("nrem" or "rem") of sleep ``rec`` on ``workers`` Ray Train workers; its metrics."""
    out = rec.dir / step
    if not ((out / "bank" / "bank.json").is_file() and (out / "metrics.json").is_file()):
        os.environ.update(train_env(cfg.ray))     # Ray Train hands it on to its controller and workers
        TorchTrainer(
            _step_loop, train_loop_config={"cfg": cfg.model_dump(mode="json"), "storage": str(store.root),
                                           "record": str(rec.path), "step": step, **extra},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=cfg.ray.use_gpu,
                                         resources_per_worker={"CPU": 1, **cfg.ray.learner_resources}),
            torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
            run_config=RunConfig(name=f"{rec.sleep_id}-{step}", storage_path=str(store.ray_train.resolve()),
                                 failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2))).fit()
    return json.loads((out / "metrics.json").read_text())

