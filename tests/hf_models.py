"""Tiny random Hugging Face models for the conversion and sampling tests (no hub: built from a config).

Every parameter is drawn, norms around 1 and the rest around 0 (scale 0.2), so that biases, routers, sinks
and experts all matter to the logits; seeded, so a test module rebuilds the same model.
"""

import warnings

import torch


def random_hf_model(config, seed: int, lm_head_scale: float = 1.0):
    """``AutoModelForCausalLM.from_config(config)`` in eval mode with every parameter randomised from ``seed``
    (``lm_head_scale`` > 1 sharpens the output distribution: clearer argmaxes for greedy-decoding checks)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = "norm" in name and name.endswith("weight")
            p.copy_((1.0 if is_norm else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
        if lm_head_scale != 1.0:
            model.lm_head.weight.mul_(lm_head_scale)
    return model
