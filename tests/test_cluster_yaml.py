"""cluster.yaml is a valid Ray cluster launcher config.

The config goes through the same steps `ray up` runs before it talks to the cloud:
`prepare_config` (merge with Ray's AWS defaults, check the docker section, fill in
per-type min/max workers) and `validate_config` (Ray's own JSON schema,
ray/autoscaler/ray-schema.json, plus its cross-field checks). Nothing is mocked and
no cloud is reached: both steps are offline. The provider-specific steps of `ray up`
that call AWS (resource autodetection, key pair / subnet / IAM bootstrap) are not run.
"""
import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"
GPU_TYPES = ("rollout_gpu", "learner_gpu")


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _prepared(config: dict) -> dict:
    """What `ray up` validates: the config merged with Ray's provider defaults."""
    return prepare_config(copy.deepcopy(config))


def test_ray_validation_passes(raw):
    prepared = _prepared(raw)
    validate_config(prepared)  # raises on any schema or cross-field error
    assert prepared["cluster_name"] == "sleepray"
    assert prepared["provider"]["type"] == "aws"
    assert prepared["provider"]["region"] == "us-west-2"
    assert prepared["provider"]["cache_stopped_nodes"] is False


def test_node_types(raw):
    types = raw["available_node_types"]
    head = raw["head_node_type"]
    assert set(types) == {head, "rollout_gpu", "learner_gpu", "cpu_worker"}
    # the head: real CPUs, no GPU, marked with the custom `head` resource
    assert types[head]["resources"].get("CPU", 0) > 0
    assert types[head]["resources"].get("GPU", 0) == 0
    assert types[head]["resources"].get("head") == 1

    workers = {name: t for name, t in types.items() if name != head}
    for name, t in workers.items():
        assert t["min_workers"] == 0, name
        assert t["max_workers"] > 0, name
        assert t["node_config"]["InstanceType"], name
    for name in GPU_TYPES:
        assert workers[name]["resources"].get("GPU", 0) >= 1, name
    assert workers["rollout_gpu"]["resources"]["rollout"] == 1
    assert workers["learner_gpu"]["resources"]["learner"] == 1
    assert workers["learner_gpu"]["resources"]["GPU"] > 1
    assert workers["cpu_worker"]["resources"].get("GPU", 0) == 0

    # the global cap allows every type to reach its own maximum
    assert raw["max_workers"] >= max(t["max_workers"] for t in workers.values())


def test_autoscaling_settings(raw):
    assert raw["idle_timeout_minutes"] > 0
    assert raw["upscaling_speed"] > 0


def test_docker_and_setup(raw):
    docker = raw["docker"]
    assert docker["image"] == "rayproject/ray:2.60.0-py311-gpu"
    assert docker["container_name"]
    assert docker["pull_before_run"] is True
    assert any(opt.startswith("--shm-size") for opt in docker["run_options"])

    assert raw["file_mounts"]["~/sleepray"] == "."
    installs = [c for c in raw["setup_commands"] if "pip install" in c]
    assert any("sleepray" in c and "[gpu]" in c for c in installs), installs

    head_start = " ".join(raw["head_start_ray_commands"])
    assert "ray start --head --port=6379" in head_start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    worker_start = " ".join(raw["worker_start_ray_commands"])
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker_start


def test_token_auth_wiring(raw):
    """Ray's documented `ray up` recipe: ship the local token, RAY_AUTH_MODE=token everywhere."""
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in raw[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), key
    assert "--env RAY_AUTH_MODE=token" in raw["docker"]["run_options"]


# --- the validator really runs: broken copies are rejected --------------------------


def test_bogus_top_level_key_fails(raw):
    bad = copy.deepcopy(raw)
    bad["bogus_key"] = 1
    with pytest.raises(jsonschema.ValidationError, match="bogus_key"):
        validate_config(_prepared(bad))


def test_node_type_without_node_config_fails(raw):
    bad = copy.deepcopy(raw)
    del bad["available_node_types"]["rollout_gpu"]["node_config"]
    with pytest.raises(jsonschema.ValidationError, match="node_config"):
        validate_config(_prepared(bad))


def test_unknown_head_node_type_fails(raw):
    bad = copy.deepcopy(raw)
    bad["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(_prepared(bad))
