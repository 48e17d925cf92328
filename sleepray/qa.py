"""Answering probe questions and scoring the answers (normalised exact match, token F1)."""
from __future__ import annotations

import itertools
import re
import string
from collections import Counter
from dataclasses import dataclass

import torch

from sleepray.prompt_format import format_of, stop_token_ids
from sleepray.world import Probe

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


@torch.no_grad()
def generate_answers(model, tok, prompts: list[str], max_new_tokens: int = 12,
                     batch_size: int = 32) -> list[str]:
    """Greedy answers with a transformers model, each cut at the tokenizer's format's stop
    strings (``sleepray.prompt_format``: the first newline for plain prompts)."""
    model.eval()
    device = next(model.parameters()).device
    old_side = tok.padding_side
    tok.padding_side = "left"
    fmt = format_of(tok)
    stop_ids, stop_texts = stop_token_ids(tok, fmt.stop)
    extra = {"stop_strings": stop_texts, "tokenizer": tok} if stop_texts else {}
    out: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tok(prompts[i: i + batch_size], return_tensors="pt", padding=True).to(device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id,
                                 eos_token_id=[tok.eos_token_id] + stop_ids, **extra)
            for row in gen[:, enc["input_ids"].shape[1]:].tolist():
                out.append(_answer(tok, fmt, row, stop_ids))
    finally:
        tok.padding_side = old_side
    return out


def _answer(tok, fmt, row: list[int], stop_ids: list[int]) -> str:
    if fmt.chat:   # up to the end of the turn (special tokens would vanish in the decoded text)
        ends = {tok.eos_token_id, tok.pad_token_id, *stop_ids}
        row = list(itertools.takewhile(lambda t: t not in ends, row))
    return fmt.cut(tok.decode(row, skip_special_tokens=True))


@dataclass
class QAResult:
    accuracy: float
    f1: float
    answers: list[str]


def evaluate_probes(model, tok, probes: list[Probe], context: str | None,
                    max_new_tokens: int = 12) -> QAResult:
    """Accuracy on probes, with ``context`` in the prompt (in-context) or without (closed-book)."""
    fmt = format_of(tok)
    prompts = [fmt.question(p.question, context) for p in probes]
    answers = generate_answers(model, tok, prompts, max_new_tokens)
    em = [exact_match(a, p.answer) for a, p in zip(answers, probes)]
    f1 = [token_f1(a, p.answer) for a, p in zip(answers, probes)]
    n = max(1, len(probes))
    return QAResult(sum(em) / n, sum(f1) / n, answers)
