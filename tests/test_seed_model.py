"""The seed models: shipped with the package (checked against their recipe), read by
transformers and by vLLM."""
import json
import subprocess
import sys
from pathlib import Path

import torch

from sleepray.models import load_model, resolve_model_path
from sleepray.qa import evaluate_probes
from sleepray.world import World, probes_of

HERE = Path(__file__).parent


def test_seed_model_reads_facts_from_context(seed_test_report):
    r = seed_test_report
    # held-out entities: with their documents in context the model answers ...
    assert r["in_context_accuracy"] >= 0.6, r
    # ... closed-book it cannot (near chance)
    assert r["closed_book_accuracy"] <= r["chance_accuracy"] + 0.1, r
    assert r["eval_world_seed"] >= 10_000_000  # evaluation worlds are never used for pretraining


def test_shipped_seed_models_are_their_recipes_builds(tmp_path):
    """Both seed models ship with the package: checksums, recipe, version and hash agree, and
    seed_path uses them (no build). A changed recipe is no longer matched: it would be rebuilt."""
    import dataclasses
    import shutil

    from sleepray import seed
    for profile in ("test", "small"):
        d = seed.shipped_path(profile)
        assert d is not None and d.parent == seed.SHIPPED_DIR, f"seed:{profile} is not shipped"
        assert seed.verify_seed_dir(d, profile) == []
        assert seed.seed_path(profile) == d
        report = json.loads((d / "seed_report.json").read_text())
        assert report["version"] == seed.SEED_VERSION and report["in_context_accuracy"] >= 0.6
    # the check can fail: a flipped byte, a changed recipe
    copy = tmp_path / seed.shipped_path("test").name
    shutil.copytree(seed.shipped_path("test"), copy)
    raw = bytearray((copy / "model.safetensors").read_bytes())
    raw[-1] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(raw))
    assert seed.verify_seed_dir(copy, "test") == ["model.safetensors: checksum differs"]
    with open(copy / seed.CHECKSUMS, "a") as f:
        f.write("not a checksum line\n")
    assert "SHA256SUMS: malformed line 'not a checksum line'" in seed.verify_seed_dir(copy, "test")
    old = seed.PROFILES["test"]
    try:
        seed.PROFILES["test"] = dataclasses.replace(old, steps=old.steps + 1)
        assert seed.shipped_path("test") is None
        assert "the report's recipe differs from PROFILES[profile]" in seed.verify_seed_dir(
            seed.SHIPPED_DIR / copy.name, "test")
    finally:
        seed.PROFILES["test"] = old


def test_seed_folder_is_a_plain_hf_model(seed_test_model):
    files = {p.name for p in seed_test_model.iterdir()}
    assert "model.safetensors" in files and "config.json" in files and "tokenizer.json" in files
    assert not any(f.endswith(".bin") for f in files)
    assert resolve_model_path("seed:test") == str(seed_test_model)


def test_report_is_reproduced_by_a_fresh_load(seed_test_model, seed_test_report):
    """The numbers in seed_report.json are what the saved weights really do."""
    from sleepray.seed import PROFILES
    model, tok = load_model(str(seed_test_model))
    p = PROFILES["test"]
    world = World(seed=seed_test_report["eval_world_seed"], **p.eval_world)
    ep = world.episode(0)
    seen = probes_of(ep.probes, "seen")
    ic = evaluate_probes(model, tok, seen, ep.context).accuracy
    cb = evaluate_probes(model, tok, seen, None).accuracy
    assert ic > cb
    assert ic >= 0.5


def test_vllm_loads_and_generates_like_transformers(seed_test_model, tmp_path):
    model, tok = load_model(str(seed_test_model))
    ep = World(seed=10_000_001, **__import__("sleepray.seed", fromlist=["PROFILES"]).PROFILES["test"].eval_world).episode(0)
    prompts = [ep.context + "\nQ: " + p.question + "\nA:" for p in ep.probes[:4]]
    (tmp_path / "in.json").write_text(json.dumps({"prompts": prompts, "max_tokens": 6}))
    proc = subprocess.run([sys.executable, str(HERE / "vllm_generate.py"), str(seed_test_model),
                           str(tmp_path / "in.json"), str(tmp_path / "out.json")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert len(out) == 4
    for prompt, o in zip(prompts, out):
        assert len(o["token_ids"]) > 0
        # same greedy tokens and the same log-probs as a transformers forward pass
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        gen = torch.tensor([o["token_ids"]])
        with torch.no_grad():
            logits = model(torch.cat([ids, gen], 1)).logits[0, ids.shape[1] - 1: -1]
        lp = torch.log_softmax(logits.float(), -1)
        assert lp.argmax(-1).tolist() == o["token_ids"]
        ref = lp.gather(1, gen[0][:, None])[:, 0]
        assert torch.allclose(ref, torch.tensor(o["logprobs"]), atol=1e-3), (ref, o["logprobs"])
