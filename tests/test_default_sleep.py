"""A DEFAULT sleep (NREM with LTI, then REM) on the `test` seed model raises closed-book accuracy
on the episodes it consolidated, and in-process sleeps are reproducible.

The config is ``sleepray.config.Config``'s defaults except (each for a stated reason):

* ``model.path=seed:test``: the shipped tiny model the tests use (the default `seed:small`
  is twice as large and pretrained on a person AND a place per episode);
* ``world.seed`` = a dev world (``sleepray.splits``: the range where settings may be looked at);
* ``world.n_episodes=2`` (default 5) and ``world.places_per_episode=0`` (default 1): a small
  world; the `test` seed model is pretrained to read one person per episode, no places;
* ``nrem.judge=exact`` (default ``embedding``): LTI stays ON, only its reward judge changes;
  the MiniLM embedding judge made one sleep take over 5 CPU-minutes on 2 cores instead of ~1.

Everything else (100 NREM steps, 48 prompts per episode, LTI, REM with dreams, trials,
ReST-EM, replay, SFT, retention check) is the default. Measured closed book over the 2 episodes'
48 questions, before -> after one sleep: dev world 10600001 (this test) 0.00 -> 0.35 (seen
phrasing 0.00 -> 0.58, unseen 0.00 -> 0.12); 10600002 0.00 -> 0.38 (0.00 -> 0.62, 0.00 -> 0.12);
10600000 with world.phrasings_per_fact=1 0.02 -> 0.38.
"""
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from sleepray.config import load_config
from sleepray.memory import MemoryStore
from sleepray.models import load_model, resolve_model_path
from sleepray.qa import evaluate_probes
from sleepray.splits import dev_world
from sleepray.world import World

WORLD = dev_world(1)
CHANGED = ["model.path=seed:test", f"world.seed={WORLD}", "world.n_episodes=2",
           "world.places_per_episode=0", "nrem.judge=exact"]


def _cfg(storage, *extra):
    return load_config(None, [*CHANGED, f"cycle.storage={storage}", *extra])


def _episodes(cfg):
    return World.from_config(cfg.world).episodes(cfg.world.n_episodes)


def _closed_book(model, tok, episodes) -> dict:
    probes = [p for e in episodes for p in e.probes]
    out = {"all": evaluate_probes(model, tok, probes, None).accuracy}
    for ph in ("seen", "unseen"):
        out[ph] = evaluate_probes(model, tok, [p for p in probes if p.phrasing == ph], None).accuracy
    return out


def _published(storage) -> list:
    return sorted(p for p in (storage / "adapters").iterdir() if p.is_dir() and p.name[0] == "v")


def test_a_default_sleep_raises_closed_book_accuracy(tmp_path, seed_test_model):
    from sleepray.sleep import sleep_full
    cfg = _cfg(tmp_path)
    defaults = load_config(None, [])
    # LTI and REM are on, as by default; NREM and REM run their default lengths
    assert cfg.nrem.use_lti and cfg.nrem.lam == defaults.nrem.lam and cfg.rem.enabled
    assert (cfg.nrem.steps, cfg.rem.sft_steps, cfg.rem.restem_steps) == (
        defaults.nrem.steps, defaults.rem.sft_steps, defaults.rem.restem_steps)
    episodes = _episodes(cfg)
    MemoryStore(tmp_path / "memory").append(episodes)   # documents only: probes never enter memory
    base, tok = load_model(resolve_model_path(cfg.model.path))
    before = _closed_book(base, tok, episodes)
    version = sleep_full(cfg, tmp_path, progress=False)
    assert version is not None and _published(tmp_path) == [version]
    after = _closed_book(PeftModel.from_pretrained(load_model(resolve_model_path(cfg.model.path))[0],
                                                   str(version)).eval(), tok, episodes)
    # measured on this world: all 0.00 -> 0.35 (48 questions), seen 0.00 -> 0.58, unseen 0.00 -> 0.12
    assert after["all"] >= before["all"] + 0.2, (before, after)
    assert after["seen"] >= before["seen"] + 0.3, (before, after)
    assert after["unseen"] >= before["unseen"], (before, after)


def test_two_nrem_sleeps_with_the_same_seed_write_identical_adapters(tmp_path, seed_test_model):
    """Reproducibility, on the NREM-only sleep with few steps (two full default sleeps would
    double the runtime of this file)."""
    from sleepray.sleep import sleep_nrem
    tensors = []
    for run in ("a", "b"):
        storage = tmp_path / run
        cfg = _cfg(storage, "nrem.steps=4", "nrem.batch_size=4", "nrem.prompts_per_episode=8")
        MemoryStore(storage / "memory").append(_episodes(cfg))
        version = sleep_nrem(cfg, storage, progress=False)
        assert version is not None and version.name == "v0001"
        tensors.append(load_file(str(version / "adapter_model.safetensors")))
    a, b = tensors
    assert a and set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and the sleep did train: the experts' B tensors are no longer zero
    assert any(k.endswith("lora_B.weight") and a[k].abs().max() > 0 for k in a)
