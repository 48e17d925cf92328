"""The seed model: a small Llama pretrained to read facts from its context.

``build_seed(profile)`` trains a BPE tokenizer on world and general text, pretrains a
small Llama on "documents -> questions -> answers" examples from fresh random worlds,
evaluates it on held-out worlds (in-context vs closed-book) and saves a Hugging Face
folder (safetensors + tokenizer) that transformers, PEFT and vLLM load.
``seed_path(profile)`` is the model shipped in ``seed_models/`` for the current recipe
(checked against its checksums on first use), else a build cached per machine.
"""
from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sleepray import pretrain_data
from sleepray.checksum import file_sha256
from sleepray.pretrain_data import EVAL_WORLD_SEED_MIN, Shape
from sleepray.qa import evaluate_probes
from sleepray.storage import atomic_path
from sleepray.tokenizer import train_tokenizer
from sleepray.world import World, chance_accuracy, probes_of

log = logging.getLogger(__name__)
SEED_VERSION = 3  # 2: loss on the questions too (question_weight), so the model writes its own;
                  # 3: pretraining-only question paraphrases (Shape.p_paraphrase, sleepray.paraphrases)


@dataclass
class Profile:
    name: str
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    shape: Shape = field(default_factory=Shape)
    eval_world: dict = field(default_factory=dict)  # World kwargs of the held-out evaluation
    eval_episodes: int = 4
    max_position: int = 1024
    doc_weight: float = 1.0  # loss weight of document tokens (answers weigh 4)
    question_weight: float = 1.0  # loss weight of question tokens: the model learns to write questions


PROFILES = {
    # one person per context, for tests: about 2.5 minutes on 2 cores
    "test": Profile("test", vocab_size=2048, hidden=128, layers=2, heads=2, intermediate=384,
                    steps=800, batch_size=32, seq_len=128, lr=2e-3,
                    shape=Shape(max_people=1, max_orgs=0, max_places=0, max_phrasings=1, questions=12,
                                p_partial=1.0, p_general=0.0),  # paraphrases cost it reading (1.0 -> 0.73)
                    eval_world=dict(people_per_episode=1, orgs_per_episode=0, places_per_episode=0,
                                    phrasings_per_fact=1), eval_episodes=8),
    # a person and a place per episode (the default world), every fact twice: the embedded default.
    # One example in eight is general text, so that it stays a language model of general text
    # too and perplexity drift on held-out general text means something; one in five of the
    # rest is a dream (REM's formats), so that it can dream; one in five reads a whole episode.
    "small": Profile("small", vocab_size=2048, hidden=192, layers=2, heads=3, intermediate=576,
                     steps=2800, batch_size=32, seq_len=224, lr=2e-3,
                     shape=Shape(max_people=1, max_orgs=0, max_places=1, max_phrasings=2, questions=12,
                                 p_partial=0.8, p_general=0.125, p_dream=0.2, p_paraphrase=0.5),
                     eval_world=dict(people_per_episode=1, orgs_per_episode=0, places_per_episode=1,
                                     phrasings_per_fact=2), eval_episodes=8),
}


def cache_root() -> Path:
    return Path(os.environ.get("SLEEPRAY_CACHE", Path.home() / ".cache" / "sleepray"))


def _lr_at(step: int, total: int, base: float, warmup: int = 30, decay_frac: float = 0.3) -> float:
    """Linear warmup, constant, then cosine down to 10% over the last ``decay_frac``."""
    if step < warmup:
        return base * (step + 1) / warmup
    start = int(total * (1 - decay_frac))
    if step < start:
        return base
    frac = (step - start) / max(1, total - start)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def make_model(p: Profile, tok):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=p.hidden, intermediate_size=p.intermediate,
        num_hidden_layers=p.layers, num_attention_heads=p.heads, num_key_value_heads=p.heads,
        max_position_embeddings=p.max_position, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        torch_dtype="float32")
    return LlamaForCausalLM(cfg)


def pretrain(model, tok, p: Profile, steps: int, seed: int, progress: bool = True) -> list[float]:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, betas=(0.9, 0.95), weight_decay=0.01)
    model.train()
    device = next(model.parameters()).device
    losses: list[float] = []
    bar = tqdm(range(steps), desc=f"pretrain seed:{p.name}", disable=not progress)
    for step in bar:
        b = pretrain_data.batch(tok, rng, p.shape, p.batch_size, p.seq_len, doc_weight=p.doc_weight,
                                question_weight=p.question_weight)
        b = {k: v.to(device) for k, v in b.items()}
        w = b["weights"][:, 1:]
        keep = w > 0  # the LM head runs only where the loss looks
        hidden = model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        logits = model.lm_head(hidden[:, :-1][keep])
        lp = torch.nn.functional.cross_entropy(logits, b["input_ids"][:, 1:][keep], reduction="none")
        loss = (lp * w[keep]).sum() / w[keep].sum()
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, p.lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    model.eval()
    return losses


def evaluate_seed(model, tok, p: Profile, world_seed: int = EVAL_WORLD_SEED_MIN) -> dict:
    """In-context and closed-book accuracy on held-out worlds the model never saw.

    ``in_context_accuracy``/``closed_book_accuracy`` (and ``chance_accuracy``, ``n_probes``):
    seen-phrasing questions; ``*_unseen``: the evaluation-only phrasing family.
    """
    world = World(seed=world_seed, **p.eval_world)
    acc: dict[str, list[float]] = {}
    probes = []
    for ep in world.episodes(p.eval_episodes):
        for phrasing, suffix in (("seen", ""), ("unseen", "_unseen")):
            eps = probes_of(ep.probes, phrasing)
            acc.setdefault("in_context_accuracy" + suffix, []).append(
                evaluate_probes(model, tok, eps, ep.context).accuracy)
            acc.setdefault("closed_book_accuracy" + suffix, []).append(
                evaluate_probes(model, tok, eps, None).accuracy)
        probes += probes_of(ep.probes, "seen")
    return {**{k: sum(v) / len(v) for k, v in acc.items()},
            "chance_accuracy": chance_accuracy(probes), "n_probes": len(probes),
            "eval_world_seed": world_seed, "eval_world": p.eval_world}


def build_seed(profile: str, out_dir: str | Path, steps: int | None = None, seed: int = 0,
               progress: bool = True, device: str = "cpu") -> dict:
    """Build the seed model into ``out_dir``; return its report (also saved as seed_report.json)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown seed profile '{profile}' (choose from {sorted(PROFILES)})")
    p = PROFILES[profile]
    torch.set_num_threads(int(os.environ.get("SLEEPRAY_THREADS", os.cpu_count() or 1)))
    t0 = time.time()
    log.info("training tokenizer (vocab %d)", p.vocab_size)
    tok = train_tokenizer(pretrain_data.tokenizer_corpus(seed, 3000, 1500), p.vocab_size)
    model = make_model(p, tok).to(device)
    n_params = sum(x.numel() for x in model.parameters())
    log.info("pretraining %s: %.2fM parameters, %d steps", profile, n_params / 1e6, steps or p.steps)
    losses = pretrain(model, tok, p, steps or p.steps, seed, progress)
    train_s = time.time() - t0
    metrics = evaluate_seed(model, tok, p)
    model.to("cpu")
    report = {"profile": profile, "version": SEED_VERSION, "parameters": n_params,
              "steps": steps or p.steps, "seed": seed, "final_loss": sum(losses[-50:]) / len(losses[-50:]),
              "train_seconds": round(train_s, 1), "build_seconds": round(time.time() - t0, 1),
              "device": str(device), "profile_config": asdict(p), **metrics}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "seed_report.json").write_text(json.dumps(report, indent=2))
    write_checksums(out)
    log.info("seed:%s built in %.0fs: in-context %.2f, closed-book %.2f (chance %.3f)", profile,
             report["build_seconds"], report["in_context_accuracy"], report["closed_book_accuracy"],
             report["chance_accuracy"])
    return report


def profile_hash(profile: str) -> str:
    """A short hash of everything that shapes the build, so a changed recipe is rebuilt."""
    import hashlib
    blob = json.dumps([SEED_VERSION, asdict(PROFILES[profile])], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


SHIPPED_DIR = Path(__file__).resolve().parent / "seed_models"
_VERIFIED: set = set()  # shipped folders checked in this process
CHECKSUMS = "SHA256SUMS"


def write_checksums(folder: Path) -> Path:
    """``SHA256SUMS`` (``sha256sum`` format) of every file of a built seed model."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.name != CHECKSUMS)
    out = Path(folder) / CHECKSUMS
    out.write_text("".join(f"{file_sha256(p)}  {p.name}\n" for p in files))
    return out


def verify_seed_dir(folder: Path, profile: str) -> list[str]:
    """What is wrong with a seed model folder for ``profile`` (empty: it is that recipe's build,
    intact): the checksums, the report's recipe, version and hash."""
    folder = Path(folder)
    problems = []
    sums = folder / CHECKSUMS
    if not sums.is_file():
        return [f"{folder}: no {CHECKSUMS}"]
    listed = {}
    for line in sums.read_text().splitlines():
        if "  " not in line:
            problems.append(f"{CHECKSUMS}: malformed line {line[:60]!r}")
            continue
        digest, name = line.split("  ", 1)
        listed[name] = digest
        if not (folder / name).is_file():
            problems.append(f"{name}: missing")
        elif file_sha256(folder / name) != digest:
            problems.append(f"{name}: checksum differs")
    for name in ("config.json", "model.safetensors", "seed_report.json"):
        if name not in listed:
            problems.append(f"{name}: not in {CHECKSUMS}")
    if (folder / "seed_report.json").is_file():
        report = json.loads((folder / "seed_report.json").read_text())
        if report.get("version") != SEED_VERSION:
            problems.append(f"report version {report.get('version')} != {SEED_VERSION}")
        if report.get("profile_config") != json.loads(json.dumps(asdict(PROFILES[profile]))):
            problems.append("the report's recipe differs from PROFILES[profile]")
    if folder.name != folder_name(profile):
        problems.append(f"folder name {folder.name} does not match the recipe hash {profile_hash(profile)}")
    return problems


def folder_name(profile: str) -> str:
    """A seed model's folder name: profile, version and recipe hash (shipped and cached alike)."""
    return f"seed-{profile}-v{SEED_VERSION}-{profile_hash(profile)}"


def shipped_path(profile: str) -> Path | None:
    """The seed model shipped with the package for ``profile``'s current recipe, if any."""
    d = SHIPPED_DIR / folder_name(profile)
    return d if (d / "seed_report.json").is_file() else None


def seed_path(profile: str, progress: bool = True) -> Path:
    """The seed model folder for ``profile``: the one shipped with the package (``seed_models/``)
    when it matches the recipe, else a cached build, built on first use (one builder at a time)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown seed profile '{profile}' (choose from {sorted(PROFILES)})")
    shipped = shipped_path(profile)
    if shipped is not None and not os.environ.get("SLEEPRAY_NO_SHIPPED_SEED"):
        if shipped not in _VERIFIED:
            problems = verify_seed_dir(shipped, profile)
            if problems:
                raise ValueError(f"the shipped seed model {shipped} is damaged: {'; '.join(problems[:5])}. "
                                 "Reinstall sleepray, or set SLEEPRAY_NO_SHIPPED_SEED=1 to build one")
            _VERIFIED.add(shipped)
        return shipped
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    final = root / folder_name(profile)
    if (final / "seed_report.json").exists():
        return final
    with open(root / f".seed-{profile}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "seed_report.json").exists():
            return final
        with atomic_path(final) as tmp:
            build_seed(profile, tmp, progress=progress)
    return final
