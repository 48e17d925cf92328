"""The `sleepray` command.

Every subcommand takes ``--config FILE`` and dotted overrides (``nrem.beta=0.3``)
where it uses the config, and has its own ``--help``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from sleepray.config import ConfigError, dump_config, load_config

log = logging.getLogger("sleepray")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file (see examples/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. world.n_episodes=2 nrem.beta=0.3")


def _cfg(args):
    return load_config(args.config, args.overrides)


def cmd_config(args) -> int:
    print(dump_config(_cfg(args)), end="")
    return 0


def cmd_world(args) -> int:
    from sleepray.stream import episodes_from_config
    cfg = _cfg(args)
    for ep in episodes_from_config(cfg.world, args.episodes):
        if args.jsonl:
            print(json.dumps({"episode_id": ep.episode_id, "documents": ep.documents,
                              "probes": [p.__dict__ for p in ep.probes]}))
            continue
        print(f"=== episode {ep.episode_id}: {len(ep.documents)} documents, {len(ep.probes)} probes")
        print(ep.context)
        for p in ep.probes[: args.show_probes]:
            print(f"  Q: {p.question}  ->  {p.answer}")
    return 0


def cmd_seed(args) -> int:
    from sleepray.seed import build_seed, seed_path
    if args.out:
        report = build_seed(args.profile, args.out, steps=args.steps, seed=args.seed, device=args.device)
    else:
        if args.steps is not None:
            raise ConfigError("--steps needs --out: the cached seed model always uses the profile's steps")
        path = seed_path(args.profile)
        report = json.loads((path / "seed_report.json").read_text())
        report["path"] = str(path)
    keys = ["profile", "path", "parameters", "steps", "build_seconds", "in_context_accuracy",
            "closed_book_accuracy", "chance_accuracy", "n_probes"]
    print(json.dumps({k: report[k] for k in keys if k in report}, indent=2))
    return 0


def cmd_memory(args) -> int:
    from sleepray.memory import MemoryStore
    from sleepray.storage import Storage
    cfg = _cfg(args)
    store = MemoryStore(Storage(cfg.cycle.storage).memory)
    if args.action == "add":
        from sleepray.stream import episodes_from_config
        eps = episodes_from_config(cfg.world, args.episodes)
        receipt = store.append(eps)
        print(f"appended {len(receipt.episode_ids)} episodes to {store.root} (segment {receipt.segment})")
    else:
        rows = store.episodes("all")
        for r in rows:
            print(f"{r['episode_id']:<16} {store.status_of(r['episode_id']):<13} {r['n_tokens']:>6} tokens")
        print(json.dumps(store.pressure()))
    return 0


def cmd_sleep(args) -> int:
    from sleepray.sleep import sleep_full, sleep_nrem
    cfg = _cfg(args)
    out = sleep_nrem(cfg) if args.phase == "nrem" else sleep_full(cfg)
    print(f"new adapter version: {out}" if out else "nothing to consolidate")
    return 0


def cmd_cycle(args) -> int:
    from jobs.cycle import main as cycle_main
    return cycle_main(([] if args.config is None else ["--config", args.config])
                      + (["--out", args.out] if args.out else []) + ["--trigger", args.trigger]
                      + (["--verbose"] if args.verbose else []) + args.overrides)


def cmd_bench(args) -> int:
    from jobs.bench import main as bench_main
    return bench_main((["--config", args.config] if args.config else [])
                      + ["--out", args.out, "--only", args.only] + args.overrides)


def cmd_run(args) -> int:
    from jobs.run import run_default
    return run_default(_cfg(args), episodes=args.episodes, sleep=not args.no_sleep, verbose=args.verbose,
                       log_level=args.log_level)


def cmd_serve(args) -> int:
    from actors.serve import run_serve
    from sleepray.raycluster import connect
    cfg = _cfg(args)
    connect(cfg.ray)
    print(f"serving on http://{cfg.serve.host}:{cfg.serve.port}/v1 (Ctrl-C stops)", flush=True)
    run_serve(cfg, blocking=True)
    return 0


def cmd_keys(args) -> int:
    from sleepray.tenants import add_key, load_keys
    if args.action == "add":
        if (args.tenant is None) == (not args.admin):
            raise ValueError("give --tenant NAME, or --admin for an admin key")
        key = add_key(args.file, args.tenant, admin=args.admin)
        who = "an admin key" if args.admin else f"a key of tenant {args.tenant!r}"
        print(f"{key}\n\n{who}: shown once, only its SHA-256 is in {args.file} (serve.tenants_file)",
              flush=True)
        return 0
    for h, p in sorted(load_keys(args.file).items(), key=lambda kv: (kv[1].tenant or "", kv[0])):
        print(f"{p.tenant or '(admin)':20s} {'admin ' if p.admin else ''}sha256:{h[:12]}..."
              + (f" rate_limit_rps={p.rate_limit_rps}" if p.rate_limit_rps is not None else ""))
    return 0


def cmd_eval(args) -> int:
    from sleepray.eval_report import methods_table
    from sleepray.eval_run import run_and_report
    if args.merge:
        from sleepray.eval_merge import merge_dirs
        results = merge_dirs(args.merge, args.out)
        print(methods_table(results))
        print(f"{args.out}: merged {len(args.merge)} evaluations: results.json, answers.parquet, report.md, plots/")
        return 0
    cfg = _cfg(args)
    results = run_and_report(cfg, args.out, progress=not args.no_progress)
    print(methods_table(results))
    print(f"{args.out}: results.json, answers.parquet, report.md, plots/ "
          f"({results['wall_seconds'] / 60:.1f} min)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sleepray",
        description="Language models that sleep: serve awake, consolidate memories into weights asleep.")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the main job on the embedded default (local, seed model, CPU)",
                       description="Build (once) the seed model; show what it knows about the configured "
                                   "world in context and closed-book; run the cycle job (episodes arrive, "
                                   "the Coordinator sleeps: NREM, REM, publish) on a local Ray that this "
                                   "command starts; show the closed-book answers after the sleeps.")
    _add_config_args(p)
    p.add_argument("--episodes", type=int, default=None, help="episodes to use (default: world.n_episodes)")
    p.add_argument("--no-sleep", action="store_true", help="only show the answers before any sleep")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="also print the driver's INFO logs and every Ray worker's output (Ray Train's per-step "
                        "reports and checkpoints, vLLM) on the console; without it they go to <run>/logs only")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("seed", help="build the seed model (tokenizer + small Llama, pretrained)",
                       description="Train the tokenizer and pretrain the seed model. With no --out: the "
                                   "model shipped in sleepray/seed_models/ when it matches the recipe, else "
                                   "a build cached per machine. With --out: a fresh build (to ship a rebuilt "
                                   "model, build into sleepray/seed_models/seed-PROFILE-vVERSION-HASH).")
    p.add_argument("--profile", choices=["test", "small"], default="small")
    p.add_argument("--out", help="build into this folder instead of the cache")
    p.add_argument("--steps", type=int, default=None, help="pretraining steps (with --out only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where to pretrain (with --out): cpu or cuda")
    p.set_defaults(func=cmd_seed)

    p = sub.add_parser("memory", help="add episodes to the short-term memory, or list it",
                       description="The MemoryStore under cycle.storage/memory: 'add' appends the "
                                   "configured stream's episodes durably, 'list' shows every episode.")
    p.add_argument("action", choices=["add", "list"])
    _add_config_args(p)
    p.add_argument("--episodes", type=int, default=None, help="episodes to add (default: world.n_episodes)")
    p.set_defaults(func=cmd_memory)

    p = sub.add_parser("sleep", help="consolidate the short-term memory now (one sleep, in this process)",
                       description="Run (or resume) a sleep over cycle.storage in this process: NREM trains "
                                   "a fresh expert on the short-term episodes, REM dreams and rehearses "
                                   "(unless --phase nrem or rem.enabled=false), then a new adapter version "
                                   "is published with its lineage and the episodes are marked "
                                   "consolidated; a deep sleep every experts.deep_sleep_every sleeps.")
    p.add_argument("--phase", choices=["all", "nrem"], default="all",
                   help="all: NREM, REM, publish (and deep); nrem: NREM and publish only")
    _add_config_args(p)
    p.set_defaults(func=cmd_sleep)

    p = sub.add_parser("serve", help="serve the awake model (OpenAI-compatible HTTP, Ray Serve)",
                       description="Deploy the awake endpoint on Ray Serve at serve.host:serve.port: "
                                   "/v1/models, /v1/completions, /v1/chat/completions (base model + "
                                   "the newest adapter version, short-term memory in context), "
                                   "/v1/memories and /v1/sleep. Joins ray.address / RAY_ADDRESS or "
                                   "starts a local cluster; blocks until Ctrl-C.")
    _add_config_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("keys", help="API keys of the endpoint's tenants (serve.tenants_file)",
                       description="add: make a key for a tenant (or an admin key), print it once and store "
                                   "only its SHA-256 in FILE; list: the tenants and key hashes in FILE. "
                                   "Each tenant has its own memory, sleeps and adapter "
                                   "(cycle.storage/tenants/NAME).")
    p.add_argument("action", choices=["add", "list"])
    p.add_argument("--file", "-f", required=True, help="the tenants file (YAML; created if missing)")
    p.add_argument("--tenant", "-t", help="tenant name (a-z 0-9 _ -)")
    p.add_argument("--admin", action="store_true", help="an admin key: lists tenants, asks for their sleeps")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("cycle", help="run the wake/sleep cycle job on Ray (jobs.cycle)",
                       description="Feed the configured stream in cycle.n_sleeps parts to the MemoryStore "
                                   "actor; the Coordinator sleeps after each (or on memory pressure); "
                                   "closed-book accuracy on every episode so far after each sleep. Joins "
                                   "ray.address / RAY_ADDRESS or starts a local Ray.")
    _add_config_args(p)
    p.add_argument("--out", help="results JSON (default: <storage>/cycle_results.json)")
    p.add_argument("--trigger", choices=["request", "pressure"], default="request")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="Ray workers' output and INFO logs on the console too (else: <storage>/logs)")
    p.set_defaults(func=cmd_cycle)

    p = sub.add_parser("bench", help="benchmark rollouts, adapter publishing and sleeps (jobs.bench)",
                       description="vLLM vs transformers rollout tokens/s, adapter publish latency to every "
                                   "RolloutWorker, and the wall time of one sleep at three memory sizes; "
                                   "JSON + PNG.")
    _add_config_args(p)
    p.add_argument("--out", default="bench.json")
    p.add_argument("--only", default="rollout,publish,sleep")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("config", help="print the validated config (defaults + file + overrides)",
                       description="Load, validate and print the full config as YAML.")
    _add_config_args(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("world", help="print episodes of the built-in world",
                       description="Print the documents and probe questions of the configured world.")
    _add_config_args(p)
    p.add_argument("--episodes", type=int, default=None)
    p.add_argument("--show-probes", type=int, default=6)
    p.add_argument("--jsonl", action="store_true", help="one JSON object per episode")
    p.set_defaults(func=cmd_world)

    p = sub.add_parser("eval", help="continual-learning benchmark: methods x seeds, accuracy matrix, report",
                       description="Cut the configured stream into cycle.n_sleeps parts; for every method of "
                                   "eval.methods (no_sleep, in_context, sft, seal, distill_no_expansion, "
                                   "no_expansion, sleep, sleep_no_rem, sleep_no_lti, sleep_no_replay) and "
                                   "eval.seeds seeds, sleep after each part and answer every episode "
                                   "closed-book and in context: the matrix R[i, j], ACC, BWT, FWT, perplexity "
                                   "drift. Writes results.json, answers.parquet, plots/ and report.md under "
                                   "--out. In this process (no Ray needed). Profiles: examples/eval_quick.yaml, "
                                   "examples/eval_standard.yaml.")
    _add_config_args(p)
    p.add_argument("--out", default="runs/eval", help="output folder (default: runs/eval)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--merge", nargs="+", metavar="DIR",
                   help="instead of running: merge these eval output folders (the same stream and settings, "
                        "other methods or seeds) into --out, with one report")
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except (ConfigError, ValueError) as err:
        print(f"sleepray {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
