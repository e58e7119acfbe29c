"""Sequence-level data pipelines: sampling from teacher and student, response filters,
divergence-aware selection, mixed-policy continuation and preference pairs.

Each stage reads and writes JSON Lines; the built-in sampler runs a Megatron-core GPT
(any TP) or a Hugging Face causal LM. Responses generated elsewhere (vLLM, TensorRT-LLM)
enter as training data: a pairs file or a prompt/response file the trainer reads.
"""
