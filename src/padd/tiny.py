"""Tiny real-architecture teachers (Llama, Qwen2, ...) with their own tokenizer, saved like hub checkpoints.

Used by the tests and the demo: `AutoModelForCausalLM` / `AutoTokenizer` load what this writes with no
custom code. The tokenizer is a byte-level BPE trained with the `tokenizers` library on given texts.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path

import torch

EOS, PAD = "<|endoftext|>", "<|pad|>"


def build_tokenizer(texts: Iterable[str], vocab_size: int = 384):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on `texts`, with EOS and PAD tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Single digits keep arithmetic learnable: a merged "48" token hides its digits from the model.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, bos_token=None)


def arithmetic_corpus(n_lines: int = 2000, seed: int = 0) -> list[str]:
    """Short arithmetic statements, a stand-in corpus with some structure (digits, operators, words)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        op = rng.choice(["+", "-", "*"])
        value = a + b if op == "+" else a - b if op == "-" else a * b
        word = {"+": "sum", "-": "difference", "*": "product"}[op]
        lines.append(rng.choice([f"{a} {op} {b} = {value}", f"The {word} of {a} and {b} is {value}."]))
    return lines


def make_tiny_teacher(
    out: str | Path,
    family: str = "llama",
    *,
    texts: list[str] | None = None,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    seed: int = 0,
    bias_std: float = 0.0,
) -> Path:
    """Write a randomly initialised dense teacher of `family` and its tokenizer to `out`.

    bias_std > 0 fills the qkv biases (Qwen2 has them) with non-zero values, so tests see them.
    """
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    }
    if family not in classes:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(classes)}")
    tokenizer = build_tokenizer(texts or arithmetic_corpus(seed=seed))
    cfg_cls, model_cls = classes[family]
    cfg = cfg_cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    if bias_std:
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    if proj.bias is not None:
                        proj.bias.normal_(0.0, bias_std)
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
