"""Tiny random-initialised models of real families (Llama, Qwen2, Qwen3, Gemma 3, Mistral,
Phi-3), each written as a local Hugging Face folder (safetensors + config + tokenizer with
a chat template), for testing that sleepray works on the models users bring.

Nothing is downloaded: the tokenizer is the shipped ``seed:test`` BPE tokenizer with the
family's chat-template special tokens added and a family-style ``chat_template``; the
model's ``vocab_size`` is ``len(tokenizer)``. Sizes are tiny (hidden 64, 2 layers,
2 heads of 32: vLLM's CPU attention needs a head size it supports, 32 is the smallest)
so that training, vLLM and merging all take seconds on CPU.

    build_tiny_model("qwen3", "/tmp/tiny-qwen3")   # -> Path of the folder
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

# family -> (special tokens the template uses, end-of-turn token (the eos), chat template)
_TEMPLATES = {
    "llama": (
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|eot_id|>",
        "{{ '<|begin_of_text|>' }}{% for m in messages %}"
        "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
    "chatml": (
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],   # Qwen2Tokenizer adds <|endoftext|> as unk
        "<|im_end|>",
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    "gemma": (
        ["<start_of_turn>", "<end_of_turn>"],
        "<end_of_turn>",
        "{{ bos_token }}{% for m in messages %}"
        "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
        "{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"),
    "mistral": (
        ["[INST]", "[/INST]"],
        "<|eos|>",
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
        "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}"
        "{% else %}{{ m['content'] + '\n\n' }}{% endif %}{% endfor %}"),
    "phi3": (
        ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        "<|end|>",
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"),
}

_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, head_dim=32, max_position_embeddings=1024, rms_norm_eps=1e-6,
               tie_word_embeddings=False)

# family -> (transformers config class name, chat template, extra config fields)
FAMILIES = {
    "llama": ("LlamaConfig", "llama", dict(rope_theta=500000.0)),
    "qwen2": ("Qwen2Config", "chatml", dict(rope_theta=1000000.0, tie_word_embeddings=True,
                                             use_sliding_window=False)),
    "qwen3": ("Qwen3Config", "chatml", dict(rope_theta=1000000.0, tie_word_embeddings=True,
                                             use_sliding_window=False)),
    "gemma3": ("Gemma3TextConfig", "gemma", dict(query_pre_attn_scalar=32, sliding_window=512,
                                                  tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh")),
    "mistral": ("MistralConfig", "mistral", dict(rope_theta=1000000.0, sliding_window=None)),
    "phi3": ("Phi3Config", "phi3", dict(rope_theta=10000.0, num_key_value_heads=2,
                                         original_max_position_embeddings=1024)),
}

# the MLP projection names each family's experts must sit on (what ``auto`` resolves to)
MLP_MODULES = {f: ["down_proj", "gate_proj", "up_proj"] for f in FAMILIES}
MLP_MODULES["phi3"] = ["down_proj", "gate_up_proj"]


def build_tokenizer(family: str):
    """The seed:test tokenizer with ``family``'s chat template and its special tokens."""
    from transformers import AutoTokenizer

    from sleepray.models import resolve_model_path

    specials, eot, template = _TEMPLATES[FAMILIES[family][1]]
    tok = AutoTokenizer.from_pretrained(resolve_model_path("seed:test", progress=False))
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.eos_token = eot
    tok.chat_template = template
    return tok


def build_tiny_model(family: str, folder: Union[str, Path], seed: int = 0) -> Path:
    """Write a tiny random ``family`` model + tokenizer as a Hugging Face folder; returns it."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r} (choose from {sorted(FAMILIES)})")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(family)
    cls_name, _, extra = FAMILIES[family]
    fields = {**_COMMON, **extra}
    fields.update(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    config = getattr(transformers, cls_name)(**fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    return folder
