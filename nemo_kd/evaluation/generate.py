"""Batched greedy decoding with a Megatron-core ``GPTModel`` (TP=PP=1 use; no KV cache).

Tiny models only: every step re-runs the whole (right-padded) batch. Right padding is
harmless under the causal mask – a row's logits at its last real position never see the
padding after it – so each row reads its next token at its own length and rows of
different prompt lengths decode together. A row stops at the end-of-turn token (the
tokenizer's EOS: ``<|im_end|>`` for the ChatML template) or after ``max_new_tokens``.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

__all__ = ["greedy_generate", "prompt_ids"]


def prompt_ids(tokenizer, prompt: str) -> List[int]:
    """Token ids of a user prompt rendered with the chat template plus the generation prompt."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _next_tokens(model, tokens: torch.Tensor, lengths: torch.Tensor, vocab_size: int, group) -> torch.Tensor:
    from nemo_kd.losses.kd import vocab_parallel_argmax
    from nemo_kd.losses.vocab_parallel import vocab_shard_range

    b, s = tokens.shape
    position_ids = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)
    logits = model(tokens, position_ids, None)  # [b, s, V_padded/TP]
    last = logits[torch.arange(b, device=tokens.device), lengths - 1].float()  # [b, V/TP]
    # Megatron pads the vocabulary: padding rows are no tokens, never pick them.
    start, end = vocab_shard_range(last.shape[-1], group)
    ids = torch.arange(start, end, device=last.device)
    last = last.masked_fill(ids >= vocab_size, float("-inf"))
    return vocab_parallel_argmax(last, group)


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32, batch_size: int = 64,
                    vocab_size: Optional[int] = None, max_length: Optional[int] = None, progress=None) -> List[str]:
    """Greedy completions (decoded text, without the end-of-turn token) of ``prompts``.

    ``model``: a Megatron ``GPTModel`` (or a wrapper with the same ``forward(tokens,
    position_ids, attention_mask)``) holding the full vocabulary (TP=1) or a TP shard.
    ``vocab_size``: the tokenizer's size (defaults to ``len(tokenizer)``); ids at or
    above it (Megatron's padding rows) are never generated. ``max_length`` caps prompt
    + completion tokens (the model's ``max_position_embeddings``).
    """
    from nemo_kd.parallel import state

    group = state.tp_group() if state.is_initialized() and state.tp_size() > 1 else None
    vocab_size = vocab_size or len(tokenizer)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    outputs: List[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = [prompt_ids(tokenizer, p) for p in prompts[start:start + batch_size]]
            lengths = torch.tensor([len(c) for c in chunk], device=device)
            budget = max_new_tokens
            if max_length is not None:
                budget = min(budget, max_length - int(lengths.max()))
            width = int(lengths.max()) + max(budget, 0)
            tokens = torch.full((len(chunk), width), pad, dtype=torch.long, device=device)
            for i, c in enumerate(chunk):
                tokens[i, :len(c)] = torch.tensor(c, device=device)
            done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
            generated: List[List[int]] = [[] for _ in chunk]
            for _ in range(max(budget, 0)):
                cur = int(lengths.max())
                nxt = _next_tokens(model, tokens[:, :cur], lengths, vocab_size, group)
                for i in range(len(chunk)):
                    if done[i]:
                        continue
                    t = int(nxt[i])
                    if t == eos:
                        done[i] = True
                        continue
                    generated[i].append(t)
                    tokens[i, lengths[i]] = t
                    lengths[i] += 1
                if bool(done.all()):
                    break
            outputs.extend(tokenizer.decode(g, skip_special_tokens=True) for g in generated)
            if progress is not None:
                progress.update(len(chunk))
    finally:
        model.train(was_training)
    return outputs
