"""sleepray: language models that sleep.

Awake, the model serves and keeps what it learns in its context (short-term memory).
Asleep, it moves that knowledge into fresh low-rank experts (NREM: Knowledge Seeding)
and rehearses it with data it writes for itself (REM: Dreaming).
"""
__version__ = "0.1.0"

from sleepray.envs import register_envs  # noqa: E402

register_envs()
