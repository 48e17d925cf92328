"""Merge evaluation outputs that ran apart (methods or seeds split over processes, machines
or ``ray job submit`` jobs) into one: ``sleepray eval --merge DIR DIR ... --out DIR``.

The parts must have measured the same stream (episodes, parts) with the same model and
method settings; only ``eval.methods``, ``eval.seeds`` and ``eval.first_seed`` may differ.
A (method, seed) run present in two parts is an error, not a silent overwrite. Runs keep
every field they have (``R_by_phrasing``, the per-phrasing metrics, ...); the summary is
recomputed over all of them. Each part's ``provenance`` is kept, in part order, under
``provenance_parts``; the top-level ``provenance`` is the merge's own.
"""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

from sleepray import eval_metrics as M
from sleepray.eval_run import RUN_METRICS

_MAY_DIFFER = {"methods", "seeds", "first_seed"}
_SAME = ("schema_version", "profile", "episodes", "parts", "part_of", "n_probes", "phrasings",
         "n_probes_by_phrasing")


def _comparable_config(cfg: dict) -> dict:
    out = {k: v for k, v in cfg.items() if k != "eval"}
    out["eval"] = {k: v for k, v in cfg.get("eval", {}).items() if k not in _MAY_DIFFER}
    return out


def merge_results(parts: list[dict]) -> dict:
    """One results dict (the ``results.json`` schema) from several."""
    from sleepray.provenance import common_revision, provenance
    if len(parts) < 2:
        raise ValueError("merge needs at least two results")
    first = parts[0]
    for k, p in enumerate(parts[1:], 1):
        for key in _SAME:
            if p.get(key) != first.get(key):
                raise ValueError(f"part {k} differs from part 0 in {key!r}: not the same evaluation")
        if _comparable_config(p["config"]) != _comparable_config(first["config"]):
            raise ValueError(f"part {k} was run with other settings than part 0 "
                             "(only eval.methods, eval.seeds and eval.first_seed may differ)")
    runs, seen = [], set()
    for p in parts:
        for r in p["runs"]:
            key = (r["method"], r["seed"])
            if key in seen:
                raise ValueError(f"method {key[0]!r} seed {key[1]} is in more than one part")
            seen.add(key)
            runs.append(r)
    methods = list(dict.fromkeys(m for p in parts for m in p["methods"]))
    seeds = sorted({r["seed"] for r in runs})
    config = json.loads(json.dumps(first["config"]))
    config["eval"].update(methods=methods, seeds=len(seeds), first_seed=seeds[0])
    world = config.get("world", {})
    return {
        **{k: first.get(k) for k in _SAME},
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "provenance": provenance(seeds=seeds, world_seeds=[world["seed"]] if world.get("source") == "builtin" else []),
        "provenance_parts": [p.get("provenance") for p in parts],
        "measured_revision": common_revision([p.get("provenance") for p in parts]),
        "wall_seconds": round(sum(p["wall_seconds"] for p in parts), 2),
        "config": config, "methods": methods, "seeds": seeds, "baseline": first["baseline"], "runs": runs,
        "summary": {m: M.summarize([r for r in runs if r["method"] == m], RUN_METRICS) for m in methods},
        "merged_from": len(parts),
    }


def merge_dirs(dirs: list[str | Path], out: str | Path) -> dict:
    """Merge the ``results.json`` and ``answers.parquet`` of ``dirs`` into ``out``, with plots and report."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sleepray.eval_report import write_report
    dirs = [Path(d) for d in dirs]
    for d in dirs:
        if not (d / "results.json").is_file():
            raise FileNotFoundError(f"{d} has no results.json (is it an eval output folder?)")
    merged = merge_results([json.loads((d / "results.json").read_text()) for d in dirs])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    answers = [pq.read_table(d / "answers.parquet") for d in dirs if (d / "answers.parquet").is_file()]
    if answers:
        pq.write_table(pa.concat_tables(answers), out / "answers.parquet")
    (out / "results.json").write_text(json.dumps(merged, indent=2))
    write_report(merged, out)
    return merged
