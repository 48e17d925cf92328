"""One sleep (NREM, NREM + REM) against SFT on the documents and SFT on the self-written Q/A,
over seeds, on dev or test worlds: writes JSON (with revision, command and world seeds).

python -m jobs.nrem_eval --config examples/default.yaml --seeds 0,1,2 --split test --out runs/nrem_eval.json [KEY=VALUE ...]
python -m jobs.nrem_eval --merge part0.json part1.json ... --out runs/nrem_eval.json
"""
import argparse
import json
import logging
from pathlib import Path

from sleepray.config import load_config
from sleepray.nrem_eval import evaluate_nrem, merge
from sleepray.splits import SPLITS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", "-c")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--split", choices=sorted(SPLITS), default="dev",
                    help="dev worlds to tune settings on, test worlds to report (default: dev)")
    ap.add_argument("--out", default="runs/nrem_eval.json")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="merge results of other seeds into --out")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.merge:
        result = merge([json.loads(Path(p).read_text()) for p in args.merge])
    else:
        cfg = load_config(args.config, args.overrides)
        result = evaluate_nrem(cfg, [int(s) for s in args.seeds.split(",")], args.split)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
