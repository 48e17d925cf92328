"""The learner benchmark (``sleepray.learner_bench``): bare LoRA loop vs the NREM step, in one run.

    python -m jobs.bench learner [--shapes 0.6b,1.7b] [--batches 16,64] [--new-tokens 64]
        [--bare peft,tuned] [--modes alpha1,lti,anchor] [--device cuda] [--out FILE]
    python -m jobs.bench learner --cpu-default [--out docs/results/bench_learner_cpu.json]
    python -m jobs.bench learner --ray-workers 1,2 [--only-nrem] ...   (the NREM step on Ray Train too)
    python -m jobs.bench learner --decode-loops graph_fast ...   (one decode loop: one compile, not three)

Writes a JSON list of records, one per (shape, batch), with the fields the learner issue asks
for (``bare_tok_s``, ``bare_mfu_6n``, ``nrem_tok_s``, ``nrem_tok_s_nosample``, ``switch_ms``,
``loss_peak_gib_256x64``, ``decode_ms``, ``decode_floor_ms``) and every measurement behind
them, plus the revision, the command and the seeds; and a PNG beside it.
``--ray-workers 1,2``: the same NREM step (``--ray-mode``, alpha1 by default, with the same
overrides) also as a Ray Train run on each number of workers (``sleepray.learner_bench_ray``;
one GPU each, or one CPU), its ``ray_train_tok_s_<n>gpu`` beside the in-process step of that
mode and ``ray_train_overhead_pct``. ``--only-nrem``: no bare
loop, loss memory or decode measurement.
``--cpu-default``: the NREM step on ``seed:small`` with the default config, and one whole
default sleep of two episodes in this process (``nrem_step_s``, ``sleep_s``).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("jobs.bench_learner")


def _tokenizer():
    from sleepray.learner_bench import bench_tokenizer
    return bench_tokenizer()


def learner_records(args, save=lambda records: None) -> list[dict]:
    """Every (shape, batch): the NREM modes, loss memory and decode first for all of them, then the
    bare loops (liger-kernel patches transformers' classes process-wide once applied, and its
    Triton kernels do not compile inside the CUDA-graph decode step)."""
    import torch

    from sleepray import learner_bench as lb
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tok = _tokenizer()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    combos = [(shape, int(B)) for shape in args.shapes.split(",") for B in args.batches.split(",")]
    bare = [v for v in args.bare.split(",") if v and v != "none"] if not args.only_nrem else []
    workers = [] if args.only_bare else [int(n) for n in args.ray_workers.split(",") if n]
    if workers:
        if args.ray_poll_s is not None:
            os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(args.ray_poll_s)
        _ray_up(device)
    records = []
    for shape, B in combos:
        make = lambda: lb.build_model(shape, device, dtype, tok)   # noqa: E731
        rec = {"device": name, "shape": shape, "batch": B, "new_tokens": args.new_tokens, "dtype": str(dtype),
               "nrem": []}
        for mode in [] if args.only_bare else args.modes.split(","):
            log.info("%s B=%d: NREM %s", shape, B, mode)
            rec["nrem"].append(_safe(lb.bench_nrem, make(), tok, mode, B, args.new_tokens, device,
                                     args.warm, args.iters, extra=tuple(args.overrides), profile=args.profile))
            save(records + [_headline(rec)])      # a run cut later keeps the modes it finished
        if workers:
            from sleepray.learner_bench_ray import bench_nrem_ray
            rec["ray_train"] = []
            for n in workers:
                log.info("%s B=%d: NREM %s on Ray Train, %d workers", shape, B, args.ray_mode, n)
                rec["ray_train"].append(_safe(bench_nrem_ray, shape, B, args.new_tokens, n, device.type == "cuda",
                                              args.warm, args.iters, args.ray_mode, args.ray_cpus,
                                              tuple(args.overrides)))
        if not (args.only_nrem or args.only_bare):
            model = make()
            rec["loss_memory"] = _safe(lb.bench_loss_memory, model, device)
            rec["decode"] = _safe(lb.bench_decode, _with_expert(model), tok, B, args.new_tokens, device,
                                  loops=tuple(x for x in args.decode_loops.split(",") if x))
            del model
            lb.free(device)
        records.append(_headline(rec))
        save(records)                  # written after every record: a cut run keeps its part
    for rec in records if bare else []:
        shape, B = rec["shape"], rec["batch"]
        make = lambda: lb.build_model(shape, device, dtype, tok)   # noqa: E731
        log.info("%s B=%d: bare loop", shape, B)
        rec["bare"] = [_safe(lb.bench_bare, make, lb.BARE_VARIANTS[v], B, args.seq, device,
                             args.bare_warm or args.warm, args.bare_iters or args.iters) for v in bare]
        _headline(rec)
        save(records)
        log.info("%s", json.dumps({k: v for k, v in rec.items() if not isinstance(v, (list, dict))}))
    return records


def _ray_up(device) -> None:
    """A local Ray with this machine's GPUs, unless this process already joined one."""
    import ray
    import torch
    if not ray.is_initialized():
        ray.init(num_gpus=torch.cuda.device_count() if device.type == "cuda" else 0, include_dashboard=False)


def _with_expert(model):
    """The model inside an expert bank with one open expert: the student as NREM samples it."""
    from sleepray.config import ExpertConfig
    from sleepray.experts import ExpertBank
    bank = ExpertBank(model, ExpertConfig(rank=8, lora_alpha=16))
    bank.open_new_expert()
    return bank


def _safe(fn, *a, **k):
    try:
        return fn(*a, **k)
    except Exception as e:   # one failed measurement is recorded, the others still run
        log.exception("%s failed", fn.__name__)
        return {"error": repr(e)[:500]}


def _best(rows: list[dict], key: str):
    ok = [r for r in rows if isinstance(r, dict) and r.get(key) is not None]
    return max(ok, key=lambda r: r[key]) if ok else None


def _headline(rec: dict) -> dict:
    from sleepray.learner_bench_ray import headline
    bare = _best(rec.get("bare", []), "tok_s")
    # the NREM step alpha 1, the fastest of its variants (plain, compiled blocks, teacher graph) that ran,
    # every step sampling the student as it is; sample-ahead variants (older samples) apart
    modes = [r for r in rec["nrem"] if r.get("mode", "").startswith("alpha1")]
    alpha1 = _best([r for r in modes if r.get("sample_ahead", 1) == 1], "nrem_tok_s")
    ahead = _best([r for r in modes if r.get("sample_ahead", 1) > 1], "nrem_tok_s")
    rec.update(headline({r["mode"]: r for r in rec["nrem"] if "mode" in r}, rec.get("ray_train", [])))
    rec.update({
        "bare_variant": bare and bare["variant"], "bare_tok_s": bare and bare["tok_s"],
        "bare_mfu_6n": bare and bare["mfu_6n"],
        "nrem_mode": alpha1 and alpha1.get("mode"),
        "nrem_tok_s": alpha1 and alpha1.get("nrem_tok_s"),
        "nrem_tok_s_nosample": alpha1 and alpha1.get("nrem_tok_s_nosample"),
        "switch_ms": alpha1 and alpha1.get("switch_ms"),
        "loss_peak_gib_256x64": rec.get("loss_memory", {}).get("peak_gib"),
        "decode_ms": rec.get("decode", {}).get("decode_ms"),
        "decode_floor_ms": rec.get("decode", {}).get("decode_floor_ms")})
    if bare and alpha1 and alpha1.get("nrem_tok_s"):
        rec["nrem_over_bare"] = alpha1["nrem_tok_s"] / bare["tok_s"]
        rec["nrem_nosample_over_bare"] = alpha1["nrem_tok_s_nosample"] / bare["tok_s"]
    if ahead:
        rec.update({"nrem_ahead_mode": ahead["mode"], "nrem_ahead_k": ahead["sample_ahead"],
                    "nrem_tok_s_ahead": ahead["nrem_tok_s"]})
        if bare:
            rec["nrem_ahead_over_bare"] = ahead["nrem_tok_s"] / bare["tok_s"]
    return rec


def cpu_default_record(overrides: list[str]) -> dict:
    """NREM step time on seed:small with the default config, and one whole default sleep."""
    import random

    import torch

    from sleepray import nrem
    from sleepray import prompts as P
    from sleepray.banks import bank_from
    from sleepray.config import load_config
    from sleepray.memory import MemoryStore
    from sleepray.nrem_step import nrem_anchor
    from sleepray.sleep import sleep_full
    from sleepray.storage import Storage
    from sleepray.world import World
    root = Path(tempfile.mkdtemp(prefix="bench_learner_"))
    cfg = load_config(str(Path(__file__).parent.parent / "examples" / "default.yaml"),
                      [f"cycle.storage={root}", *overrides])
    episodes = World.from_config(cfg.world).episodes(cfg.world.n_episodes)
    store = Storage(root / "probe")
    bank, tok, _ = bank_from(cfg, store, store.starting_bank())
    writer = P.model_question_writer(bank, tok, cfg.nrem.temperature, seed=0)
    prompts = [p for e in episodes for p in P.consolidation_prompts(e, cfg.nrem.prompts_per_episode,
                                                                    random.Random(0), writer)]
    bank.open_new_expert()
    trainer = nrem.NREMTrainer(bank, tok, prompts, cfg.nrem, seed=0, anchor_texts=nrem_anchor(cfg))
    trainer.step()                                   # warm-up (the judge loads)
    steps = []
    for _ in range(10):
        t = time.perf_counter()
        trainer.step()
        steps.append(time.perf_counter() - t)
    MemoryStore(root / "memory").append(episodes)
    t = time.perf_counter()
    version = sleep_full(cfg, root, progress=False)
    sleep_s = time.perf_counter() - t
    steps.sort()
    return {"device": "cpu", "threads": torch.get_num_threads(), "model": cfg.model.path,
            "nrem_step_s": steps[len(steps) // 2], "nrem_step_s_all": steps, "nrem_steps": cfg.nrem.steps,
            "sleep_s": sleep_s, "episodes": len(episodes), "published": version is not None,
            "overrides": overrides}


def _plot(records: list[dict], png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [f"{r['shape']} B{r['batch']}" for r in records]
    xs = range(len(records))
    for i, (key, lab) in enumerate([("bare_tok_s", "bare LoRA loop (tuned)"),
                                    ("nrem_tok_s_nosample", "NREM, sampling excluded"),
                                    ("nrem_tok_s", "NREM, sampling included")]):
        ax.bar([x + 0.27 * (i - 1) for x in xs], [r.get(key) or 0 for r in records], 0.27, label=lab)
    ax.set_xticks(list(xs), labels)
    ax.set_yscale("log")
    ax.set_ylabel("tokens / s (NREM: loss tokens)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.bench learner", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="0.6b,1.7b", help="comma list: tiny, 0.6b, 1.7b, or model folders")
    ap.add_argument("--batches", default="16,64")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--seq", type=int, default=512, help="tokens per row of the bare loop")
    ap.add_argument("--bare", default="peft,tuned", help="bare-loop variants: peft, tuned (liger's fused linear "
                                                          "CE where installed), tuned_chunked, tuned_compile, "
                                                          "tuned_swiglu, tuned_fused (fused AdamW), tuned_swiglu_fused, "
                                                          "tuned_lora (experts.fused_lora's layers), tuned_lora_fused, "
                                                          "tuned_lora_ce8 (and liger's CE in 8x larger chunks)")
    ap.add_argument("--modes", default="alpha1,lti,anchor",
                    help="NREM modes: alpha1, alpha1_compiled (nrem.compile_blocks on), alpha1_graphs (and "
                         "nrem.teacher_graph), alpha1_fast (and nrem.compile_loss, merged_sampling, fast_guards), "
                         "alpha1_fast_math (and nrem.attention=math), ..._graphs (nrem.block_graphs), ..._async "
                         "(nrem.async_rows), ..._fused (nrem.decode=fused), ..._ahead4 (nrem.sample_ahead=4), lti, "
                         "anchor; every name in sleepray.learner_bench.NREM_MODES")
    ap.add_argument("--ray-workers", default="", help="comma list of Ray Train worker counts to run the NREM "
                                                      "step (--ray-mode) on too, one GPU (or CPU) each; e.g. 1,2")
    ap.add_argument("--ray-mode", default="alpha1", help="the NREM mode the Ray Train runs take (with the same "
                                                         "overrides); its overhead is taken against the in-process "
                                                         "run of that mode, so list it in --modes too")
    ap.add_argument("--ray-cpus", type=float, default=1, help="CPUs per Ray Train worker (the learner's default 1)")
    ap.add_argument("--ray-poll-s", type=float, default=None,
                    help="Ray Train's controller poll interval (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, default 2 s): a "
                         "worker's train.report waits for the last one to be polled, so a run that reports every step "
                         "takes at least this long a step; set before Ray starts")
    only = ap.add_mutually_exclusive_group()
    only.add_argument("--only-nrem", action="store_true", help="the NREM step alone: no bare loop, loss memory "
                                                               "or decode measurement")
    only.add_argument("--only-bare", action="store_true", help="the bare loops alone: no NREM step, loss memory "
                                                               "or decode measurement")
    ap.add_argument("--decode-loops", default="own,graph,graph_fast",
                    help="the decode benchmark's loops: own (eager), graph (CUDA graph), graph_fast (and the experts "
                         "merged, repeated guards skipped; what the alpha1_fast modes sample with), fused (nrem.decode="
                         "fused: Llama-shaped blocks with fused weights, CUDA graphs on a GPU, eager on a CPU); "
                         "graph and graph_fast only on a GPU; each graphed loop costs a compile")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="after the timed steps, this many more under torch.profiler: wall, kernel time, launches, "
                         "top kernels and host ops by phase, in each NREM record's 'profile'")
    ap.add_argument("--warm", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--bare-warm", type=int, default=None, help="the bare loops' warm-up steps (default --warm)")
    ap.add_argument("--bare-iters", type=int, default=None, help="the bare loops' timed steps (default --iters)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--cpu-default", action="store_true",
                    help="the default config's NREM step and whole sleep on seed:small, on this CPU")
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*", help="config overrides (section.key=value) of the NREM step, and of "
                                                 "the whole sleep with --cpu-default")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch

    from sleepray.provenance import provenance
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    from sleepray.learner_bench import NREM_MODES, check_decode_loops
    unknown = [m for m in [*args.modes.split(","), args.ray_mode] if m and m not in NREM_MODES]
    if unknown:
        ap.error(f"unknown NREM modes {unknown}; known: {', '.join(NREM_MODES)}")
    try:
        check_decode_loops([x for x in args.decode_loops.split(",") if x], args.device.startswith("cuda"))
    except ValueError as e:
        ap.error(f"--decode-loops: {e}")
    # seeds: model initialisation, NREM's stream and the world (world.seed 0) are all 0
    meta = provenance(seeds=[0], world_seeds=[0], argv=sys.argv if argv is None else ["bench", "learner", *argv])
    if args.cpu_default:
        out = Path(args.out or "docs/results/bench_learner_cpu.json")
        records = [{**cpu_default_record(args.overrides), **meta}]
    else:
        out = Path(args.out or f"docs/results/bench_learner_{args.device}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        records = [{**r, **meta} for r in learner_records(
            args, lambda rs: out.write_text(json.dumps([{**r, **meta} for r in rs], indent=1)))]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=1))
    if not args.cpu_default:
        try:
            _plot(records, out.with_suffix(".png"))
        except ImportError as e:     # a GPU box without matplotlib still gets its JSON
            log.warning("no plot: %s", e)
    print(json.dumps([{k: v for k, v in r.items() if not isinstance(v, (list, dict))} for r in records], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
