"""Sequence-level data pipelines: sampling from teacher and student, response filters,
divergence-aware selection, mixed-policy continuation and preference pairs.

Each stage reads and writes JSON Lines, so responses generated elsewhere (vLLM,
TensorRT-LLM) enter the same pipeline; the built-in sampler runs a Megatron-core GPT
(any TP) or a Hugging Face causal LM.
"""
