"""Retention of a whole sleep (NREM and REM share the expert): does the model still answer
what it had learned about older episodes?

Each older episode's learned probe answers (:func:`sleepray.rem_probes.older_probe_targets`)
are asked again; an episode more than ``rem.retention_tolerance`` below the model before
the sleep is its floor (:func:`below_floor`). REM first rehearses the forgotten beside
the new episode (:func:`sleepray.rem.repair_forgetting`, ``rem.repair_steps``), and past
that the expert is scaled down (:func:`shrink_to_retain`, ``rem.retention_scales``).
"""
from __future__ import annotations

import logging
from typing import Sequence

from sleepray.rem_probes import ProbeTarget, accuracy_by_episode, probe_hits

log = logging.getLogger(__name__)

__all__ = ["below_floor", "shrink_to_retain"]


def shrink_to_retain(bank, tok, older: list[ProbeTarget], floors: dict[str, float], scales: Sequence[float],
                     accuracy: dict[str, float], max_new_tokens: int = 12) -> tuple[float, dict[str, float]]:
    """Scale the training expert's weight delta down, by each of ``scales`` in turn (largest
    first), until every older episode's accuracy on its probe answers is back to its floor
    (``floors``: episode -> accuracy); returns (the scale kept, the accuracies by episode).
    ``accuracy`` is the unscaled expert's; with every episode at its floor nothing changes.
    When no scale reaches it, the smallest one stays (0: this sleep leaves the model as it was)."""
    if not below_floor(floors, accuracy) or not scales:
        return 1.0, accuracy
    current = 1.0
    for s in sorted(set(scales), reverse=True):
        bank.scale_training(s / current)  # current > 0: 0, the smallest, comes last
        current = s
        accuracy = accuracy_by_episode(older, probe_hits(bank, tok, older, max_new_tokens))
        log.info("REM: new expert scaled by %.2f; older episodes below their floor: %s", s,
                 below_floor(floors, accuracy) or "none")
        if not below_floor(floors, accuracy):
            break
    return current, accuracy


def below_floor(floors: dict[str, float], accuracy: dict[str, float]) -> list[str]:
    """The episodes whose accuracy is below their floor."""
    return [e for e, f in floors.items() if accuracy.get(e, 1.0) < f]
