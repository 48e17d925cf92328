"""A sleep on Ray's fake multi-node autoscaling cluster: worker nodes come up for the
sleep and go away after it.

The autoscaler and its node provider are Ray's own (``fake_multinode``: every "node" is a
real raylet on this machine); only the cloud behind them is simulated. Ray's
``AutoscalingCluster`` stops every Ray on the machine when it starts and stops, so this
module is marked ``isolated`` and runs in its own pytest process (see the Makefile).
"""
import os
import sys
import time
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import AutoscalingCluster

from actors import coordinator
from sleepray.config import load_config
from sleepray.memory import MemoryStore
from sleepray.world import World

pytestmark = pytest.mark.isolated


class FakeCloud(AutoscalingCluster):
    """``AutoscalingCluster`` with the fake provider's config written out here (the
    example YAML it reads is not shipped in the Ray wheel)."""

    def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **kw):
        types = dict(worker_node_types)
        types["ray.head.default"] = {"resources": dict(head_resources), "node_config": {}, "max_workers": 0}
        return {
            "cluster_name": "fake_multinode", "max_workers": 4,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                         "disable_node_updaters": True, "disable_launch_config_check": True},
            "available_node_types": types, "head_node_type": "ray.head.default", "auth": {},
            "upscaling_speed": 1.0, "idle_timeout_minutes": 0.1, "docker": {},
            "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": [], **kw}


def alive_nodes() -> int:
    return sum(1 for n in ray.nodes() if n["Alive"])


def test_worker_nodes_come_up_for_a_sleep_and_go_away_after(tmp_path, seed_test_model, monkeypatch):
    # AutoscalingCluster runs `ray start`/`ray stop` from PATH: this venv's
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    cloud = FakeCloud(head_resources={"CPU": 0},
                      worker_node_types={"cpu_worker": {"resources": {"CPU": 2}, "node_config": {},
                                                        "min_workers": 0, "max_workers": 2}})
    cloud.start()
    try:
        ray.init("auto", namespace="autoscale-test", log_to_driver=False)
        assert alive_nodes() == 1                    # the head only: it has no CPU to give
        cfg = load_config(None, [f"cycle.storage={tmp_path}", f"model.path={seed_test_model}",
                                 "ray.rollout_engine=transformers", "ray.release_between_sleeps=true",
                                 "nrem.judge=exact", "nrem.steps=4", "nrem.batch_size=4",
                                 "nrem.prompts_per_episode=4", "rem.enabled=false"])
        MemoryStore(tmp_path / "memory").append(World(6201, 1, 0, 0, 1).episodes(1))
        coord = coordinator.start(cfg, watch=False)
        ray.get(coord.request_sleep.remote("request"))
        peak = 1
        while ray.get(coord.status.remote())["phase"] != "wake" or peak == 1:
            peak = max(peak, alive_nodes())
            st = ray.get(coord.wait_idle.remote(1.0))
            if st["phase"] == "wake" and st["sleeps_done"]:
                break
        st = ray.get(coord.wait_idle.remote(600))
        assert st["error"] is None and st["adapter_version"] == "v0001"
        assert peak >= 2                              # a worker node came up for the sleep
        deadline = time.time() + 180
        while alive_nodes() > 1 and time.time() < deadline:
            time.sleep(2)
        assert alive_nodes() == 1                     # and went away once idle
        ray.get(coord.shutdown.remote())
    finally:
        ray.shutdown()
        cloud.shutdown()
