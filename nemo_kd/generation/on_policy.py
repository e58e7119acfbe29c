"""On-policy distillation: train on the student's own samples, scored by the online teacher.

GKD (Agarwal et al., arXiv 2306.13649; TRL's ``GKDTrainer``): with probability ``λ``
(``fraction``, TRL's ``lmbda``) a training step replaces every completion of its batch by a
sample of the *current* student for the same prompt; the co-located teacher then scores the
student's tokens and the token-level divergence (GKD's generalised JSD: ``kd_loss_type: jsd``)
pulls the student's distribution towards the teacher's on the sequences the student itself
produces, which removes the train/inference mismatch of distilling on fixed responses. The
other steps train on the dataset's responses (supervised KD). The SFT term, if weighted, then
trains on the student's own tokens too, as in TRL; keep ``sft_loss_weight: 0`` for pure GKD.

:func:`resample_completions` works on a collated microbatch (:func:`nemo_kd.data.kd_dataset.collate`):
each row's prompt (the tokens before its first completion label) is kept, the completion is the
student's sample plus its end token (when it finished within the row's room), the loss mask covers
exactly those tokens, and the fixed shape ``[B, S]`` is kept (Megatron's schedules need it). The
step's coin and every draw depend only on ``(seed, step, global row index)``
(:mod:`nemo_kd.generation.sampling`), so all tensor-parallel ranks agree and a resumed run repeats
its samples. Sampling needs the whole student on each rank (PP = 1) and an online or served
teacher (``teacher.mode: served``, :mod:`nemo_kd.training.served_teacher`) with the student's tokenizer
(stored top-k logits describe the dataset's responses, not the samples).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch


@dataclass
class OnPolicyConfig:
    fraction: float = 0.0  # λ: probability that a step trains on student samples (TRL GKD default 0.5)
    temperature: float = 1.0  # sampling temperature of the student (TRL GKD default 0.9)
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128  # also bounded by each row's room in the sequence length
    seed: int = 1234

    @classmethod
    def from_dict(cls, d) -> "OnPolicyConfig":
        from nemo_kd.generation.stages import known_keys

        cfg = cls(**known_keys(cls, d, "on_policy"))
        if not 0.0 <= cfg.fraction <= 1.0:
            raise ValueError(f"on_policy.fraction must be in [0, 1], got {cfg.fraction}")
        cfg.sampling(1)  # validates temperature / top_k / top_p / max_new_tokens
        return cfg

    @property
    def enabled(self) -> bool:
        return self.fraction > 0

    def sampling(self, max_new_tokens: int):
        from nemo_kd.generation.sampling import SamplingConfig

        return SamplingConfig(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              max_new_tokens=max_new_tokens, seed=self.seed)


def use_student_samples(cfg: OnPolicyConfig, step: int) -> bool:
    """This step's coin (the same on every rank): True with probability ``cfg.fraction``."""
    if cfg.fraction >= 1.0:
        return True
    if cfg.fraction <= 0.0:
        return False
    h = hashlib.sha256(f"on-policy:{cfg.seed}:{step}".encode()).digest()
    return int.from_bytes(h[:8], "little") / 2.0 ** 64 < cfg.fraction


# Keys of a collated microbatch that describe the dataset's responses (stored teacher top-k,
# cross-tokenizer alignment): meaningless for the student's samples.
_RESPONSE_KEYS = ("teacher_values", "teacher_ids", "teacher_lse", "teacher_seq_logprob", "teacher_log_tail")


@torch.no_grad()
def resample_completions(model, mb: Dict[str, torch.Tensor], cfg: OnPolicyConfig, *, eos_id: int, pad_id: int,
                         vocab_size: int, sample_offset: int) -> Dict[str, torch.Tensor]:
    """``mb`` with each row's completion replaced by a sample of ``model`` (module docstring).

    Row ``r`` draws as global sample index ``sample_offset + r``. Rows without a completion
    (all-zero loss mask) are left as they are.
    """
    from nemo_kd.generation.sampling import generate

    if any(k.startswith("xtok_") for k in mb):
        raise ValueError("on-policy sampling does not support cross-tokenizer microbatches yet")
    inputs, labels, mask = mb["inputs"], mb["labels"], mb["loss_mask"]
    b, s = inputs.shape
    tokens = torch.cat([inputs[:, :1], labels], dim=1)  # [B, S+1]: the unshifted sequence
    token_mask = torch.cat([torch.zeros_like(mask[:, :1]), mask], dim=1) > 0
    has_completion = token_mask.any(dim=1)
    # the prompt: the tokens before the first completion token (a row without one keeps it all)
    prompt_len = torch.where(has_completion, token_mask.int().argmax(dim=1), torch.full((b,), s + 1)).tolist()
    # One batched call; max_length caps each row at the sequence length, so every sample fits
    # its row (its end token included when it finished). Row r draws as index sample_offset + r.
    gens = generate(model, [tokens[r, :max(p, 1)].tolist() for r, p in enumerate(prompt_len)],
                    cfg.sampling(cfg.max_new_tokens), eos_id=eos_id, pad_id=pad_id, vocab_size=vocab_size,
                    max_length=s + 1, sample_offset=sample_offset)
    new_tokens, new_mask = tokens.clone(), torch.zeros_like(token_mask)
    num_tokens = mb["num_tokens"].clone() if "num_tokens" in mb else None  # real input tokens per row
    for r, (p, gen) in enumerate(zip(prompt_len, gens)):
        if not bool(has_completion[r]):
            continue
        completion = gen.token_ids + ([eos_id] if gen.finished else [])
        new_tokens[r, p:] = pad_id
        new_tokens[r, p:p + len(completion)] = torch.tensor(completion, dtype=tokens.dtype)
        new_mask[r, p:p + len(completion)] = True
        if num_tokens is not None:
            num_tokens[r] = min(p + len(completion), s)
    out = {k: v for k, v in mb.items() if k not in _RESPONSE_KEYS}
    out.update(inputs=new_tokens[:, :-1].contiguous(), labels=new_tokens[:, 1:].contiguous(),
               loss_mask=new_mask[:, 1:].to(mask.dtype).contiguous())
    if num_tokens is not None:
        out["num_tokens"] = num_tokens
    return out


def resample_step(model, microbatches, cfg: OnPolicyConfig, *, step: int, global_batch_size: int, dp_rank: int,
                  eos_id: int, pad_id: int, vocab_size: int,
                  on_sampled: Optional[Callable[[int, Dict[str, torch.Tensor]], None]] = None) -> Optional[list]:
    """The step's microbatches on student samples, or ``None`` when the coin says dataset responses.

    Global row index: ``step·GBS + dp_rank·(rows on this rank) + row within this rank's step``.
    ``on_sampled(i, mb)`` is called as soon as microbatch ``i`` is drawn (a served teacher starts
    scoring it while the next one samples, :mod:`nemo_kd.training.served_teacher`).
    """
    if not use_student_samples(cfg, step):
        return None
    per_rank = sum(mb["inputs"].shape[0] for mb in microbatches)
    offset = step * global_batch_size + dp_rank * per_rank
    out = []
    for mb in microbatches:
        out.append(resample_completions(model, mb, cfg, eos_id=eos_id, pad_id=pad_id, vocab_size=vocab_size,
                                        sample_offset=offset))
        if on_sampled is not None:
            on_sampled(len(out) - 1, out[-1])
        offset += mb["inputs"].shape[0]
    return out
