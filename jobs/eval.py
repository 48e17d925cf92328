"""The continual-learning benchmark as a job entry point (runs in the job's driver process).

    python -m jobs.eval --config examples/eval_standard.yaml --out runs/eval_standard [KEY=VALUE ...]
    ray job submit --working-dir . -- python -m jobs.eval --config examples/eval_quick.yaml --out runs/eval

Same as ``sleepray eval``; see ``sleepray/eval_run.py`` for what it writes.
"""
import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
