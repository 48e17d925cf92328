"""Plots and report.md from an evaluation's ``results.json`` (see ``sleepray.eval_run``).

Under the output folder:

* ``plots/R_<method>.png``: the accuracy matrix R (mean over seeds) as a heatmap, the
  cell of each episode's own sleep outlined;
* ``plots/accuracy_over_time.png``: one panel per method, closed-book accuracy on each
  episode after every sleep (mean over seeds), a marker where the episode arrives;
* ``plots/methods.png``: bars of ACC, BWT and FWT per method, error bars one std over seeds;
* ``plots/phrasing.png`` (when the questions have phrasing families): bars of ACC on
  seen-phrasing and on unseen-phrasing questions per method;
* ``report.md``: the table of methods (mean ± std over seeds; seen / unseen phrasing
  columns where there are such questions), definitions, the plots and each method's mean R.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from sleepray import eval_metrics as M

DESCRIPTIONS = {
    "no_sleep": "the base model, never trained (closed-book)",
    "in_context": "the base model with each seen episode's own documents in its context (upper reference)",
    "sft": "a fresh expert per sleep, SFT on the raw documents",
    "sft_self_qa": "a fresh expert per sleep, SFT on the questions the model wrote about each episode, "
                   "answered by it with the episode in context (the Q/A a sleep trains on)",
    "seal": "a fresh expert per sleep, SFT on every self-written dream (no selection, trials, ReST-EM, replay)",
    "distill_no_expansion": "on-policy GKD (no LTI) into all weights, teacher = the model before the sleep "
                            "with the episode in context",
    "no_expansion": "NREM as configured (GKD + LTI) into all weights, no expert, no REM",
    "sleep": "Sleep: NREM (GKD + LTI) into a fresh expert, then REM (dreams, selection, trials, ReST-EM, replay)",
    "sleep_no_rem": "Sleep without REM",
    "sleep_no_lti": "Sleep without Learning to Imitate",
    "sleep_no_replay": "Sleep without generative replay",
}

TABLE = [("ACC", "ACC"), ("BWT", "BWT"), ("FWT", "FWT"), ("LA", "LA"),
         ("ACC_seen", "ACC seen"), ("ACC_unseen", "ACC unseen"), ("LA_seen", "LA seen"), ("LA_unseen", "LA unseen"),
         ("ACC_in_context", "in-context ACC"), ("ACC_in_context_seen", "in-context ACC seen"),
         ("ACC_in_context_unseen", "in-context ACC unseen"),
         ("F1", "F1"), ("drift", "drift (general)"), ("drift_world", "drift (world)"), ("seconds", "seconds")]
# per-phrasing columns: shown only when some method has a value
PHRASING_COLUMNS = {"ACC_seen", "ACC_unseen", "LA_seen", "LA_unseen", "ACC_in_context_seen",
                    "ACC_in_context_unseen"}


def _fmt(s: dict, digits: int = 3) -> str:
    if not s or s.get("mean") is None:
        return "–"
    if s["n"] > 1:
        return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"
    return f"{s['mean']:.{digits}f}"


def _mean_R(results: dict, method: str, key: str = "R") -> Optional[list[list[float]]]:
    Rs = [r[key] for r in results["runs"] if r["method"] == method and r.get(key)]
    return M.mean_matrix(Rs) if Rs else None


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_heatmap(results: dict, method: str, path: Path) -> Path:
    plt = _plt()
    from matplotlib.patches import Rectangle
    R = _mean_R(results, method)
    eps, p = results["episodes"], results["part_of"]
    T, E = len(R), len(eps)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * E, 1.0 + 0.6 * T))
    im = ax.imshow(R, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for i in range(T):
        for j in range(E):
            ax.text(j, i, f"{R[i][j]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if R[i][j] < 0.6 else "black")
    for j in range(E):
        ax.add_patch(Rectangle((j - 0.5, p[j] - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    ax.set_xticks(range(E), eps, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(T), [f"after sleep {i + 1}" for i in range(T)], fontsize=8)
    n = len([r for r in results["runs"] if r["method"] == method])
    ax.set_title(f"R[i, j]: {method} (mean of {n} seed{'s' if n > 1 else ''})", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_over_time(results: dict, path: Path) -> Path:
    plt = _plt()
    methods, eps, p = results["methods"], results["episodes"], results["part_of"]
    cols = min(4, len(methods))
    rows = (len(methods) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, sharey=True)
    cmap = plt.get_cmap("tab10")
    for k, m in enumerate(methods):
        ax = axes[k // cols][k % cols]
        R = _mean_R(results, m)
        xs = list(range(1, len(R) + 1))
        for j, e in enumerate(eps):
            ax.plot(xs, [R[i][j] for i in range(len(R))], marker="o", ms=3, color=cmap(j % 10), label=e)
            ax.plot([p[j] + 1], [R[p[j]][j]], marker="*", ms=9, color=cmap(j % 10))
        ax.set_title(m, fontsize=9)
        ax.set_ylim(-0.05, 1.05)
        ax.set_xticks(xs)
        ax.set_xlabel("after sleep", fontsize=8)
        ax.grid(alpha=0.3)
    for k in range(len(methods), rows * cols):
        axes[k // cols][k % cols].axis("off")
    axes[0][0].set_ylabel("accuracy (R)", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(eps), 6), fontsize=7)
    fig.suptitle("accuracy on each episode over sleeps (* = the episode's own sleep)", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_methods(results: dict, path: Path) -> Path:
    plt = _plt()
    methods = results["methods"]
    keys = ["ACC", "BWT", "FWT"]
    fig, axes = plt.subplots(1, len(keys), figsize=(len(keys) * (1.2 + 0.32 * len(methods)), 3.8))
    for ax, key in zip(axes, keys):
        stats = [results["summary"][m][key] for m in methods]
        means = [s["mean"] if s["mean"] is not None else 0.0 for s in stats]
        errs = [s["std"] if s["std"] is not None else 0.0 for s in stats]
        colors = ["tab:green" if m.startswith("sleep") else "tab:gray" if m in ("no_sleep", "in_context")
                  else "tab:blue" for m in methods]
        ax.bar(range(len(methods)), means, yerr=errs, capsize=3, color=colors)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xticks(range(len(methods)), methods, rotation=60, ha="right", fontsize=7)
        ax.set_title(key, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    n = len(results["seeds"])
    fig.suptitle(f"methods: mean over {n} seed{'s' if n > 1 else ''}, error bars one std", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _has(results: dict, key: str) -> bool:
    """Whether some method's summary has a value of ``key``."""
    return any((results["summary"][m].get(key) or {}).get("n") for m in results["methods"])


def plot_phrasing(results: dict, path: Path) -> Path:
    """ACC on seen- and on unseen-phrasing questions per method (error bars one std over seeds)."""
    plt = _plt()
    methods = results["methods"]
    fig, ax = plt.subplots(figsize=(1.6 + 0.6 * len(methods), 3.6))
    width = 0.4
    for k, (ph, color) in enumerate((("seen", "tab:blue"), ("unseen", "tab:orange"))):
        stats = [results["summary"][m].get(f"ACC_{ph}") or {} for m in methods]
        means = [s.get("mean") or 0.0 for s in stats]
        errs = [s.get("std") or 0.0 for s in stats]
        ax.bar([x + (k - 0.5) * width for x in range(len(methods))], means, width, yerr=errs, capsize=3,
               color=color, label=f"{ph} phrasing")
    ax.set_xticks(range(len(methods)), methods, rotation=60, ha="right", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("ACC", fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("ACC by question phrasing", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(results: dict, out: str | Path) -> list[Path]:
    d = Path(out) / "plots"
    d.mkdir(parents=True, exist_ok=True)
    paths = [plot_heatmap(results, m, d / f"R_{m}.png") for m in results["methods"]]
    paths.append(plot_over_time(results, d / "accuracy_over_time.png"))
    paths.append(plot_methods(results, d / "methods.png"))
    if _has(results, "ACC_seen") or _has(results, "ACC_unseen"):
        paths.append(plot_phrasing(results, d / "phrasing.png"))
    return paths


def methods_table(results: dict) -> str:
    cols = [(k, label) for k, label in TABLE if k not in PHRASING_COLUMNS or _has(results, k)]
    head = "| method | " + " | ".join(label for _, label in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for m in results["methods"]:
        s = results["summary"][m]
        cells = [_fmt(s.get(k), 1 if k == "seconds" else 3) for k, _ in cols]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _phrasing_lines(results: dict) -> list[str]:
    """The sentence on the two phrasing families, with each one's question count."""
    n_by = results.get("n_probes_by_phrasing") or {}
    if not n_by:
        return []
    counts = ", ".join(f"{sum(v)} {ph}" for ph, v in n_by.items())
    return ["- **seen / unseen** (questions by phrasing; " + counts + "): *seen* questions use the templates the "
            "seed model met in pretraining; *unseen* questions are evaluation-only paraphrases that appear "
            "nowhere in pretraining nor in a sleep, so the *unseen* columns are the honest generalisation "
            "figure. Each is scored over the episodes that have such questions."]


def _matrix_md(R: list[list[float]], eps: list[str]) -> str:
    lines = ["| | " + " | ".join(eps) + " |", "|---|" + "---|" * len(eps)]
    lines += [f"| after sleep {i + 1} | " + " | ".join(f"{v:.2f}" for v in row) + " |" for i, row in enumerate(R)]
    return "\n".join(lines)


def _where(results: dict, mins: float) -> str:
    """Where and when it ran, from the provenance (a merge: its parts' machines and revision)."""
    parts = [p for p in results.get("provenance_parts") or [results.get("provenance")] if p]
    if not parts:
        return f"Wall time {mins:.1f} min on {os.cpu_count()} CPU cores, created {results['created_at']}."
    where = sorted({f"{p.get('host')} ({p.get('machine')}, torch {p.get('torch')})" for p in parts})
    rev = results.get("measured_revision") or parts[0].get("revision")
    runs = f", summed over {len(parts)} parts run apart" if len(parts) > 1 else ""
    return (f"Measured at revision `{str(rev)[:12]}` on {', '.join(where)}; wall time {mins:.1f} min{runs}; "
            f"created {results['created_at']}. Commands and seeds: `provenance` in results.json.")


def render_report(results: dict) -> str:
    cfg = results["config"]
    w, base = cfg["world"], results["baseline"]
    eps, parts = results["episodes"], results["parts"]
    T, E = len(parts), len(eps)
    seeds = results["seeds"]
    world = (f"built-in world seed {w['seed']} (per episode: {w['people_per_episode']} person/people, "
             f"{w['orgs_per_episode']} org(s), {w['places_per_episode']} place(s); {w['phrasings_per_fact']} "
             f"phrasing(s) per fact)" if w["source"] == "builtin" else f"user data `{w['data_path']}`")
    n, r, ev = cfg["nrem"], cfg["rem"], cfg["eval"]
    setup = (f"NREM {n['steps']} steps x batch {n['batch_size']}, lr {n['lr']}, LTI group {n['lti_group_size']}, "
             f"judge {n['judge']}; REM {r['dreams_per_episode']} dreams per episode ({', '.join(r['formats'])}), "
             f"keep top {r['keep_top_k']} + {r['keep_random']} random, {r['trial_steps']} trial steps, "
             f"ReST-EM {r['restem_steps']} steps, dream SFT {r['sft_steps']} steps; sft/seal "
             f"{ev['baseline_steps'] or n['steps']} steps at lr {ev['baseline_lr'] or n['lr']}; whole-model "
             f"methods at lr {ev['full_model_lr']}; experts rank {cfg['experts']['rank']}; torch threads "
             f"{ev.get('num_threads') or 'default'}.")
    mins = results["wall_seconds"] / 60
    n_cb = sum(base["closed_book"][j] for j in range(E)) / E
    n_ic = sum(base["in_context"][j] for j in range(E)) / E
    base_by = ""
    for ph, xs in (base.get("closed_book_by_phrasing") or {}).items():
        ic = [v for v in base["in_context_by_phrasing"][ph] if v is not None]
        xs = [v for v in xs if v is not None]
        if xs:
            base_by += (f" On {ph}-phrasing questions: {sum(xs) / len(xs):.3f} closed-book, "
                        f"{sum(ic) / len(ic):.3f} in context.")
    out = [
        f"# Continual-learning evaluation: `{results['profile']}` profile",
        "",
        f"Model `{cfg['model']['path']}`; {world}; {E} episodes ({sum(results['n_probes'])} questions) in "
        f"{T} parts, one sleep after each part; seeds {seeds} (a seed sets `seed.seed`, the training "
        f"randomness; the world is the same for every run). {_where(results, mins)}",
        "",
        setup,
        "",
        f"Never slept, the base model answers {n_cb:.3f} closed-book and {n_ic:.3f} with the episode in "
        f"its context (exact match).{base_by}",
        "",
        "## Methods",
        "",
        methods_table(results),
        "",
        "Mean ± sample std over seeds. Each run's numbers are in `results.json`, every question and answer "
        "in `answers.parquet`.",
        "",
        "- **R[i, j]**: normalised exact match on episode j's questions, closed-book, after sleep i "
        "(`in_context`: with the episode's documents in context once it has arrived).",
        "- **ACC**: mean over episodes of R after the last sleep. **LA**: mean of R[p(j), j], right after "
        "the episode's own sleep p(j).",
        "- **BWT** (backward transfer, Lopez-Paz & Ranzato 2017): mean over episodes not in the last part "
        "of R[T-1, j] - R[p(j), j]; negative = forgetting.",
        "- **FWT** (forward transfer): mean over episodes not in the first part of R[p(j)-1, j] - b_j, "
        "b_j the never-slept model's closed-book accuracy.",
        "- **in-context ACC**: the method's final model with each episode in its context (does sleeping "
        "damage reading from context?). **F1**: token F1 of the answers counted in ACC.",
        "- **drift**: perplexity after the last sleep over the base model's, minus 1, on held-out general "
        "text (`sleepray/general_text.py`) and on held-out world documents (unseen entities).",
        "- **seconds**: wall time of one run (all its sleeps and measurements).",
        *_phrasing_lines(results),
        "",
    ]
    out += [f"- `{m}`: {DESCRIPTIONS.get(m, '')}" for m in results["methods"]]
    if base["perplexity"] > 1000:
        out += ["", f"Note: the base model's perplexity on the held-out general text is {base['perplexity']:.3g} "
                    "(the seed models are pretrained on world text only), so drift (general) is mostly noise "
                    "there; drift (world), on documents about unseen entities "
                    f"(base perplexity {base['perplexity_world']:.3g}), is the one to read."]
    out += ["", "![methods](plots/methods.png)", ""]
    if _has(results, "ACC_seen") or _has(results, "ACC_unseen"):
        out += ["![ACC by phrasing](plots/phrasing.png)", ""]
    out += ["![accuracy over time](plots/accuracy_over_time.png)", "", "## R per method (mean over seeds)", ""]
    out += ["Parts: " + "; ".join(f"sleep {i + 1}: {', '.join(p)}" for i, p in enumerate(parts)), "",
            "Never slept (b): " + ", ".join(f"{e} {v:.2f}" for e, v in zip(eps, base["closed_book"])), ""]
    for m in results["methods"]:
        out += [f"### {m}", "", f"![R {m}](plots/R_{m}.png)", "", _matrix_md(_mean_R(results, m), eps), ""]
    return "\n".join(out) + "\n"


def write_report(results: dict | str | Path, out: str | Path) -> Path:
    """Plots and report.md under ``out`` from results (a dict or a results.json path)."""
    if not isinstance(results, dict):
        results = json.loads(Path(results).read_text())
    write_plots(results, out)
    path = Path(out) / "report.md"
    path.write_text(render_report(results))
    return path
