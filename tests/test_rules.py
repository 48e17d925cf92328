import random

import pytest

from sleepray.rules import RULES, Task, apply_rule, get_rule, make_task, render_prompt, sample_rule

# hand-computed: every registered rule on "hello"
EXPECTED_HELLO = {
    "reverse": "olleh",
    "rotate_left_1": "elloh",
    "rotate_left_2": "llohe",
    "rotate_right_1": "ohell",
    "rotate_right_2": "lohel",
    "uppercase": "HELLO",
    "duplicate_chars": "hheelllloo",
    "sort_chars": "ehllo",
    "drop_vowels": "hll",
    "caesar_1": "ifmmp",
    "caesar_2": "jgnnq",
    "caesar_13": "uryyb",
    "swap_first_last": "oellh",
    "append_xy": "helloxy",
    "append_q": "helloq",
}


def test_every_rule_has_a_hand_computed_expectation():
    assert set(RULES) == set(EXPECTED_HELLO)


@pytest.mark.parametrize("name", sorted(EXPECTED_HELLO))
def test_rule_on_known_input(name):
    assert RULES[name]("hello") == EXPECTED_HELLO[name]
    assert apply_rule(name, "hello") == EXPECTED_HELLO[name]


def test_rule_edge_cases():
    assert apply_rule("caesar_2", "xyz") == "zab"           # wraps around
    assert apply_rule("caesar_1", "AZ") == "BA"             # keeps case
    assert apply_rule("rotate_left_2", "ab") == "ab"
    assert apply_rule("swap_first_last", "a") == "a"
    assert apply_rule("drop_vowels", "AbE") == "b"


def test_composition_applies_left_to_right():
    assert apply_rule("reverse+caesar_1", "abc") == "dcb"
    assert apply_rule("append_q+reverse", "ab") == "qba"
    assert apply_rule("reverse+append_q", "ab") == "baq"
    assert apply_rule("drop_vowels+duplicate_chars", "hello") == "hhllll"
    with pytest.raises(KeyError, match="nope"):
        get_rule("reverse+nope")


def test_sample_rule_valid_and_deterministic():
    names = [sample_rule(random.Random(s)) for s in range(200)]
    assert names == [sample_rule(random.Random(s)) for s in range(200)]
    assert any("+" in n for n in names) and any("+" not in n for n in names)
    for n in names:
        get_rule(n)  # parses
        if "+" in n:
            a, b = n.split("+")
            assert a != b
            assert any(apply_rule(n, p) != p for p in ["abcde", "hello", "zyxwv"])


def test_make_task_consistent_and_deterministic():
    for seed in range(50):
        t = make_task(random.Random(seed), k=4)
        assert t == make_task(random.Random(seed), k=4)
        assert len(t.examples) == 4
        fn = get_rule(t.rule)
        for i, o in t.examples:
            assert i.isalpha() and i.islower() and 3 <= len(i) <= 6
            assert fn(i) == o and o
        assert t.answer == fn(t.query) and t.answer
        assert t.query not in [i for i, _ in t.examples]
    assert make_task(random.Random(1), 3) != make_task(random.Random(2), 3)


def test_make_task_with_given_rule():
    t = make_task(random.Random(0), k=2, rule="reverse")
    assert t.rule == "reverse" and t.answer == t.query[::-1]


def test_render_prompt():
    t = Task("reverse", [("abc", "cba"), ("xy", "yx")], "dog", "god")
    assert render_prompt(t) == "Examples:\nabc -> cba\nxy -> yx\nInput: dog\nOutput:"
    assert "god" not in render_prompt(t)
