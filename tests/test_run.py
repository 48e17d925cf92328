"""`sleepray run` end to end on the test seed model: the numbers it prints are real."""
import re

from sleepray.cli import main
from sleepray.config import load_config
from sleepray.models import load_model
from sleepray.qa import evaluate_probes
from sleepray.stream import episodes_from_config


def test_run_prints_before_and_after_a_sleep(tmp_path, capsys, seed_test_model):
    args = ["-c", "examples/quick.yaml", f"cycle.storage={tmp_path}", "world.n_episodes=1",
            "nrem.steps=6", "nrem.judge=exact"]
    assert main(["run", *args]) == 0
    out = capsys.readouterr().out
    assert "truth" in out and "after sleep" in out and "consolidated into" in out
    printed = re.search(r"accuracy: in context ([0-9.]+), closed book ([0-9.]+), closed book after sleep", out)
    assert printed, out
    cfg = load_config(args[1], args[2:])
    ep = episodes_from_config(cfg.world)[0]
    model, tok = load_model(str(seed_test_model))
    assert float(printed.group(1)) == round(evaluate_probes(model, tok, ep.probes, ep.context).accuracy, 2)
    assert float(printed.group(2)) == round(evaluate_probes(model, tok, ep.probes, None).accuracy, 2)
    assert list(tmp_path.glob("run-*/adapters/v0001/lineage.json"))
