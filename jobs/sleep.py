"""One sleep now over ``cycle.storage``: ``python -m jobs.sleep --config FILE [KEY=VALUE ...]``."""
import sys

from jobs.cli import main

if __name__ == "__main__":
    sys.exit(main(["sleep", *sys.argv[1:]]))
