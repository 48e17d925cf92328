import json
import subprocess
import sys

import pytest

from jobs.cli import build_parser, main

SUBCOMMANDS = ["run", "seed", "config", "world", "memory", "sleep", "serve", "keys", "cycle", "bench", "eval"]


def test_every_subcommand_has_help(capsys):
    for name in SUBCOMMANDS:
        with pytest.raises(SystemExit) as ex:
            main([name, "--help"])
        assert ex.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: sleepray " + name)
    # the parser lists exactly the subcommands that exist
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(SUBCOMMANDS)


def test_keys_add_prints_the_key_once_and_stores_its_hash(tmp_path, capsys):
    from sleepray.tenants import key_hash, load_keys
    f = tmp_path / "keys.yaml"
    assert main(["keys", "add", "--file", str(f), "--tenant", "alice"]) == 0
    key = capsys.readouterr().out.split()[0]
    assert key.startswith("sr-") and key not in f.read_text() and load_keys(f)[key_hash(key)].tenant == "alice"
    assert main(["keys", "add", "-f", str(f), "--admin"]) == 0
    capsys.readouterr()
    assert main(["keys", "list", "-f", str(f)]) == 0
    out = capsys.readouterr().out
    assert "alice" in out and "(admin)" in out and key not in out
    assert main(["keys", "add", "-f", str(f)]) == 2            # neither --tenant nor --admin
    assert main(["keys", "add", "-f", str(f), "--tenant", "Bad Name"]) == 2
    assert "tenant name" in capsys.readouterr().err


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "seed" in out.stdout and "run" in out.stdout


def test_config_prints_validated_yaml(capsys):
    assert main(["config", "nrem.beta=0.25"]) == 0
    assert "beta: 0.25" in capsys.readouterr().out


def test_bad_config_is_a_clear_error(capsys):
    assert main(["config", "nrem.nope=1"]) == 2
    err = capsys.readouterr().err
    assert "nrem.nope: unknown key" in err


def test_world_jsonl(capsys):
    assert main(["world", "--jsonl", "--episodes", "2", "world.seed=7"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    rec = json.loads(lines[0])
    assert rec["episode_id"] == "w7-e0" and rec["documents"] and rec["probes"][0]["answer"]


def test_world_from_user_file(tmp_path, capsys):
    f = tmp_path / "mine.jsonl"
    f.write_text(json.dumps({"document": "Zed likes tea.", "episode": "a"}) + "\n"
                 + json.dumps({"question": "What does Zed like?", "answer": "tea", "episode": "a"}) + "\n")
    assert main(["world", "world.source=file", f"world.data_path={f}"]) == 0
    out = capsys.readouterr().out
    assert "Zed likes tea." in out and "What does Zed like?  ->  tea" in out
