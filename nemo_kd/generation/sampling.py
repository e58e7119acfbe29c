"""Batched sampling with log-probs from a Megatron-core GPT (any TP, PP=1) or a Hugging Face causal LM.

Distribution. At each step a row's next token is drawn from the last-position logits
``z`` over the real vocabulary ``[0, vocab_size)`` (Megatron's padding rows, ids ≥
``vocab_size``, are cut off before anything else and can never be produced)::

    temperature T = 0:  y = argmax_v z_v                              (ties: the smallest id)
    temperature T > 0:  a = z / T
                        top-k:  keep v with a_v ≥ (k-th largest a)   (ties at the k-th value kept)
                        top-p:  sort softmax(a) descending (stable: smaller id first on ties), keep
                                the shortest prefix whose mass reaches p (always the top token)
                        π(v) = exp(a_v − LSE_kept(a)) on kept v, 0 elsewhere
                        y ~ π

All of it runs in float64 on the gathered ``[b, vocab_size]`` row, identically on every
TP rank. Two log-probs are recorded per produced token ``y`` (see :class:`Generation`):
``logprobs`` = ``log softmax(z)_y`` (temperature 1, untruncated: the model's own
probability, what a student/teacher KL or an importance weight needs) and
``sampling_logprobs`` = ``log π(y)`` (the distribution actually sampled from; 0 for
greedy, whose choice has probability 1).

Reproducibility contract. The draw for prompt ``i`` at step ``t`` (``t`` = number of
tokens it has produced so far) is a function of ``(cfg.seed, sample_offset + i, t)``
only: one uniform ``u ∈ [0, 1)`` from a counter-based hash (splitmix64) of that triple,
turned into a token by inverse-CDF over ``π`` in vocabulary-id order. Nothing depends
on batch size, batch composition, TP size, DP rank or device, so a prompt's sample is
the same whichever rank or batch generates it, up to the model's own floating-point
differences in ``z`` (which move a draw only when ``u`` falls within rounding error of
a CDF boundary). Pass ``sample_offset`` = the global index of a rank's first prompt
when prompts are split over data-parallel ranks. Mixture-of-experts models keep the contract
at any EP when dropless; with token dropping (``moe_expert_capacity_factor`` set, active in eval
too) a row's logits depend on its batch-mates, and :func:`generate` warns.

Decoding. A Megatron-core ``GPTModel`` decodes with Megatron's own KV cache
(``StaticInferenceContext``): the batch is prefilled up to its shortest prompt, then advances
one position per forward; a row still inside its prompt is fed its prompt token, the others
their last sample (Megatron's static-batching scheme for prompts of different lengths). Any
other model (:class:`HFCausalLM`, or ``use_kv_cache=False``) re-runs the right-padded batch
every step: right padding is harmless under the causal mask, a row's logits at its last real
position never see the padding after it, and rows that are done drop out of the batch. Both
paths give the same logits (to float rounding) and so the same samples. For very large
models an external engine (vLLM) can write the training JSONL (pairs, prompt/response) instead.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

from nemo_kd.data.packing import DEFAULT_PACK_WINDOW, pack_plan, pack_token_rows, sample_positions
from nemo_kd.losses.sequence import vocab_parallel_token_logprobs
from nemo_kd.losses.vocab_parallel import all_gather_vocab, valid_vocab_columns, vocab_shard_range

__all__ = [
    "Generation",
    "HFCausalLM",
    "SamplingConfig",
    "generate",
    "prompt_ids",
    "response_logprobs",
]

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingConfig:
    """How tokens are drawn (see the module docstring for the exact distribution).

    ``temperature``: 0 is greedy argmax; ``top_k``: 0 is off; ``top_p``: 1.0 is off;
    ``max_new_tokens``: the most tokens produced per prompt, not counting the end token;
    ``seed``: with the prompt's global index and the step, the only source of randomness.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0

    def __post_init__(self):
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"SamplingConfig.temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"SamplingConfig.top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1] (1 = off), got {p!r}")
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"SamplingConfig.max_new_tokens must be an integer >= 0, got {n!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"SamplingConfig.seed must be an integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Generation:
    """One prompt's completion.

    ``token_ids``: the produced tokens, without the end token. ``finished``: the end
    token was produced (False: stopped at ``max_new_tokens`` / ``max_length``).
    ``logprobs[j]`` = ``log softmax(z)`` (temperature 1, full real vocabulary) of the
    ``j``-th produced token, and ``sampling_logprobs[j]`` its log-prob under the sampling
    distribution ``π`` (temperature, top-k/top-p, renormalised; 0 when greedy). Both
    lists cover the end token too when ``finished``: ``len(logprobs) ==
    len(token_ids) + finished``, so ``sum(logprobs)`` is the log-prob of the whole
    response including its end token, as :func:`response_logprobs` scores
    ``token_ids + [eos_id]``. ``text``: ``token_ids`` decoded (special tokens skipped)
    when a tokenizer was given, else None.
    """

    prompt_ids: List[int]
    token_ids: List[int] = field(default_factory=list)
    finished: bool = False
    logprobs: List[float] = field(default_factory=list)
    sampling_logprobs: List[float] = field(default_factory=list)
    text: Optional[str] = None


def prompt_ids(tokenizer, prompt: str) -> List[int]:
    """Token ids of a user prompt rendered with the chat template plus the generation prompt."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ----------------------------------------------------------------------------- randomness


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _uniform(seed: int, index: int, step: int) -> float:
    """``u ∈ [0, 1)`` (53 random bits) determined by ``(seed, index, step)`` alone.

    Why a counter-based hash rather than a per-row ``torch.Generator`` and Gumbel-max:
    inverse-CDF needs one number per row and step, not one per vocabulary entry; the
    number is the same in every process and on every device (CPU and CUDA generators
    produce different streams), and it does not depend on how the vocabulary is
    sharded or how many rows share a batch.
    """
    h = _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ (index & _MASK64)) ^ (step & _MASK64))
    return (h >> 11) * (1.0 / (1 << 53))


# ----------------------------------------------------------------------------- the distribution


def _sampling_log_probs(z: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """``log π`` ``[n, V]`` (float64; −inf outside the kept set) of ``[n, V]`` float64 logits ``z``."""
    a = z / cfg.temperature
    if 0 < cfg.top_k < a.shape[-1]:
        kth = a.topk(cfg.top_k, dim=-1).values[:, -1:]
        a = a.masked_fill(a < kth, float("-inf"))
    if cfg.top_p < 1.0:
        probs = torch.softmax(a, dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_before >= cfg.top_p  # never the top token: its mass before is 0 < p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        a = a.masked_fill(drop, float("-inf"))
    return torch.log_softmax(a, dim=-1)


def _inverse_cdf(log_pi: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Ids ``[n]`` with ``CDF(id − 1) ≤ u·total < CDF(id)`` (vocabulary-id order): never a π = 0 id."""
    cdf = log_pi.exp().cumsum(dim=-1)
    x = (u * cdf[:, -1]).unsqueeze(-1)
    ids = torch.searchsorted(cdf, x, right=True).squeeze(-1)
    # u·total can round up to total itself: fall back to the last id with π > 0.
    last_kept = log_pi.shape[-1] - 1 - torch.isfinite(log_pi).flip(-1).int().argmax(dim=-1)
    return torch.minimum(ids, last_kept)


# ----------------------------------------------------------------------------- model plumbing


def _tp_group(model):
    """The TP group the model's logits are sharded over (None: full vocabulary); refuses PP > 1."""
    from nemo_kd.parallel import state

    if not state.is_initialized():
        return None
    if state.pp_size() > 1:
        raise ValueError(
            f"sampling needs the whole model on each rank (pipeline_model_parallel_size=1), got "
            f"PP={state.pp_size()}: generate with PP=1 (TP and DP are fine), or generate the responses "
            "with an external engine (vLLM, TensorRT-LLM) and supply them as JSONL"
        )
    if not getattr(model, "vocab_parallel", True) or state.tp_size() == 1:
        return None
    return state.tp_group()


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _forward(model, tokens: torch.Tensor) -> torch.Tensor:
    b, s = tokens.shape
    position_ids = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)
    return model(tokens, position_ids, None)  # [b, s, V_padded / TP]


def _right_pad(rows: Sequence[Sequence[int]], width: int, pad_id: int, device) -> torch.Tensor:
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for r, ids in enumerate(rows):
        tokens[r, :len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
    return tokens.to(device)


def _check_vocab(vocab_size: int, **ids: Optional[int]) -> None:
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    for name, value in ids.items():
        if value is not None and not 0 <= value < vocab_size:
            raise ValueError(f"{name}={value} is outside the vocabulary [0, {vocab_size})")


@contextlib.contextmanager
def _eval_mode(model):
    """``model.eval()`` under ``torch.no_grad()``; the caller's training mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------- generate


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    cfg: SamplingConfig,
    *,
    eos_id: Optional[int],
    pad_id: int,
    vocab_size: int,
    max_length: Optional[int] = None,
    batch_size: int = 64,
    sample_offset: int = 0,
    progress=None,
    tokenizer=None,
    use_kv_cache: Optional[bool] = None,
) -> List[Generation]:
    """Sample a completion of each tokenised prompt (see the module docstring).

    Args:
        model: Megatron-style ``forward(tokens, position_ids, attention_mask)`` returning
            ``[b, s, V_padded/TP]`` logits (this rank's vocabulary shard under TP > 1; a
            module with ``vocab_parallel = False``, like :class:`HFCausalLM`, full logits).
            Every TP rank must call with the same prompts; all return the same result.
        prompts: token ids per prompt (non-empty).
        cfg: the sampling distribution, budget and seed.
        eos_id: the end token (the chat template's end of turn); None: only the budget stops.
        pad_id: filler for right padding (never read by a real position).
        vocab_size: the real vocabulary; ids ≥ it (padding rows) are never produced.
        max_length: cap on prompt + completion tokens per row (the model's
            ``max_position_embeddings``); a prompt already that long gets no tokens.
        batch_size: prompts decoded together (does not change results).
        sample_offset: global index of ``prompts[0]``: prompt ``i`` draws from
            ``(cfg.seed, sample_offset + i, step)``.
        progress: anything with ``update(n)`` (e.g. tqdm), called per finished batch.
        tokenizer: fills :attr:`Generation.text` (``decode(token_ids, skip_special_tokens=True)``).
        use_kv_cache: decode with Megatron's KV cache (default: for a Megatron-core GPT);
            False re-runs the whole prefix every step.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_vocab(vocab_size, eos_id=eos_id, pad_id=pad_id)
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be >= 1 or None, got {max_length}")
    prompts = [list(map(int, p)) for p in prompts]
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {sample_offset + i} is empty: the first token is predicted from the last "
                             "prompt position, so a prompt needs at least one token (e.g. BOS)")
    group = _tp_group(model)
    device = _device(model)
    if use_kv_cache is None:
        use_kv_cache = _is_megatron_gpt(model)
    elif use_kv_cache and not _is_megatron_gpt(model):
        raise ValueError("use_kv_cache=True needs a Megatron-core GPTModel")
    # here, not at the top: nemo_kd.models loads Megatron, which `--help` must not wait for
    from nemo_kd.models.router_terms import check_token_dropping

    check_token_dropping(model, "sampling", "a prompt's samples depend on batch_size, batch-mates and use_kv_cache",
                         "model.moe_expert_capacity_factor: null (dropless) for reproducible sampling")
    decode = _generate_batch_kv_cache if use_kv_cache else _generate_batch
    out: List[Generation] = []
    with _eval_mode(model):
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            out.extend(decode(model, chunk, cfg, eos_id, pad_id, vocab_size, max_length, sample_offset + start, group,
                              device))
            if progress is not None:
                progress.update(len(chunk))
    if tokenizer is not None:
        for g in out:
            g.text = tokenizer.decode(g.token_ids, skip_special_tokens=True)
    return out


def _is_megatron_gpt(model) -> bool:
    from megatron.core.models.gpt import GPTModel

    inner = model
    while not isinstance(inner, GPTModel) and hasattr(inner, "module"):  # Float16Module, DDP
        inner = inner.module
    return isinstance(inner, GPTModel)


def _budgets(chunk, cfg: SamplingConfig, max_length: Optional[int]) -> List[int]:
    # Per-row budget (not the batch's longest prompt): a row's output must not depend on its batch-mates.
    return [cfg.max_new_tokens if max_length is None else max(0, min(cfg.max_new_tokens, max_length - len(p)))
            for p in chunk]


def _draw(z: torch.Tensor, gens: List[Generation], active: List[int], cfg: SamplingConfig, first_index: int,
          eos_id: Optional[int]) -> List[int]:
    """Sample the next token of each ``active`` row from its logits ``z`` ``[n, vocab_size]``
    (any float dtype; computed in float64) and record it; returns the tokens (EOS included)."""
    z = z.double()
    logp = torch.log_softmax(z, dim=-1)
    if cfg.greedy:
        ids = z.argmax(dim=-1)
        sample_lp = torch.zeros(len(active), dtype=torch.float64, device=z.device)
    else:
        log_pi = _sampling_log_probs(z, cfg)
        u = torch.tensor([_uniform(cfg.seed, first_index + r, len(gens[r].token_ids)) for r in active],
                         dtype=torch.float64, device=z.device)
        ids = _inverse_cdf(log_pi, u)
        sample_lp = log_pi.gather(-1, ids[:, None])[:, 0]
    model_lp = logp.gather(-1, ids[:, None])[:, 0]
    out = ids.tolist()
    for r, t, lp, slp in zip(active, out, model_lp.tolist(), sample_lp.tolist()):
        g = gens[r]
        g.logprobs.append(lp)
        g.sampling_logprobs.append(slp)
        if t == eos_id:
            g.finished = True
        else:
            g.token_ids.append(t)
    return out


def _generate_batch(model, chunk, cfg, eos_id, pad_id, vocab_size, max_length, first_index, group, device):
    """Re-run the right-padded prefix every step (any model)."""
    gens = [Generation(prompt_ids=list(p)) for p in chunk]
    budget = _budgets(chunk, cfg, max_length)
    width = max(len(p) + n for p, n in zip(chunk, budget))
    tokens = _right_pad(chunk, width, pad_id, device)
    lengths = [len(p) for p in chunk]
    while True:
        active = [r for r, g in enumerate(gens) if not g.finished and len(g.token_ids) < budget[r]]
        if not active:
            return gens
        rows = torch.tensor(active, device=device)
        cur = torch.tensor([lengths[r] for r in active], device=device)
        logits = _forward(model, tokens[rows, :int(cur.max())])
        last = logits[torch.arange(len(active), device=device), cur - 1]  # [n, V_padded/TP]
        # Gather only this [n, V/TP] row (not [n, s, V/TP]); every rank then samples identically.
        z = all_gather_vocab(last, group)[:, :vocab_size]  # padding rows cut off here
        for r, t in zip(active, _draw(z, gens, active, cfg, first_index, eos_id)):
            if t != eos_id:
                tokens[r, lengths[r]] = t
                lengths[r] += 1


def _generate_batch_kv_cache(model, chunk, cfg, eos_id, pad_id, vocab_size, max_length, first_index, group, device):
    """Megatron's KV cache (static batching): prefill to the shortest prompt, then one position
    per forward for the whole batch; rows inside their prompt are fed their prompt token."""
    from megatron.core.inference.contexts import StaticInferenceContext

    gens = [Generation(prompt_ids=list(p)) for p in chunk]
    budget = _budgets(chunk, cfg, max_length)
    plen = [len(p) for p in chunk]
    total = max(n + k for n, k in zip(plen, budget))
    tokens = _right_pad(chunk, total, pad_id, device)
    b, start = len(chunk), min(plen)
    ctx = StaticInferenceContext(b, total)

    def step(pos: int, width: int) -> torch.Tensor:
        position_ids = torch.arange(pos, pos + width, device=device).unsqueeze(0).expand(b, width)
        # runtime_gather_output: Megatron gathers the TP shards of this last position's logits
        logits = model(tokens[:, pos:pos + width], position_ids, None, inference_context=ctx,
                       runtime_gather_output=True)
        ctx.sequence_len_offset += width
        return logits[:, -1, :vocab_size]  # [b, V] (only the last position is materialised)

    def live(r):
        return not gens[r].finished and len(gens[r].token_ids) < budget[r]

    if not any(live(r) for r in range(b)):
        return gens
    z = step(0, start)  # predicts position `start`
    for pos in range(start, total):
        # rows whose next token (at `pos`) is theirs to sample: past their prompt and still going
        active = [r for r in range(b) if pos >= plen[r] and pos == plen[r] + len(gens[r].token_ids) and live(r)]
        if active:
            drawn = _draw(z[active], gens, active, cfg, first_index, eos_id)
            for r, t in zip(active, drawn):
                if t != eos_id:
                    tokens[r, pos] = t
        if not any(live(r) for r in range(b)) or pos == total - 1:
            return gens
        z = step(pos, 1)  # feed position `pos` (prompt token, sample or padding): predicts pos + 1
    return gens


# ----------------------------------------------------------------------------- scoring


def response_logprobs(
    model,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    *,
    batch_size: int = 64,
    vocab_size: int,
    pack_length: Optional[int] = None,
) -> List[torch.Tensor]:
    """Teacher-forced ``log p(response_j | prompt, response_<j)`` per response token (temperature 1).

    Returns one float32 CPU tensor ``[len(response)]`` per pair: the model's log-softmax
    over the real vocabulary (padding rows masked out), vocab-parallel under TP through
    :func:`nemo_kd.losses.sequence.vocab_parallel_token_logprobs`. Include the end token
    in ``response_ids`` to score it (what :attr:`Generation.logprobs` holds when finished).

    Padded (``pack_length=None``): ``batch_size`` pairs per forward, each right-padded to the
    batch's longest. Packed (``pack_length``: a Megatron-core GPT only): the pairs laid end to end in
    rows of ``pack_length`` positions (:mod:`nemo_kd.data.packing`: a pair of ``n`` tokens takes
    ``n − 1``, first-fit decreasing per window of :data:`~nemo_kd.data.packing.DEFAULT_PACK_WINDOW`
    pairs in their given order, positions restarting per pair, Megatron's THD layout so attention never
    crosses a pair), ``batch_size`` rows per forward, each pair's log-probs read at its own positions:
    the padded result up to float rounding, without the padding's work. A pair longer than
    ``pack_length`` is scored whole, as padded, in a row of its own (the rows of its forward as wide as
    it). The result is the same whatever the batching, packed or not, up to the model's rounding
    (an MoE with token dropping excepted, see :func:`generate`).
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if pack_length is not None and (isinstance(pack_length, bool) or not isinstance(pack_length, int)
                                    or pack_length < 1):
        raise ValueError(f"pack_length must be a positive integer (packed rows) or None (padded), got {pack_length!r}")
    _check_vocab(vocab_size)
    pairs = [(list(map(int, p)), list(map(int, r))) for p, r in zip(prompt_ids, response_ids)]
    for i, (p, r) in enumerate(pairs):
        if not p:
            raise ValueError(f"prompt {i} is empty: the first response token is predicted from the last "
                             "prompt position")
        if any(not 0 <= t < vocab_size for t in r):
            raise ValueError(f"response {i} has token ids outside [0, {vocab_size})")
    if pack_length is not None and not _is_megatron_gpt(model):
        raise ValueError(f"pack_length={pack_length}: packed scoring needs a Megatron-core GPTModel (its attention "
                         f"reads Megatron's packed_seq_params), not {type(model).__name__}; score it padded "
                         "(pack_length=None)")
    group = _tp_group(model)
    with _eval_mode(model):
        if pack_length is None:
            return _score_padded(model, pairs, batch_size, vocab_size, group)
        return _score_packed(model, pairs, batch_size, vocab_size, group, pack_length)


def _real_vocab_logprobs(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, group) -> torch.Tensor:
    """``log softmax(logits)[label]`` ``[b, s]`` float32 CPU over the real vocabulary of this shard's logits."""
    v_local = logits.shape[-1]
    valid = valid_vocab_columns(v_local, vocab_shard_range(v_local, group)[0], vocab_size)
    if valid < v_local:  # Megatron's padding rows are no tokens: out of the normalisation
        logits = logits.masked_fill(torch.arange(v_local, device=logits.device) >= valid, float("-inf"))
    return vocab_parallel_token_logprobs(logits, labels, group=group).float().cpu()


def _score_padded(model, pairs, batch_size: int, vocab_size: int, group) -> List[torch.Tensor]:
    device = _device(model)
    out: List[torch.Tensor] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        seqs = [p + r for p, r in chunk]
        width = max(len(s) for s in seqs)
        tokens = _right_pad(seqs, width, 0, device)
        logits = _forward(model, tokens)  # [b, s, V_padded/TP]
        lp = _real_vocab_logprobs(logits[:, :-1], tokens[:, 1:], vocab_size, group)
        for b, (p, r) in enumerate(chunk):
            out.append(lp[b, len(p) - 1:len(p) - 1 + len(r)].clone())
    return out


def _score_packed(model, pairs, batch_size: int, vocab_size: int, group, pack_length: int) -> List[torch.Tensor]:
    """:func:`response_logprobs` on packed rows (its docstring)."""
    device = _device(model)
    seqs = [p + r for p, r in pairs]
    positions = [sample_positions(len(s)) for s in seqs]
    scored = [i for i, (_, r) in enumerate(pairs) if r]  # an empty response has nothing to score
    fit = [i for i in scored if positions[i] <= pack_length]
    rows = [[fit[j] for j in pack] for pack in pack_plan([positions[i] for i in fit], pack_length,
                                                         DEFAULT_PACK_WINDOW, shuffle=False)]
    rows += [[i] for i in scored if positions[i] > pack_length]  # scored whole, alone (as padded)
    out = [torch.zeros(0, dtype=torch.float32) for _ in pairs]
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(sum(positions[i] for i in row) for row in chunk)
        packed = pack_token_rows(seqs, chunk, width)
        x = packed.model_inputs(device)
        logits = x.rows(model(*x.args, **x.kwargs))  # [b, width, V_padded/TP]
        lp = _real_vocab_logprobs(logits, packed.labels.to(device), vocab_size, group)
        for i in (i for row in chunk for i in row):
            r, o = packed.placements[i]
            first = o + len(pairs[i][0]) - 1  # the position predicting the response's first token
            out[i] = lp[r, first:first + len(pairs[i][1])].clone()
    return out


# ----------------------------------------------------------------------------- Hugging Face adapter


class HFCausalLM(torch.nn.Module):
    """A ``transformers`` causal LM behind Megatron's ``forward(tokens, position_ids, attention_mask)``.

    Returns full-vocabulary logits ``[b, s, V]`` (TP=1: ``vocab_parallel = False``, so
    :func:`generate` never treats them as a shard). ``attention_mask`` must be None:
    right padding under the causal mask needs none (as in
    :class:`nemo_kd.teacher.teachers.HFTeacher`).
    """

    vocab_parallel = False

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])

    @property
    def config(self):
        """The wrapped model's ``transformers`` config."""
        return self.model.config

    @classmethod
    def from_pretrained(cls, path: str, trust_remote_code: bool = False, dtype: str = "float32",
                        device: Optional[torch.device] = None) -> "HFCausalLM":
        """Load a model directory the way :class:`HFTeacher` does (``trust_remote_code`` off unless asked)."""
        from nemo_kd.teacher.teachers import HFTeacher

        return cls(HFTeacher(os.fspath(path), trust_remote_code=trust_remote_code, dtype=dtype, device=device).model)

    def forward(self, tokens: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError("HFCausalLM takes no attention_mask: use right padding under the causal mask")
        return self.model(input_ids=tokens, position_ids=position_ids, use_cache=False).logits
