"""The episode stream a config names: the built-in world, or the user's own files."""
from __future__ import annotations

from sleepray.world import Episode, World


def episodes_from_config(wc, n: int | None = None) -> list[Episode]:
    """The first ``n`` (default ``wc.n_episodes``) episodes of the configured stream."""
    n = n or wc.n_episodes
    if wc.source == "builtin":
        return World.from_config(wc).episodes(n)
    if not wc.data_path:
        raise ValueError("world.source=file needs world.data_path (JSONL or Parquet)")
    from sleepray.userdata import load_episodes
    return load_episodes(wc.data_path)[:n]
