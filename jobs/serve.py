"""The awake endpoint on Ray Serve: ``python -m jobs.serve --config FILE [KEY=VALUE ...]``.

Runs until interrupted (``ray job stop`` / Ctrl-C); see ``sleepray serve --help``.
"""
import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
