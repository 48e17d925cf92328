"""Where a result came from: git revision, the exact command, seeds and world seeds.

Every results file sleepray writes carries ``provenance(...)`` (README: a figure without
it is not reported).
"""
from __future__ import annotations

import datetime as _dt
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

_ROOT = Path(__file__).resolve().parent.parent


def git_revision(root: Path = _ROOT) -> Optional[str]:
    """``SLEEPRAY_REVISION`` when set (a copied tree or a job's upload, whose ``.git``, if any, need
    not be the code that runs), else the checkout's commit, with ``-dirty`` when tracked files
    differ from it; None outside git."""
    import os
    if os.environ.get("SLEEPRAY_REVISION"):
        return os.environ["SLEEPRAY_REVISION"]
    if not (root / ".git").exists():
        return None
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{rev}-dirty" if dirty else rev


def command_line(argv: Optional[Sequence[str]] = None) -> str:
    """The command as typed: ``python -m jobs.x ...`` for modules run with -m."""
    argv = list(sys.argv if argv is None else argv)
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name and argv:
        argv = ["python", "-m", spec.name.removesuffix(".__main__")] + argv[1:]
    return shlex.join(argv)


def provenance(seeds: Sequence[int] = (), world_seeds: Sequence[int] = (),
               argv: Optional[Sequence[str]] = None) -> dict:
    """The record every results file carries."""
    from sleepray.splits import world_split
    import torch
    return {"revision": git_revision(), "command": command_line(argv), "seeds": list(seeds),
            "world_seeds": list(world_seeds), "world_split": sorted({world_split(s) for s in world_seeds}),
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__, "host": platform.node(),
            "machine": platform.machine()}


def common_revision(parts: Sequence[Optional[dict]]) -> Optional[str]:
    """The revision every part was measured at (None when no part recorded one); parts measured
    at different revisions are not one measurement: ``ValueError``."""
    revs = {p.get("revision") for p in parts if p}
    revs.discard(None)
    if len(revs) > 1:
        raise ValueError(f"the parts were measured at different revisions {sorted(revs)}: not one measurement")
    return revs.pop() if revs else None
