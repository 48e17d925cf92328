"""Answering probe questions and scoring the answers (normalised exact match, token F1)."""
from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass

import torch

from sleepray.world import Probe, qa_prompt

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize(text: str) -> str:
    text = _PUNCT.sub(" ", text.lower())
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(pred: str, gold: str) -> float:
    return float(normalize(pred) == normalize(gold))


def token_f1(pred: str, gold: str) -> float:
    p, g = normalize(pred).split(), normalize(gold).split()
    common = sum((Counter(p) & Counter(g)).values())
    if not p or not g or common == 0:
        return float(p == g)
    prec, rec = common / len(p), common / len(g)
    return 2 * prec * rec / (prec + rec)


def first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0].strip()


@torch.no_grad()
def generate_answers(model, tok, prompts: list[str], max_new_tokens: int = 12,
                     batch_size: int = 32) -> list[str]:
    """Greedy answers (first line of the continuation) with a transformers model."""
    model.eval()
    device = next(model.parameters()).device
    old_side = tok.padding_side
    tok.padding_side = "left"
    newline = tok.encode("\n", add_special_tokens=False)
    out: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tok(prompts[i: i + batch_size], return_tensors="pt", padding=True).to(device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id,
                                 eos_token_id=[tok.eos_token_id] + newline[-1:])
            for row in gen[:, enc["input_ids"].shape[1]:]:
                out.append(first_line(tok.decode(row, skip_special_tokens=True)))
    finally:
        tok.padding_side = old_side
    return out


@dataclass
class QAResult:
    accuracy: float
    f1: float
    answers: list[str]


def evaluate_probes(model, tok, probes: list[Probe], context: str | None,
                    max_new_tokens: int = 12) -> QAResult:
    """Accuracy on probes, with ``context`` in the prompt (in-context) or without (closed-book)."""
    prompts = [qa_prompt(p.question, context) for p in probes]
    answers = generate_answers(model, tok, prompts, max_new_tokens)
    em = [exact_match(a, p.answer) for a, p in zip(answers, probes)]
    f1 = [token_f1(a, p.answer) for a, p in zip(answers, probes)]
    n = max(1, len(probes))
    return QAResult(sum(em) / n, sum(f1) / n, answers)
