"""Learner: NREM and REM updates as Ray Train runs (``TorchTrainer``).

NREM runs data-parallel over ``ray.num_learner_workers`` workers (gloo on CPU, nccl on
GPU): every worker holds the base model and the expert bank, samples its share of each
batch from the RolloutWorkers, computes the NREM objective on its own model, and the
gradients of the new expert are all-reduced (averaged) before every optimizer step --
DDP's semantics, done by hand because one NREM step runs two forward passes (GKD and
LTI) before its backward pass, which the DDP wrapper does not allow. Rank 0 publishes a
draft adapter to the rollouts every ``ray.publish_every`` steps (the student's samples
are that fresh), and reports a checkpoint (safetensors, no pickle) every
``ray.checkpoint_every`` steps through ``ray.train.report``. A worker that dies is
replaced by Ray Train (``FailureConfig``) and the run goes on from the last checkpoint;
a driver (Coordinator) that dies and comes back re-creates the trainer with the same
name and storage, and Ray Train restores the run from its checkpoints.

REM runs on one Ray Train worker (dreams, selection, trials, ReST-EM, dream SFT).
"""
from __future__ import annotations

import json
import logging
import os
import random
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def _allreduce_mean(params, world: int) -> None:
    import torch
    import torch.distributed as dist
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    i = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[i: i + n].view_as(p).clone()
        i += n


def nrem_loop(config: dict) -> None:
    """``train_loop_per_worker`` of the NREM run."""
    import torch
    import torch.distributed as dist
    from ray import train

    from sleepray.config import Config
    from sleepray.cycle import SleepRecord, live_episodes, phase_seed
    from sleepray.nrem import NREMResult, make_judge, make_optimizer, nrem_loss
    from sleepray.nrem_samplers import AdapterRef, EngineSampler
    from sleepray.anchor import anchor_batch
    from sleepray.sleep_phases import bank_from, nrem_anchor, nrem_prompts, nrem_replay, starting_bank_dir
    from sleepray.train_state import load_train_state, save_train_state

    cfg = Config.model_validate(config["cfg"])
    ncfg = cfg.nrem
    storage, rec, pool = Path(config["storage"]), SleepRecord.read(Path(config["record"])), config["pool"]
    out = rec.dir / "nrem"
    ctx = train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed = phase_seed(cfg, rec, "nrem")
    torch.manual_seed(seed)                      # the same fresh expert on every rank
    bank, tok, _ = bank_from(cfg, storage, starting_bank_dir(cfg, storage))
    episodes = live_episodes(storage, rec)
    prompts = nrem_prompts(cfg, bank, tok, rec, episodes) if rank == 0 else None
    if world > 1:
        box = [prompts]
        dist.broadcast_object_list(box, src=0)
        prompts = box[0]
    slot = bank.open_new_expert()
    params = bank.trainable_parameters()
    opt = make_optimizer(params, ncfg)
    start = 0
    ckpt = train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            start = load_train_state(d, params, opt)["step"]
        log.info("NREM %s rank %d: resumed from the checkpoint at step %d", rec.sleep_id, rank, start)

    def draft(step: int) -> AdapterRef:
        name = f"{rec.sleep_id}-d{step:05d}"
        path = out / "drafts" / name
        if rank == 0:
            if not (path / "adapter_config.json").is_file():
                bank.export_combined(path, overwrite=True)
            pool.publish(name, str(path))
        if world > 1:
            dist.barrier()
        return AdapterRef(name, str(path))

    teacher = AdapterRef(**config["teacher"]) if config.get("teacher") else AdapterRef(None)
    sampler = EngineSampler(pool.generate, tok, ncfg.max_new_tokens, ncfg.temperature, teacher,
                            draft(start), seed=seed * 1000 + 100 * rank + start)
    judge = make_judge(ncfg, bank, tok) if ncfg.use_lti and ncfg.alpha < 1 and ncfg.gamma > 0 else None
    rng = random.Random(seed + 7919 * rank + start)
    per_rank = max(1, ncfg.batch_size // world)
    anchors = nrem_anchor(cfg) or []
    replay = nrem_replay(cfg, storage, episodes)
    history = NREMResult(ncfg.steps)
    bank.model.eval()
    for step in range(start, ncfg.steps):
        batch = [rng.choice(prompts) for _ in range(per_rank)]
        loss, m = nrem_loss(bank, tok, batch, ncfg, rng, sampler, judge,
                            anchor=anchor_batch(ncfg, anchors, replay, rng))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            _allreduce_mean(params, world)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        done = step + 1
        history.history.append({"step": done, **m})
        metrics = {**m, "step": done, "resumed_from": start}
        if done % cfg.ray.checkpoint_every == 0 or done == ncfg.steps:
            with tempfile.TemporaryDirectory() as tmp:
                cp = None
                if rank == 0:
                    save_train_state(tmp, params, opt, {"step": done, "sleep_id": rec.sleep_id})
                    cp = train.Checkpoint.from_directory(tmp)
                train.report(metrics, checkpoint=cp)
        else:
            train.report(metrics)
        if rank == 0:
            (out / "progress.json").write_text(json.dumps({"step": done, "pid": os.getpid(), **m}))
        if done % cfg.ray.publish_every == 0 and done < ncfg.steps:
            sampler.student_ref = draft(done)
    if rank == 0:
        bank.save(out / "bank")
        (out / "metrics.json").write_text(json.dumps({
            **history.final, "step": ncfg.steps, "prompts": len(prompts), "expert": slot,
            "resumed_from": start, "learner_workers": world, "rollout_workers": len(pool.workers)}))


def rem_loop(config: dict) -> None:
    """``train_loop_per_worker`` of the REM run (one worker)."""
    from sleepray.config import Config
    from sleepray.cycle import SleepRecord, live_episodes
    from sleepray.sleep_phases import bank_from, rem_in_process
    cfg = Config.model_validate(config["cfg"])
    storage, rec = Path(config["storage"]), SleepRecord.read(Path(config["record"]))
    bank, tok, _ = bank_from(cfg, storage, rec.dir / "nrem" / "bank")
    metrics = rem_in_process(cfg, storage, rec, bank, tok, live_episodes(storage, rec), rec.dir / "rem")
    (rec.dir / "rem" / "metrics.json").write_text(json.dumps(metrics))


def _fit(loop, cfg, storage: Path, name: str, config: dict, workers: int) -> None:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    trainer = TorchTrainer(
        loop, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker={"CPU": 1, **cfg.ray.learner_resources}),
        torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=str((storage / "ray_train").resolve()),
                             failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    trainer.fit()


def nrem_on_ray(cfg, storage: Path, rec, pool, teacher: dict | None) -> dict:
    out = rec.dir / "nrem"
    if not ((out / "bank" / "bank.json").is_file() and (out / "metrics.json").is_file()):
        out.mkdir(parents=True, exist_ok=True)
        _fit(nrem_loop, cfg, storage, f"{rec.sleep_id}-nrem",
             {"cfg": cfg.model_dump(mode="json"), "storage": str(storage), "record": str(rec.path),
              "pool": pool, "teacher": teacher}, cfg.ray.num_learner_workers)
    return json.loads((out / "metrics.json").read_text())


def rem_on_ray(cfg, storage: Path, rec) -> dict:
    out = rec.dir / "rem"
    if not ((out / "bank" / "bank.json").is_file() and (out / "metrics.json").is_file()):
        out.mkdir(parents=True, exist_ok=True)
        _fit(rem_loop, cfg, storage, f"{rec.sleep_id}-rem",
             {"cfg": cfg.model_dump(mode="json"), "storage": str(storage), "record": str(rec.path)}, 1)
    return json.loads((out / "metrics.json").read_text())
