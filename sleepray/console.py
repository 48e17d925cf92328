"""What a person sees on the driver's console during a run, and where the rest goes.

* :func:`setup_logging`: the driver's logging goes to ``<storage>/logs/run.log`` at INFO with
  timestamps; the console gets only warnings (and Ray's own errors) unless ``verbose``.
* :func:`log_to_file`: a process that runs part of a sleep (the Coordinator actor, a Ray
  Train learner worker) also logs to a file under ``<storage>/logs/``.
* :func:`link_ray_logs`: ``<storage>/logs/ray`` points at this Ray session's log folder,
  where the output of every Ray worker that the console no longer shows is kept.
* :class:`SleepBars`: one progress line per step of every sleep (NREM with its divergence and
  reward, REM's stages, publish, deep), drawn by the driver from what the sleep writes to
  disk (its record, ``nrem/progress.json``, ``rem/progress.json``) and the sleep
  controller's status, wherever the sleep itself runs.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm

from sleepray.sleep_record import RECORD, SleepRecord
from sleepray.storage import PathLike, Storage

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
RUN_LOG = "run.log"
LABELS = {"nrem": "NREM", "rem": "REM", "publish": "publish", "deep": "deep sleep"}
REM_STAGES = ("dreams", "trials", "sft", "retention", "outputs")   # sleepray.rem.run_rem, in order


class _QuietConsole(logging.Filter):
    """Warnings and errors of this program; of Ray's own loggers, errors only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "ray" or record.name.startswith("ray."):
            return record.levelno >= logging.ERROR
        return record.levelno >= logging.WARNING


def setup_logging(logs: Optional[PathLike], verbose: bool = False, level: str = "INFO") -> Optional[Path]:
    """The driver's logging: the console (everything at ``level`` when ``verbose``, else
    warnings only) and, when ``logs`` is given, ``logs/run.log`` at INFO. Ray's ``ray``
    logger joins the same handlers (``connect(..., own_logging=True)``). Returns the log file."""
    root = logging.getLogger()
    for h in list(root.handlers):   # a second call (or basicConfig before it) replaces them
        if getattr(h, "_sleepray", False) or type(h) is logging.StreamHandler:
            root.removeHandler(h)
            h.close()
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    if verbose:
        console.setLevel(level)
    else:
        console.addFilter(_QuietConsole())
    console._sleepray = True
    root.addHandler(console)
    root.setLevel(min(logging.getLevelName(level), logging.INFO))
    _ray_joins_root()
    path = None
    if logs is not None:
        path = Path(logs) / RUN_LOG
        fh = _file_handler(path, logging.INFO)
        fh._sleepray = True
        root.addHandler(fh)
    return path


def _file_handler(path: Path, level: int) -> logging.FileHandler:
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = logging.FileHandler(path)
    fh.setLevel(level)
    fh.setFormatter(logging.Formatter(FORMAT))
    return fh


def _ray_joins_root() -> None:
    """Ray's driver-side ``ray`` logger (its own stderr handler, set up when ``ray`` is
    imported) sends its records to the root logger's handlers instead; ``ray.init`` must
    then not set it up again (``configure_logging=False``: ``raycluster.connect(own_logging=True)``)."""
    import ray  # noqa: F401  (its import configures the logger this undoes)
    ray_logger = logging.getLogger("ray")
    for h in list(ray_logger.handlers):
        ray_logger.removeHandler(h)
    ray_logger.propagate = True


def log_to_file(path: PathLike, level: int = logging.INFO) -> Path:
    """Also log this process's records (``level`` and up) to ``path``; once per path."""
    path = Path(path).resolve()
    root = logging.getLogger()
    if not any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path for h in root.handlers):
        root.addHandler(_file_handler(path, level))
    if root.level == logging.NOTSET or root.level > level:
        root.setLevel(level)
    return path


def ray_session_logs() -> Optional[Path]:
    """This driver's Ray session log folder (``/tmp/ray/session_*/logs``), if Ray is up here."""
    try:
        import ray
        node = ray._private.worker._global_node   # no public accessor in Ray 2.60
        return Path(node.get_session_dir_path()) / "logs" if node is not None else None
    except Exception:
        return None


def link_ray_logs(logs: PathLike) -> Optional[Path]:
    """``logs/ray`` -> the Ray session's log folder (worker-*.out/err, logs/train/...)."""
    target = ray_session_logs()
    if target is None:
        return None
    link = Path(logs) / "ray"
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        if link.is_symlink():
            link.unlink()
        os.symlink(target, link, target_is_directory=True)
    except OSError:
        return target
    return link


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _width(file) -> dict:
    """Follow the terminal's size; a terminal that says it has none (a pty without a size, as
    under ``script``) gets 120x50, where tqdm would print nothing."""
    try:
        size = os.get_terminal_size((file or sys.stderr).fileno())
    except (OSError, AttributeError, ValueError):
        return {}
    return {"dynamic_ncols": True} if size.columns > 0 and size.lines > 0 else {"ncols": 120, "nrows": 50}


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


class SleepBars:
    """One tqdm line per step of each sleep under ``storage``, drawn by whoever waits for it.

    Call :meth:`update` with the sleep controller's status (``SleepController.status()``) on
    every poll: the running sleep's record says which steps are done (each gets its final
    line, with its metrics) and which one runs; the running step's bar follows
    ``nrem/progress.json`` (step, divergence, reward; rank 0 of the learner writes it each
    step) or ``rem/progress.json`` (REM's stage). A sleep that ran entirely between two polls
    still gets its lines once the status says it is awake again (``last_sleep``).
    """

    def __init__(self, cfg, storage: PathLike, enabled: bool = True, file=None):
        self.cfg, self.store, self.enabled, self.file = cfg, Storage(storage), enabled, file
        self.sid: Optional[str] = None
        self.bar = None           # the open bar: (phase, tqdm)
        self.closed: set[tuple[str, str]] = set()

    # ---------------------------------------------------------------- polling
    def update(self, status: dict) -> None:
        if not self.enabled:
            return
        phase, sid = status.get("phase"), status.get("sleep_id")
        if phase == "wake":
            sid = sid or (status.get("last_sleep") or {}).get("sleep_id") or self.sid
            if sid:
                self._switch(sid)
                self._render(final=True)
            self.sid = None
            return
        if sid:
            self._switch(sid)
        if self.sid:
            self._render(final=False)

    def close(self) -> None:
        if self.sid:
            self._render(final=True)
        self._close_bar()

    def write(self, line: str) -> None:
        """A line between the bars (``tqdm.write``)."""
        if self.enabled:
            tqdm.write(line, file=self.file)

    def sleep_done(self, i: int, status: dict, ev: dict) -> None:
        """``run_cycle``'s ``on_sleep``: one line with the accuracy after sleep ``i + 1``."""
        cb = [v for v in ev.get("closed_book", {}).values() if v is not None]
        last = status.get("last_sleep") or {}
        acc = f"{sum(cb) / len(cb):.2f}" if cb else "-"
        self.write(f"after sleep {i + 1}: {ev.get('version') or last.get('version')}, closed-book accuracy "
                   f"{acc} over {len(cb)} episodes so far ({status.get('wall_seconds', 0):.0f}s)")

    # -------------------------------------------------------------- rendering
    def _switch(self, sid: str) -> None:
        if sid != self.sid:
            if self.sid:
                self._render(final=True)
            self._close_bar()
            self.sid = sid

    def _record(self) -> Optional[SleepRecord]:
        path = self.store.sleep_dir(self.sid) / RECORD
        try:
            return SleepRecord.read(path)
        except (OSError, ValueError):
            return None

    def _render(self, final: bool) -> None:
        rec = self._record()
        if rec is None:
            return
        for phase in rec.phases:
            if (rec.sleep_id, phase) in self.closed:
                continue
            bar = self._bar(rec, phase)
            if rec.is_done(phase):
                self._finish(rec, phase, bar, rec.metrics(phase))
                continue
            self._progress(rec, phase, bar)
            if final:    # the sleep ended without finishing this step (it failed)
                bar.set_postfix_str("not finished", refresh=False)
                self._close_bar()
                self.closed.add((rec.sleep_id, phase))
            return

    def _bar(self, rec: SleepRecord, phase: str):
        if self.bar is not None and self.bar[0] == (rec.sleep_id, phase):
            return self.bar[1]
        self._close_bar()
        total, unit = {"nrem": (self.cfg.nrem.steps, "step"), "rem": (len(REM_STAGES), "stage")}.get(phase, (1, "step"))
        bar = tqdm(total=total, desc=f"{rec.sleep_id} {LABELS.get(phase, phase)}", unit=unit, leave=True,
                   file=self.file, **_width(self.file), bar_format="{l_bar}{bar:20}| {n_fmt}/{total_fmt} "
                                                                  "[{elapsed}{postfix}]")
        self.bar = ((rec.sleep_id, phase), bar)
        return bar

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar[1].close()
            self.bar = None

    def _progress(self, rec: SleepRecord, phase: str, bar) -> None:
        """The running step's bar, from its progress file."""
        p = _read_json(rec.dir / phase / "progress.json") if phase in ("nrem", "rem") else None
        if not p:
            bar.refresh()
            return
        if phase == "nrem":
            bar.n = min(int(p.get("step", 0)), bar.total)
            bar.set_postfix_str(self._nrem_postfix(p), refresh=False)
        else:
            bar.n = min(int(p.get("done", 0)), bar.total)
            bar.set_postfix_str(", ".join([str(p.get("stage"))] + [f"{k}={_fmt(p[k])}" for k in
                                          ("dreams", "kept", "rewarded") if k in p]), refresh=False)
        bar.refresh()

    @staticmethod
    def _nrem_postfix(m: dict) -> str:
        keys = (("divergence", "D"), ("reward", "r"), ("loss", "loss"))
        return ", ".join(f"{short}={m[k]:.3f}" for k, short in keys if isinstance(m.get(k), (int, float)))

    def _finish(self, rec: SleepRecord, phase: str, bar, m: dict) -> None:
        bar.n = bar.total
        bar.bar_format = "{l_bar}{bar:20}| {n_fmt}/{total_fmt}{postfix}"   # its own seconds, not the bar's
        if "skipped" in m:
            post = f"skipped: {m['skipped']}"
        elif phase == "nrem":
            post = self._nrem_postfix(m)
        elif phase == "rem":
            post = ", ".join(f"{k}={_fmt(m[k])}" for k in ("dreams", "kept", "rewarded", "probe_accuracy_final")
                             if m.get(k) is not None)
        elif phase == "publish":
            post = f"version {rec.version}"
        else:
            post = ""
        secs = m.get("seconds")
        bar.set_postfix_str(", ".join(x for x in (post, f"{secs:.0f}s" if isinstance(secs, (int, float)) else "")
                                      if x), refresh=False)
        self._close_bar()
        self.closed.add((rec.sleep_id, phase))
