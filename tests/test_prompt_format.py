"""Prompt formats: chat templates for teacher and student alike, answers of any length.

The chat tokenizers here are the seed model's tokenizer given the chat templates of real
model families (the templates are written out below in their published form, shortened to
what a user/system/assistant turn needs): no tokenizer can be downloaded on this machine.
"""
import random

import pytest
from transformers import AutoTokenizer

from sleepray.config import ModelConfig
from sleepray.models import load_model, resolve_model_path
from sleepray.prompt_format import PLAIN, attach, format_of, make_format
from sleepray.prompts import consolidation_prompts
from sleepray.qa import evaluate_probes, generate_answers
from sleepray.sampling import sample_ids
from sleepray.world import World, qa_prompt

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
         "{{ raise_exception('System role not supported') }}{% endif %}"
         "{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
         "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
         "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
TEMPLATES = {"chatml": (CHATML, ["<|im_start|>", "<|im_end|>"], "<|im_end|>"),
             "llama3": (LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>"),
             "gemma": (GEMMA, ["<start_of_turn>", "<end_of_turn>"], "<end_of_turn>")}


@pytest.fixture(scope="module")
def seed_dir(seed_test_model):
    return resolve_model_path("seed:test")


def chat_tok(seed_dir, name):
    template, specials, _ = TEMPLATES[name]
    tok = AutoTokenizer.from_pretrained(seed_dir)
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.chat_template = template
    return tok


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_teacher_and_student_tokens_agree_after_the_memory(seed_dir, name):
    tok = chat_tok(seed_dir, name)
    fmt = make_format(tok)
    assert fmt.chat and fmt.stop == (TEMPLATES[name][2],)
    memory = "Ann Vell was born in Oslo.\nShe works at Korr Labs."
    for q in ["Where was Ann Vell born?", "Who employs Ann Vell, and since when?"]:
        student, teacher = fmt.question(q), fmt.question(q, memory)
        assert q in student and memory in teacher and memory not in student
        s = tok(student)["input_ids"]
        t = tok(teacher)["input_ids"]
        # the teacher's prompt is the student's with the memory inserted: the same tokens before
        # it, and after it the student's own tokens to the end
        head = 0
        while s[head] == t[head]:
            head += 1
        assert t[:head] == s[:head] and t[-(len(s) - head):] == s[head:]
        assert memory.split()[0] in tok.decode(t[head:len(t) - (len(s) - head)])
        assert len(s) - head >= len(tok(q, add_special_tokens=False)["input_ids"])
        # the rendered template, not a hand-made string, and BOS once
        assert student.startswith(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                          add_generation_prompt=True).removeprefix(tok.bos_token))
        assert s.count(tok.bos_token_id) == 1


def test_gemma_without_a_system_role_carries_the_memory_in_the_user_turn(seed_dir):
    fmt = make_format(chat_tok(seed_dir, "gemma"))
    teacher = fmt.question("Where?", "Ann lives in Oslo.")
    assert teacher.startswith("<start_of_turn>user\nAnn lives in Oslo.\n\nWhere?<end_of_turn>")


def test_the_seed_models_template_is_the_plain_format_and_keeps_the_newline_stop(seed_dir):
    tok = AutoTokenizer.from_pretrained(seed_dir)
    fmt = make_format(tok)            # auto: the seed tokenizer has a template
    assert fmt.stop == ("\n",)
    for ctx in [None, "Ann lives in Oslo."]:
        assert fmt.question("Where does Ann live?", ctx) == qa_prompt("Where does Ann live?", ctx)
        assert fmt.question("Where does Ann live?", ctx) == PLAIN.question("Where does Ann live?", ctx)
    assert fmt.answered("Where?", "Oslo") == "Q: Where?\nA: Oslo\n"
    off = make_format(tok, "off", stop=[])
    assert not off.chat and off.stop == ()
    with pytest.raises(ValueError, match="no chat template"):
        tok.chat_template = None
        make_format(tok, "on")


def test_cut_keeps_lines_unless_a_newline_stops_it():
    chat = make_format_from(stop=("<|im_end|>",))
    assert chat.cut(" line one\nline two<|im_end|>junk") == "line one\nline two"
    assert PLAIN.cut("\n Oslo\nQ: next") == "Oslo"


def make_format_from(stop):
    from sleepray.prompt_format import PromptFormat
    return PromptFormat(chat=True, student="<q>", teacher="<m><q>", stop=stop)


def test_sampling_stops_only_where_asked(seed_dir):
    # the seed model writes question after question on new lines: without a newline stop the
    # continuation runs on over several lines; with it, it ends at the first
    model, tok = load_model(seed_dir)
    ep = World(10600001, 1, 0, 0, 1).episode(0)
    prompts = [ep.context + "\nQ:"] * 6
    free = sample_ids(model, tok, prompts, 40, 1.0, stop=(), seed=1)
    nl = tok.encode("\n", add_special_tokens=False)[0]
    assert sum(row.count(nl) >= 2 for row in free) >= 3          # multi-line continuations survive
    cut = sample_ids(model, tok, prompts, 40, 1.0, stop=("\n",), seed=1)
    assert all(nl not in row[:-1] for row in cut)
    assert all(row[-1] == nl or len(row) == 40 for row in cut)
    # a stop string of several tokens ends the row through the token that completes it
    two = sample_ids(model, tok, prompts, 40, 1.0, stop=("\nQ:",), seed=1)
    assert all("\nQ:" not in tok.decode(row[:-1]) for row in two)
    assert any(tok.decode(row).endswith("\nQ:") for row in two)


def test_answers_and_prompts_follow_the_tokenizers_format(seed_dir):
    model, tok = load_model(seed_dir)
    ep = World(10600001, 1, 0, 0, 1).episode(0)
    plain = evaluate_probes(model, tok, ep.probes[:4], ep.context).answers
    assert all("\n" not in a for a in plain)
    # a multi-line stop-free format: the same greedy answers are not cut at the newline
    attach(tok, ModelConfig(chat_template="off", stop=[]))
    assert format_of(tok).stop == ()
    long = generate_answers(model, tok, [qa_prompt(p.question, ep.context) for p in ep.probes[:4]], 24)
    assert any("\n" in a for a in long)
    assert all(a.startswith(b) for a, b in zip(long, plain))
    # consolidation prompts: the teacher's prompt is the format's, with the memory
    chat = make_format(chat_tok(seed_dir, "chatml"))
    writer = lambda context, k: ["Where was she born?"] * k   # noqa: E731
    ps = consolidation_prompts(ep, 6, random.Random(0), writer, fmt=chat)
    queries = [p for p in ps if p.kind == "query"]
    assert queries and all(p.prompt == chat.question("Where was she born?") for p in queries)
    assert all(p.teacher_prompt == chat.question("Where was she born?", ep.context) for p in queries)
    assert all(p.teacher_prompt == f"{ep.context}\n{p.prompt}" for p in ps if p.kind == "prefix")
