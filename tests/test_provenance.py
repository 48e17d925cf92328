"""Every results file records where it came from: revision, command, seeds, world seeds."""
import subprocess
import sys

from sleepray import provenance as P
from sleepray.splits import dev_world, world_split
from sleepray.splits import test_world as _test_world


def test_provenance_names_revision_command_and_seeds(monkeypatch):
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=P._ROOT, capture_output=True, text=True).stdout.strip()
    rec = P.provenance([0, 1, 2], [_test_world(5)], argv=["prog", "--seeds", "0,1,2"])
    assert rec["revision"] in (head, head + "-dirty")
    assert rec["seeds"] == [0, 1, 2] and rec["world_seeds"] == [_test_world(5)] and rec["world_split"] == ["test"]
    assert "--seeds 0,1,2" in rec["command"] and rec["created_at"]


def test_a_copied_tree_takes_its_revision_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SLEEPRAY_REVISION", "abc123")
    assert P.git_revision(tmp_path) == "abc123"
    assert P.git_revision() == "abc123"  # it wins over a .git that need not be the code that runs
    monkeypatch.delenv("SLEEPRAY_REVISION")
    assert P.git_revision(tmp_path) is None


def test_a_job_run_with_dash_m_is_recorded_as_typed(tmp_path):
    code = "import json, sys; from sleepray.provenance import command_line; print(command_line())"
    (tmp_path / "probe_cmd.py").write_text(code)
    out = subprocess.run([sys.executable, "-m", "probe_cmd", "--split", "test"], capture_output=True, text=True,
                         cwd=tmp_path, env={**__import__("os").environ, "PYTHONPATH": str(P._ROOT)})
    assert out.stdout.strip() == "python -m probe_cmd --split test", out.stderr


def test_world_splits_are_disjoint():
    assert world_split(dev_world(3)) == "dev" and world_split(_test_world(3)) == "test"
    assert world_split(5) == "pretrain" and world_split(10_000_900) == "other"


def test_parts_measured_at_different_revisions_are_not_one_measurement():
    import pytest
    assert P.common_revision([{"revision": "a"}, {"revision": "a"}, None]) == "a"
    assert P.common_revision([None, {}]) is None
    with pytest.raises(ValueError, match="different revisions"):
        P.common_revision([{"revision": "a"}, {"revision": "b"}])
