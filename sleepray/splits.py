"""Which worlds are for what: pretraining, tuning (dev) and reporting (test).

* pretraining: world seeds below ``pretrain_data.TRAIN_WORLD_SEED_MAX`` (10,000,000);
* dev worlds: ``DEV_WORLD_SEED + k`` -- tune every setting on these;
* test worlds: ``TEST_WORLD_SEED + k`` -- every reported table; never used for tuning.

Worlds between 10,000,000 and the dev range were used for tuning before this split
existed (the seed model's own evaluation, earlier benchmarks): they count as ``"other"``
and are reported as neither.
"""
from __future__ import annotations

DEV_WORLD_SEED = 10_600_000
TEST_WORLD_SEED = 10_700_000
_SPAN = 100_000


SPLITS = {"dev": DEV_WORLD_SEED, "test": TEST_WORLD_SEED}


def world_seed(split: str, k: int = 0) -> int:
    """The k-th world of a split (``"dev"`` or ``"test"``)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    return SPLITS[split] + k


def dev_world(k: int = 0) -> int:
    return world_seed("dev", k)


def test_world(k: int = 0) -> int:
    return world_seed("test", k)


def world_split(seed: int) -> str:
    """``"pretrain"``, ``"dev"``, ``"test"`` or ``"other"`` for a world seed."""
    from sleepray.pretrain_data import TRAIN_WORLD_SEED_MAX
    if 0 < seed < TRAIN_WORLD_SEED_MAX:
        return "pretrain"
    if DEV_WORLD_SEED <= seed < DEV_WORLD_SEED + _SPAN:
        return "dev"
    if TEST_WORLD_SEED <= seed < TEST_WORLD_SEED + _SPAN:
        return "test"
    return "other"
