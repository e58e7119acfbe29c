"""Batched greedy decoding for evaluation: a thin wrapper over :func:`nemo_kd.generation.sampling.generate`.

One decoder serves evaluation and data generation: greedy is sampling at temperature 0
(argmax over the real vocabulary, ties to the smallest id); a Megatron-core GPT decodes with
Megatron's KV cache (see :mod:`nemo_kd.generation.sampling`).
A row stops at the end-of-turn token (the tokenizer's EOS: ``<|im_end|>`` for the
ChatML template) or after ``max_new_tokens``.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

from nemo_kd.generation.sampling import SamplingConfig, generate, prompt_ids

__all__ = ["greedy_generate", "prompt_ids"]


def greedy_generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32, batch_size: int = 64,
                    vocab_size: Optional[int] = None, max_length: Optional[int] = None, progress=None) -> List[str]:
    """Greedy completions (decoded text, without the end-of-turn token) of ``prompts``.

    ``model``: a Megatron ``GPTModel`` (or a wrapper with the same ``forward(tokens,
    position_ids, attention_mask)``) holding the full vocabulary (TP=1) or a TP shard.
    ``vocab_size``: the tokenizer's size (defaults to ``len(tokenizer)``); ids at or
    above it (Megatron's padding rows) are never generated. ``max_length`` caps prompt
    + completion tokens of each row (the model's ``max_position_embeddings``).
    """
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    gens = generate(model, [prompt_ids(tokenizer, p) for p in prompts],
                    SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens),
                    eos_id=eos, pad_id=pad, vocab_size=vocab_size or len(tokenizer), max_length=max_length,
                    batch_size=batch_size, progress=progress, tokenizer=tokenizer)
    return [g.text for g in gens]
