"""Build the seed model: ``python -m jobs.seed --profile small [--out DIR]``.

Runs the same code as ``sleepray seed``; as a Ray job it builds on the node the job
driver lands on.
"""
import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["seed", *sys.argv[1:]]))
