"""The few-shot rules world: hidden transformations of short letter strings (ARC-like).

A task shows ``k`` examples of one hidden rule (``abc -> cba``) and asks for the rule
applied to a new input. Rules are the primitives in ``RULES`` or a composition of two,
named ``"a+b"`` (apply ``a`` first, then ``b``). Everything is deterministic given the
``random.Random`` passed in.
"""
from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Callable

Rule = Callable[[str], str]

VOWELS = set("aeiouAEIOU")


def _rotate_left(s: str, k: int) -> str:
    if not s:
        return s
    k %= len(s)
    return s[k:] + s[:k]


def _caesar(s: str, k: int) -> str:
    def shift(c: str) -> str:
        if c.islower():
            return chr((ord(c) - 97 + k) % 26 + 97)
        if c.isupper():
            return chr((ord(c) - 65 + k) % 26 + 65)
        return c
    return "".join(shift(c) for c in s)


# name -> function; every rule maps a string of letters to a string of letters
RULES: dict[str, Rule] = {
    "reverse": lambda s: s[::-1],
    "rotate_left_1": lambda s: _rotate_left(s, 1),
    "rotate_left_2": lambda s: _rotate_left(s, 2),
    "rotate_right_1": lambda s: _rotate_left(s, -1),
    "rotate_right_2": lambda s: _rotate_left(s, -2),
    "uppercase": str.upper,
    "duplicate_chars": lambda s: "".join(c * 2 for c in s),
    "sort_chars": lambda s: "".join(sorted(s)),
    "drop_vowels": lambda s: "".join(c for c in s if c not in VOWELS),
    "caesar_1": lambda s: _caesar(s, 1),
    "caesar_2": lambda s: _caesar(s, 2),
    "caesar_13": lambda s: _caesar(s, 13),
    "swap_first_last": lambda s: s if len(s) < 2 else s[-1] + s[1:-1] + s[0],
    "append_xy": lambda s: s + "xy",
    "append_q": lambda s: s + "q",
}


def get_rule(name: str) -> Rule:
    """The function of a rule name: a primitive, or ``"a+b"`` (a, then b)."""
    parts = name.split("+")
    unknown = [p for p in parts if p not in RULES]
    if unknown:
        raise KeyError(f"unknown rule(s) {unknown} in {name!r}; known: {sorted(RULES)}")
    fns = [RULES[p] for p in parts]

    def apply(s: str) -> str:
        for f in fns:
            s = f(s)
        return s
    return apply


def apply_rule(name: str, s: str) -> str:
    return get_rule(name)(s)


def random_input(rng: random.Random, min_len: int = 3, max_len: int = 6) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(min_len, max_len)))


# probe strings used to reject compositions that do nothing (reverse+reverse, ...)
_PROBES = ["abcde", "hello", "zyxwv", "qrstab"]


def sample_rule(rng: random.Random, p_compose: float = 0.3) -> str:
    """A hidden rule name: one primitive, or (with probability ``p_compose``) two composed."""
    names = sorted(RULES)
    if rng.random() >= p_compose:
        return rng.choice(names)
    while True:
        a, b = rng.choice(names), rng.choice(names)
        fn = get_rule(f"{a}+{b}")
        if a != b and any(fn(p) != p for p in _PROBES):
            return f"{a}+{b}"


@dataclass(frozen=True)
class Task:
    rule: str
    examples: list[tuple[str, str]]
    query: str
    answer: str


def make_task(rng: random.Random, k: int = 3, rule: str | None = None,
              p_compose: float = 0.3) -> Task:
    """``k`` example pairs of a hidden rule (sampled unless given), a query and its answer."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    rule = rule if rule is not None else sample_rule(rng, p_compose)
    fn = get_rule(rule)
    inputs: list[str] = []
    while len(inputs) < k + 1:
        s = random_input(rng)
        if s not in inputs and fn(s):  # distinct inputs, non-empty outputs
            inputs.append(s)
    examples = [(s, fn(s)) for s in inputs[:k]]
    query = inputs[k]
    return Task(rule, examples, query, fn(query))


def render_prompt(task: Task) -> str:
    lines = ["Examples:"] + [f"{i} -> {o}" for i, o in task.examples]
    return "\n".join(lines + [f"Input: {task.query}", "Output:"])
