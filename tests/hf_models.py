"""Tiny random Hugging Face models for the conversion and sampling tests (no hub: built from a config), and
the conversion checks every MoE family's test runs against them.

Every parameter is drawn, norms around 1 and the rest around 0 (scale 0.2), so that biases, routers, sinks
and experts all matter to the logits; seeded, so a test module rebuilds the same model.

A conversion *case* (a dict, picklable for the 2-process workers): ``hf_dir`` (the HF model), ``tokens`` and
``logits`` (transformers' fp32 reference), ``vocab_size``, and optionally ``megatron_dir`` (its TP=1
conversion) and ``hf_options`` (keyword arguments of ``build_and_load`` for the HF directory).
"""

import os
import warnings
from typing import Dict, Optional, Sequence

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


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def megatron_logits(model_chunks, tokens):
    """Full-vocabulary logits [b, s, padded V] of a single-stage model at the current TP."""
    import torch.distributed as dist

    from nemo_kd.parallel import state

    [model] = model_chunks
    model.eval()
    position_ids = torch.arange(tokens.shape[1])[None].expand_as(tokens)
    with torch.no_grad():
        local = model(tokens, position_ids, None)
    if state.tp_size() == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(state.tp_size())]
    dist.all_gather(parts, local.contiguous(), group=state.tp_group())
    return torch.cat(parts, dim=-1)


def max_diff(logits, ref, vocab_size: int) -> float:
    """Max abs difference over the real vocabulary (Megatron pads it)."""
    return (logits[..., :vocab_size] - torch.as_tensor(ref)).abs().max().item()


def check_logits_match_hf_tp1(case, atol: float) -> None:
    """In this process at TP=1: the HF directory and its Megatron conversion load to transformers' logits
    (``atol``), the two identical."""
    from nemo_kd.convert import build_and_load, ensure_parallel

    with ensure_parallel():
        direct = megatron_logits(build_and_load(case["hf_dir"]).model_chunks, case["tokens"])
        via_checkpoint = megatron_logits(build_and_load(case["megatron_dir"]).model_chunks, case["tokens"])
    assert max_diff(direct, case["logits"], case["vocab_size"]) <= atol
    assert torch.equal(direct, via_checkpoint)


def check_round_trip_bit_identical(case, out_dir: str, config_fields: Sequence[str]) -> None:
    """HF -> Megatron -> HF: every tensor bit-identical (names, dtypes, shapes, values), ``config_fields`` of
    config.json equal, and transformers' reload gives the original logits exactly."""
    from transformers import AutoModelForCausalLM

    from nemo_kd.convert import SafetensorsReader, convert_megatron_to_hf, read_hf_config

    convert_megatron_to_hf(case["megatron_dir"], out_dir, progress=False)
    original, exported = SafetensorsReader(case["hf_dir"]), SafetensorsReader(out_dir)
    assert sorted(exported.keys()) == sorted(original.keys())
    for key in original.keys():
        a, b = original.get(key), exported.get(key)
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), key
    before, after = read_hf_config(case["hf_dir"]), read_hf_config(out_dir)
    for field in config_fields:
        assert before.get(field) == after.get(field), field
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    assert torch.equal(hf_logits(reloaded, case["tokens"]), torch.as_tensor(case["logits"]))


def parallel_conversion_worker(rank, world, cases: Dict[str, dict], layouts: Dict[str, dict],
                               save_root: Optional[str] = None, expert_tensors: Sequence[str] = ()):
    """A ``run_distributed`` body: for each layout (name -> ``ParallelConfig`` fields) and case, load the HF
    directory (and the Megatron conversion, when the case has one) at that layout. Returns
    ``{(layout, case name): dict}`` with ``direct`` / ``from_checkpoint`` (max abs logit difference to
    transformers), ``logits`` (the direct load's), ``experts`` (the local expert indices this rank holds) and,
    for the cases named in ``expert_tensors``, ``tensors`` (this rank's expert parameters, local names). A layout
    with EP > 1 saves each case's load under ``save_root/<case name>`` when ``save_root`` is given."""
    from nemo_kd.convert import build_and_load, save_megatron_checkpoint
    from nemo_kd.parallel import ParallelConfig, destroy_parallel

    out = {}
    for layout, fields in layouts.items():
        parallel = ParallelConfig(**fields)
        try:
            for name, case in cases.items():
                loaded = build_and_load(case["hf_dir"], parallel, **case.get("hf_options", {}))
                logits = megatron_logits(loaded.model_chunks, case["tokens"])
                state = loaded.model_chunks[0].state_dict()
                experts = {k for k in state if ".local_experts." in k}
                result = dict(direct=max_diff(logits, case["logits"], case["vocab_size"]), logits=logits,
                              experts={int(k.split(".local_experts.")[1].split(".")[0]) for k in experts})
                if name in expert_tensors:
                    result["tensors"] = {k: state[k].detach().clone() for k in experts if torch.is_tensor(state[k])}
                if case.get("megatron_dir"):
                    from_ckpt = megatron_logits(build_and_load(case["megatron_dir"]).model_chunks, case["tokens"])
                    result["from_checkpoint"] = max_diff(from_ckpt, case["logits"], case["vocab_size"])
                if save_root is not None and parallel.expert_model_parallel_size > 1:
                    save_megatron_checkpoint(loaded.model_chunks, loaded.arch, os.path.join(save_root, name))
                out[(layout, name)] = result
        finally:
            destroy_parallel()
    return out


def check_parallel_results(rank_results, atol: float) -> None:
    """Every rank's loads of :func:`parallel_conversion_worker` (direct and from the checkpoint) match
    transformers' logits within ``atol``."""
    for results in rank_results:
        for key, r in results.items():
            assert r["direct"] <= atol and r.get("from_checkpoint", 0.0) <= atol, (key, r["direct"],
                                                                                   r.get("from_checkpoint"))


def check_loads_at_ep1(checkpoint_dir: str, case, atol: float) -> None:
    """A checkpoint saved at EP > 1 loads in this process at EP=1 to transformers' logits."""
    from nemo_kd.convert import build_and_load, ensure_parallel

    with ensure_parallel():
        logits = megatron_logits(build_and_load(checkpoint_dir).model_chunks, case["tokens"])
    assert max_diff(logits, case["logits"], case["vocab_size"]) <= atol, checkpoint_dir
