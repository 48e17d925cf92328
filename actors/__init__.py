"""Ray actors (Coordinator, MemoryStore, RolloutWorker, Learner, AwakeModel).

Thin hosts around the library in ``sleepray/``; importable from an installed checkout
and from a ``ray job submit --working-dir .`` upload.
"""
