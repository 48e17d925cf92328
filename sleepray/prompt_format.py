"""How a question (and, for the teacher, the memory) becomes a prompt, and where an answer ends.

Two formats, one interface:

* plain (the seed models' pretraining format): ``"<context>\\nQ: <question>\\nA:"``, the
  answer ends at the first newline;
* chat (a tokenizer with a chat template, ``model.chat_template: auto|on``): the question is
  the user's message, rendered by the model's own template; the teacher's prompt also
  carries the memory (a system message, or first in the user's message) and is otherwise
  the same text, so teacher and student token sequences agree after the memory. The answer
  ends at the template's end of turn (or EOS); it may span lines. (The seed models'
  template renders exactly the plain format.)

``model.stop`` adds stop strings (None: a newline for plain prompts, nothing more for chat
prompts). The format belongs to a tokenizer: :func:`attach` sets it when a model is loaded
from a config and :func:`format_of` reads it back (plain when none was attached).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from sleepray.world import qa_prompt

_QUESTION = "\x00sleepray-question\x00"
_MEMORY = "\x00sleepray-memory\x00"
_ANSWER = "\x00sleepray-answer\x00"


@dataclass(frozen=True)
class PromptFormat:
    chat: bool = False
    student: str = ""                   # chat: the rendered prompt, the question as _QUESTION
    teacher: str = ""                   # chat: the same with the memory (as _MEMORY) in it
    stop: tuple[str, ...] = ("\n",)     # an answer ends at the first of these (or EOS)
    end: str = "\n"                     # plain: what ends an answer in a training text
    turn: str = ""                      # chat: a whole exchange, the answer as _ANSWER

    def question(self, question: str, context: Optional[str] = None) -> str:
        """The prompt asking ``question``; the teacher's carries ``context`` (the memory) too."""
        if not self.chat:
            return qa_prompt(question, context)
        if not context:
            return self.student.replace(_QUESTION, question)
        return self.teacher.replace(_MEMORY, context).replace(_QUESTION, question)

    def answered(self, question: str, answer: str) -> str:
        """A training text: the question's prompt, the answer, the end of the turn."""
        if not self.chat:
            return f"{qa_prompt(question)} {answer}{self.end}"
        return self.turn.replace(_QUESTION, question).replace(_ANSWER, answer)

    def cut(self, text: str) -> str:
        """An answer: ``text`` up to the first stop string, stripped."""
        text = text.lstrip()
        ends = [i for i in (text.find(s) for s in self.stop if s) if i >= 0]
        return (text[: min(ends)] if ends else text).strip()


PLAIN = PromptFormat()


def _render(tok, messages: list[dict], prompt: bool = True) -> str:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
    bos = tok.bos_token
    if bos and text.startswith(bos) and tok("", add_special_tokens=True)["input_ids"][:1] == [tok.bos_token_id]:
        text = text[len(bos):]   # the tokenizer adds BOS itself when the prompt is encoded
    return text


def chat_format(tok, stop: Optional[Sequence[str]] = None) -> PromptFormat:
    """The chat format of ``tok``'s template. The memory is a system message where the template
    renders one, else it comes first in the user's message; the end of a turn stops an answer."""
    student = _render(tok, [{"role": "user", "content": _QUESTION}])
    try:
        teacher = _render(tok, [{"role": "system", "content": _MEMORY}, {"role": "user", "content": _QUESTION}])
    except Exception:   # a template that refuses the system role
        teacher = ""
    if _MEMORY not in teacher or _QUESTION not in teacher:
        teacher = _render(tok, [{"role": "user", "content": f"{_MEMORY}\n\n{_QUESTION}"}])
    turn = _render(tok, [{"role": "user", "content": _QUESTION}, {"role": "assistant", "content": _ANSWER}], False)
    end = turn.split(_ANSWER, 1)[1]
    end = end.strip() or end       # "<|im_end|>\n" -> "<|im_end|>"; a bare newline stays
    stops = tuple(s for s in (stop or ()) if s) + ((end,) if end else ())
    return PromptFormat(chat=True, student=student, teacher=teacher, stop=stops, end=end, turn=turn)


def make_format(tok, chat_template: str = "auto", stop: Optional[Sequence[str]] = None) -> PromptFormat:
    """The format for ``tok``: ``chat_template`` "on" (required), "off", or "auto" (when it has one)."""
    has = bool(getattr(tok, "chat_template", None))
    if chat_template == "on" and not has:
        raise ValueError("model.chat_template=on but the tokenizer has no chat template")
    if chat_template == "on" or (chat_template == "auto" and has):
        return chat_format(tok, stop)
    return PromptFormat(stop=tuple(stop) if stop is not None else ("\n",))


def attach(tok, mcfg) -> PromptFormat:
    """Give ``tok`` the format ``mcfg`` (a ModelConfig) asks for; returns it."""
    fmt = make_format(tok, mcfg.chat_template, mcfg.stop)
    tok.sleepray_format = fmt
    return fmt


def format_of(tok) -> PromptFormat:
    return getattr(tok, "sleepray_format", PLAIN)


def stop_token_ids(tok, stop: Sequence[str]) -> tuple[list[int], list[str]]:
    """Stop strings that are one token (ids, ended on exactly) and the rest (matched as text)."""
    ids, texts = [], []
    for s in stop:
        enc = tok.encode(s, add_special_tokens=False)
        if len(enc) == 1:
            ids.append(enc[0])
        else:
            texts.append(s)
    return ids, texts
