"""The joint distillation objective, configured by weights.

For one global batch (all microbatches on all DP ranks)::

    L = w_kd  · Σ_rows ω_row · Σ_t m_t · D(p_T ‖ q_S)_t  / N_kd
      + w_sft · Σ_{rows ≠ negative} Σ_t m_t · CE_t       / N_sft
      + w_pref· Σ_pairs ℓ_pref(pair)                      / N_pairs

* ``D`` is the token-level divergence ``kd_loss_type`` (forward_kl, reverse_kl, jsd,
  skew_fkl, skew_rkl, akl) against the teacher's top-k (``topk_convention``
  renormalized | exact_tail) or full vocab-parallel logits (online teacher), with
  ``logits_scale`` / ``target_logits_scale`` inverse temperatures
  (:mod:`nemo_kd.losses.kd`).
* Cross-tokenizer teacher (:class:`~nemo_kd.align.loss.CrossTokenizerTeacher`: the
  teacher ran on its own rendering and tokenisation): ``D`` is
  :func:`~nemo_kd.align.loss.cross_tokenizer_kd_loss` per student row (mapped
  one-to-one groups: the top-k divergence above through the vocabulary map; other
  groups: the chain-rule group probability), ``m_t`` is restricted to the aligned
  student rows and ``N_kd`` counts those, so the KD term is the mean KL over aligned
  tokens. With equal tokenizers and templates it equals the same-tokenizer term.
* ``ω_row`` is 1 for an ordinary sample, ``positive_kd_weight`` for a preferred
  (teacher-generated) response and ``negative_kd_weight`` for a dispreferred
  (student-generated) one: the token-level ``L_pos`` and ``L_neg`` of dual
  preference distillation (Nanbeige4 report §3.3, whose weights are not published:
  defaults 1, 1).
* ``CE`` is the SFT cross-entropy at the reference labels; it is never applied to
  negative rows (maximising their likelihood would contradict the preference term).
* ``ℓ_pref`` is the sequence-level term of each (positive, negative) pair:
  ``dpkd`` (teacher as the DPO reference, arXiv 2406.19774), ``dpo``, ``ipo``,
  ``cpo`` or ``simpo`` (:mod:`nemo_kd.losses.preference`), from the student's
  sequence log-probs and, where a reference is used, the teacher's. Settings left at None
  (``preference_beta``, ``length_normalize``, ``simpo_gamma``, ``cpo_nll_length_normalize``)
  take the form's paper default: DPO and IPO are not length-normalised, DPKD is, SimPO runs at
  β = 2 with γ = β/2 and CPO averages its NLL over tokens (the table in that module).
* ``N_kd``, ``N_sft`` are the global counts of the tokens (or sequences, for
  ``reduction="sequence"``) each term covers and ``N_pairs`` the global number of
  pairs: every term is a mean over the whole global batch, never over a microbatch
  (:mod:`nemo_kd.losses.reduction`).

In-place logits gradient (``inplace_logits_grad``, default on). Where ONE autograd node
reads the student logits — one vocab-parallel log-prob pass
(:func:`~nemo_kd.losses.vocab_parallel.vocab_parallel_logprobs_at`) for top-k KD with
its labels (KD + SFT + preference share it), SFT / preference alone, top-k KD alone
(``exact_tail``: that pass; ``renormalized``: the gather of the k logits), or the fused
online full-vocab kernel (``kd_kernel="fused"``, every divergence, with its
label log-prob) — that node writes ``∂L/∂logits`` over the logits' own storage, so the
loss allocates no second ``[tokens, V/TP]`` buffer. The terms' gradients accumulate
inside that node (its upstream gradients are summed by autograd before it runs), so
KD + CE + preference is exact. Everything else the objective reads from the logits is
read in the forward, before any backward: ``token_agreement`` (``logits.detach()``),
the KD / CE values, the sequence log-probs of the preference term (from the same pass).
Configurations with two autograd readers of the logits fall back to a separate gradient
buffer, with a warning naming the reason (:meth:`DistillationObjective.inplace_blocker`):
SFT label smoothing (a ``Σ_v z_v`` term beside the log-prob pass), KD at
``logits_scale != 1`` together with label log-probs at temperature 1 (two passes), the
torch online full-vocab path, and
cross-tokenizer KD (mapped top-k + chain log-probs). Logits whose storage is a leaf
(user data, a parameter, or a view of one) are never overwritten. The caller's part of
the contract: nothing reads the logits after ``backward()`` — true of the Megatron step
(:mod:`nemo_kd.models.engine`); the write bumps autograd's version counter, so any other
autograd node that saved them fails loudly rather than silently.

:func:`objective_normalisers` computes the three counts from the masks of all of a
step's local microbatches (one small all-reduce over DP);
:meth:`DistillationObjective.__call__` returns one microbatch's contribution to
``L`` (sum the contributions over microbatches and DP ranks to get ``L``) and
detached metrics.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields, replace
from typing import Dict, Optional, Sequence

import torch

from nemo_kd.config_keys import check_keys
from nemo_kd.align.loss import CrossTokenizerTeacher
from nemo_kd.losses import preference as pref
from nemo_kd.losses.cross_entropy import vocab_parallel_cross_entropy
from nemo_kd.losses.divergences import LOSS_TYPES
from nemo_kd.losses.kd import (
    TOPK_CONVENTIONS,
    KDSettings,
    full_kd_loss,
    token_agreement,
    topk_kd_loss,
    vocab_parallel_argmax,
)
from nemo_kd.losses.projection import ProjectedLogits
from nemo_kd.losses.reduction import contribution, global_count, masked_sum, sum_over_ranks
from nemo_kd.losses.sequence import SequenceLogProbs, sequence_logprobs
from nemo_kd.losses.vocab_parallel import (
    ProcessGroup,
    logits_overwrite_blocker,
    mask_padded_vocab_,
    padded_vocab_valid_columns,
    resolve_impl,
    vocab_parallel_logprobs_at,
)

# Row roles in a microbatch.
ROLE_SINGLE, ROLE_POSITIVE, ROLE_NEGATIVE = 0, 1, 2
PREFERENCE_TYPES = ("dpkd", "dpo", "ipo", "cpo", "simpo")
REDUCTIONS = ("token", "sequence")
# kd_kernel: "auto" (default: the fused kernels for CUDA logits when Triton imports, the torch
# path elsewhere, e.g. on CPU; vocab_parallel.resolve_impl), "torch" (the chunked vocab-parallel
# log-prob primitive and, for an online teacher, nemo_kd.losses.full_vocab's chunked full-vocab
# path) or "fused" (Triton kernels: the vocab-parallel log-prob primitive for top-k KD, CE and
# sequence log-probs, nemo_kd.kernels.full_kd_triton for an online teacher's divergences; errors
# where a kernel cannot run).
KERNELS = ("torch", "fused", "auto")


@dataclass
class DistillationLossConfig:
    """Objective settings; the names follow NeMo-Aligner's KD config where it has one."""

    kd_loss_type: str = "forward_kl"
    topk_convention: str = "renormalized"
    kd_loss_weight: float = 1.0
    sft_loss_weight: float = 0.0
    logits_scale: float = 1.0
    target_logits_scale: float = 1.0
    temperature_squared: bool = False
    jsd_beta: float = 0.5
    skew_alpha: float = 0.1
    akl_mu: float = 0.5
    sft_label_smoothing: float = 0.0
    # Sequence-level preference term over (positive, negative) pairs. None: the form's paper default
    # (nemo_kd.losses.preference's table), resolved per form at the call; a value set is used as is.
    preference_loss_type: str = "dpkd"
    dpo_loss_weight: float = 0.0
    preference_beta: Optional[float] = None  # None: dpkd / dpo / cpo 0.1, simpo 2.0 (unused by ipo: ipo_tau)
    length_normalize: Optional[bool] = None  # dpkd / dpo / ipo rewards; None: dpkd true, dpo / ipo false
    preference_label_smoothing: float = 0.0
    ipo_tau: float = 0.1
    simpo_gamma: Optional[float] = None  # None: β/2 (SimPO's γ/β ≈ 0.5)
    cpo_nll_weight: float = 1.0
    cpo_nll_length_normalize: Optional[bool] = None  # None: true, per-token mean NLL (released code, TRL)
    # Token-level KD weights of the positive / negative responses (L_pos, L_neg).
    positive_kd_weight: float = 1.0
    negative_kd_weight: float = 1.0
    reduction: str = "token"
    kd_kernel: str = "auto"
    # Write the loss's logits gradient over the logits' own storage where one pass owns them
    # (module docstring; other configurations fall back with a warning). On by default: it
    # removes the loss's [tokens, V/TP] gradient buffer from the training step (issue 7's
    # memory target), the gradient is bit-identical (tests/test_inplace_grad.py), and the
    # training step's logits are dead after the loss (nemo_kd.models.engine). False: the
    # separate-buffer reference path.
    inplace_logits_grad: bool = True
    # Defer the output projection into the loss (nemo_kd.losses.projection): the training step
    # computes the logits output_layer_chunk_tokens rows at a time, so the [tokens, V/TP] logits
    # and their gradient never exist whole. Token-level terms take each chunk's gradient in the
    # forward (three output-layer matmuls, as unfused); a sequence-level preference term needs a
    # recompute in backward (four). Not for cross-tokenizer KD. The Megatron side is
    # nemo_kd.models.deferred_projection.
    fuse_output_layer: bool = False
    output_layer_chunk_tokens: int = 2048

    @classmethod
    def from_dict(cls, d) -> "DistillationLossConfig":
        d = dict(d or {})
        check_keys("loss config", d, {f.name for f in fields(cls)})
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def choice(name, allowed):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not one of {list(allowed)}")

        choice("kd_loss_type", LOSS_TYPES)
        choice("topk_convention", TOPK_CONVENTIONS)
        choice("preference_loss_type", PREFERENCE_TYPES)
        choice("reduction", REDUCTIONS)
        choice("kd_kernel", KERNELS)
        for name in ("kd_loss_weight", "sft_loss_weight", "dpo_loss_weight", "positive_kd_weight", "negative_kd_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("logits_scale", "target_logits_scale", "preference_beta", "ipo_tau"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.kd_loss_weight + self.sft_loss_weight + self.dpo_loss_weight == 0:
            raise ValueError("all of kd_loss_weight, sft_loss_weight and dpo_loss_weight are 0: nothing to train")
        if self.output_layer_chunk_tokens < 1:
            raise ValueError(f"output_layer_chunk_tokens must be >= 1, got {self.output_layer_chunk_tokens}")
        if not 0.0 <= self.sft_label_smoothing < 1.0:
            raise ValueError(f"sft_label_smoothing must be in [0, 1), got {self.sft_label_smoothing}")
        _ = self.kd_settings  # the KD keys' own checks (jsd_beta, skew_alpha, akl_mu in [0, 1]) at load time

    @property
    def kd_settings(self) -> KDSettings:
        """The token-level KD loss these keys describe, as every KD entry point takes it (validated there)."""
        return KDSettings(loss_type=self.kd_loss_type, jsd_beta=self.jsd_beta, skew_alpha=self.skew_alpha,
                          akl_mu=self.akl_mu, logits_scale=self.logits_scale,
                          target_logits_scale=self.target_logits_scale, temperature_squared=self.temperature_squared,
                          topk_convention=self.topk_convention)

    @property
    def needs_teacher(self) -> bool:
        return self.kd_loss_weight > 0 or (self.dpo_loss_weight > 0 and self.preference_loss_type in ("dpkd", "dpo", "ipo"))


@dataclass
class TopKTeacher:
    """Teacher top-k for each label position: raw logits and global ids ``[B, T, k]``, LSE ``[B, T]``.

    ``lse`` is the log-sum-exp of the *raw* logits (temperature 1), as the store keeps it.
    ``exact_tail`` needs it at ``target_logits_scale``, which top-k + LSE at temperature 1
    cannot give, so that combination is refused (:data:`STORED_LSE_TEMPERATURE_ERROR`).
    ``log_tail`` ``[B, T]`` (stores with the ``teacher_log_tail`` extension): the teacher's
    ``log Σ_{v ∉ top-k} p_v``, which ``exact_tail`` then reads instead of ``1 − Σ_k p``
    (:func:`~nemo_kd.losses.kd.topk_kd_loss`).
    """

    values: torch.Tensor
    ids: torch.Tensor
    lse: Optional[torch.Tensor] = None
    log_tail: Optional[torch.Tensor] = None


STORED_LSE_TEMPERATURE_ERROR = (
    "topk_convention='exact_tail' with target_logits_scale != 1 needs the teacher's log-sum-exp at that "
    "temperature, but stored top-k teachers keep it at temperature 1 (and the tail of the vocabulary is not "
    "stored): use topk_convention='renormalized' to scale the teacher's top-k, or target_logits_scale=1")


@dataclass
class FullTeacher:
    """Online teacher logits, this TP rank's vocab shard ``[B, T, V/TP]`` (student's sharding).

    Or a :class:`~nemo_kd.losses.projection.ProjectedLogits` (its final hidden states and
    output weight, ``kd.fuse_output_layer``): the teacher's logits are then computed chunk by
    chunk beside the student's and never exist whole either.
    """

    logits: object  # torch.Tensor | ProjectedLogits

    @property
    def projected(self) -> bool:
        return isinstance(self.logits, ProjectedLogits)

    def rows(self, n: int) -> torch.Tensor:
        """What the per-token terms read per row: logits ``[n, V/TP]`` or hidden states ``[n, H]``."""
        return self.logits.hidden.reshape(n, -1).detach() if self.projected else self.logits.reshape(n, -1)

    def chunk_logits(self, rows: torch.Tensor) -> torch.Tensor:
        """Logits of a chunk of :meth:`rows`."""
        return self.logits.project_rows(rows) if self.projected else rows


@dataclass
class ObjectiveBatch:
    """One microbatch as the objective sees it (labels already shifted).

    ``labels``/``loss_mask`` ``[B, T]``; ``roles`` ``[N]`` (ROLE_*), ``pair_ids`` ``[N]``
    (the pair a positive/negative sample belongs to, −1 otherwise; both samples of a pair
    must be in the same microbatch); ``teacher_seq_logprobs`` ``[N]`` the teacher's
    log-prob of each sample's completion (needed by dpkd/dpo/ipo). A sample is a row
    (``N = B``) unless ``samples`` ``[B, T]`` says which sample each position belongs to
    (packed rows, :mod:`nemo_kd.data.packing`: ``0..N−1`` over the microbatch, −1 on padding).
    """

    labels: torch.Tensor
    loss_mask: torch.Tensor
    teacher: Optional[object] = None  # TopKTeacher | FullTeacher | CrossTokenizerTeacher | None
    roles: Optional[torch.Tensor] = None
    pair_ids: Optional[torch.Tensor] = None
    teacher_seq_logprobs: Optional[torch.Tensor] = None
    samples: Optional[torch.Tensor] = None

    @property
    def num_samples(self) -> int:
        if self.samples is None:
            return self.labels.shape[0]
        return int(self.samples.max()) + 1 if self.samples.numel() else 0

    def roles_or_default(self) -> torch.Tensor:
        """``[N]``, one role a sample."""
        if self.roles is not None:
            return self.roles
        return torch.full((self.num_samples,), ROLE_SINGLE, dtype=torch.long, device=self.labels.device)

    def per_token(self, per_sample: torch.Tensor) -> torch.Tensor:
        """``[N]`` per-sample values at each position ``[B, T]`` (padding of a packed row: sample 0's; masked)."""
        if self.samples is None:
            return per_sample[:, None].expand(self.labels.shape)
        return per_sample[self.samples.clamp(min=0)]

    def sequence_logprobs(self, token_logprobs: torch.Tensor) -> SequenceLogProbs:
        """Each sample's completion log-prob (a row's, or a packed sample's positions)."""
        mask = self.loss_mask.bool()
        if self.samples is None:
            return sequence_logprobs(token_logprobs, mask)
        return sequence_logprobs(token_logprobs, mask, segments=self.samples, num_segments=self.num_samples)


@dataclass
class ObjectiveNormalisers:
    """Global counts (all microbatches, all DP ranks) each term is averaged over."""

    kd: torch.Tensor
    sft: torch.Tensor
    pairs: torch.Tensor


def _kd_row_weights(cfg: DistillationLossConfig, roles: torch.Tensor) -> torch.Tensor:
    w = torch.ones(roles.shape, dtype=torch.float64, device=roles.device)
    w = torch.where(roles == ROLE_POSITIVE, torch.full_like(w, cfg.positive_kd_weight), w)
    return torch.where(roles == ROLE_NEGATIVE, torch.full_like(w, cfg.negative_kd_weight), w)


def _term_masks(cfg: DistillationLossConfig, batch: ObjectiveBatch):
    roles = batch.per_token(batch.roles_or_default())
    mask = batch.loss_mask.bool()
    kd_mask = mask & (_kd_row_weights(cfg, roles) > 0)
    if isinstance(batch.teacher, CrossTokenizerTeacher):  # KD only on student tokens aligned to the teacher's
        kd_mask = kd_mask & batch.teacher.aligned_mask(mask.shape)
    sft_mask = mask & (roles != ROLE_NEGATIVE)
    return kd_mask, sft_mask


def _pairs(batch: ObjectiveBatch):
    """Row indices ``(positive [P], negative [P])`` of the preference pairs in this microbatch."""
    roles = batch.roles_or_default()
    if batch.pair_ids is None:
        empty = torch.zeros(0, dtype=torch.long, device=roles.device)
        return empty, empty
    pos = torch.nonzero(roles == ROLE_POSITIVE).flatten()
    neg = torch.nonzero(roles == ROLE_NEGATIVE).flatten()
    pos = pos[torch.argsort(batch.pair_ids[pos])]
    neg = neg[torch.argsort(batch.pair_ids[neg])]
    if pos.numel() != neg.numel() or not torch.equal(batch.pair_ids[pos], batch.pair_ids[neg]):
        raise ValueError(
            "every preference pair needs exactly one positive and one negative row in the same microbatch; "
            f"got pair ids {batch.pair_ids[pos].tolist()} (positive) vs {batch.pair_ids[neg].tolist()} (negative)"
        )
    return pos, neg


@torch.no_grad()
def objective_normalisers(
    cfg: DistillationLossConfig, microbatches: Sequence[ObjectiveBatch], dp_group: ProcessGroup = None,
    cp_group: ProcessGroup = None,
) -> ObjectiveNormalisers:
    """Global counts for every term from this rank's microbatches, all-reduced over ``dp_group``.

    Context parallelism: ``dp_group`` is the DP×CP group and ``cp_group`` the CP group. A CP rank holds
    its share of every row's positions, so the token counts add up over DP×CP; it holds every pair
    whole (the same rows as its CP peers), so the pairs are counted by CP rank 0 alone. One collective.
    ``reduction="sequence"`` needs whole rows and is refused under CP."""
    cp_size = _group_size(cp_group)
    check_reduction_under_context_parallel(cfg, cp_size)
    count_pairs = cp_size == 1 or torch.distributed.get_rank(cp_group) == 0
    kd_masks, sft_masks, pair_masks = [], [], []
    for mb in microbatches:
        kd_mask, sft_mask = _term_masks(cfg, mb)
        kd_masks.append(kd_mask)
        sft_masks.append(sft_mask)
        pairs = _pairs(mb)[0].numel() if count_pairs else 0
        pair_masks.append(torch.ones(pairs, dtype=torch.bool, device=mb.labels.device))
    counts = torch.stack([
        global_count(kd_masks, cfg.reduction), global_count(sft_masks, cfg.reduction), global_count(pair_masks, "token"),
    ])
    if dp_group is not None and torch.distributed.is_initialized() and torch.distributed.get_world_size(dp_group) > 1:
        torch.distributed.all_reduce(counts, group=dp_group)  # one collective for all three
    return ObjectiveNormalisers(kd=counts[0], sft=counts[1], pairs=counts[2])


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # this microbatch's contribution to L (differentiable scalar)
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)  # detached contributions / sums


def check_reduction_under_context_parallel(cfg: DistillationLossConfig, cp_size: int) -> None:
    """``reduction="sequence"`` needs each sequence's positions whole, which no CP rank holds: refused."""
    if cp_size > 1 and cfg.reduction == "sequence":
        raise ValueError(f"kd.reduction='sequence' with parallel.context_parallel_size={cp_size}: each sequence's "
                         "token mean needs all its positions, which no CP rank holds; use reduction='token' or "
                         "context_parallel_size=1")


def _group_size(group: ProcessGroup) -> int:
    return torch.distributed.get_world_size(group) if group is not None and torch.distributed.is_initialized() else 1


class DistillationObjective:
    """Computes one microbatch's contribution to the joint objective (module docstring)."""

    def __init__(self, cfg: DistillationLossConfig, group: ProcessGroup = None, vocab_size: Optional[int] = None,
                 cp_group: ProcessGroup = None):
        """``vocab_size``: the student's real vocabulary when its logits carry Megatron's padding
        columns (ids ``>= vocab_size``): they are no tokens, so every term reads them as
        :data:`~nemo_kd.losses.vocab_parallel.PADDED_VOCAB_LOGIT` (no probability, zero gradient)
        and label smoothing spreads over the real vocabulary. None: every column is a token.

        ``cp_group``: the context-parallel group when the batch holds this CP rank's positions of every
        row (:mod:`nemo_kd.data.context_parallel`). The per-token terms need nothing (their
        contributions add up over the ranks); each sample's sequence log-prob and length are summed over
        the group (:meth:`_over_context_parallel`), every CP rank then computes the same pair losses and
        adds ``1/CP`` of the preference term, metrics likewise, so that every output sums over the CP
        ranks to the microbatch's value and its gradient to the microbatch's gradient."""
        cfg.validate()
        self.cfg = cfg
        self.group = group
        self.vocab_size = vocab_size
        self.cp_group = cp_group
        self.cp_size = _group_size(cp_group)

    def _need_label_lp(self, batch: ObjectiveBatch) -> bool:
        # Token log-probs at the labels serve both the SFT term (CE = −log q_y without
        # smoothing) and the sequence log-probs of the preference term, at temperature 1
        # (logits_scale is a KD setting); with a top-k teacher they come from the KD's own pass.
        c = self.cfg
        need_seq = c.dpo_loss_weight > 0 and _pairs(batch)[0].numel() > 0
        return need_seq or (c.sft_loss_weight > 0 and c.sft_label_smoothing == 0.0)

    def inplace_blocker(self, logits: torch.Tensor, batch: ObjectiveBatch) -> Optional[str]:
        """Why this microbatch's logits gradient will NOT be written in place (``None``: it will).

        ``logits``: ``[N, V/TP]`` as :meth:`__call__` flattens them. In place needs a
        single autograd reader of the logits (module docstring) and disposable storage
        (:func:`~nemo_kd.losses.vocab_parallel.logits_overwrite_blocker`).
        """
        c = self.cfg
        if not c.inplace_logits_grad:
            return "inplace_logits_grad=False"
        reason = logits_overwrite_blocker(logits)
        if reason is not None:
            return reason
        return self._inplace_config_blocker(batch, logits)

    def _inplace_config_blocker(self, batch: ObjectiveBatch, logits) -> Optional[str]:
        """The configuration's reason for two autograd readers of the logits (``None``: one).

        ``logits``: a tensor, or :class:`ProjectedLogits` (whose chunks are fresh, contiguous
        matmul outputs); only their device, dtype and column stride are read.
        """
        c = self.cfg
        if c.sft_loss_weight > 0 and c.sft_label_smoothing > 0:
            return "SFT label smoothing differentiates Σ_v z_v beside the log-prob pass (two readers of the logits)"
        if c.kd_loss_weight == 0:
            return None  # SFT / preference: one log-prob pass at the labels
        teacher = batch.teacher
        if isinstance(teacher, CrossTokenizerTeacher):
            return "cross-tokenizer KD reads the logits in several passes (mapped top-k and chain log-probs)"
        if c.logits_scale != 1.0 and self._need_label_lp(batch):
            return ("KD at logits_scale != 1 and the label log-probs at temperature 1 are two passes over the "
                    "logits")
        impl = resolve_impl(c.kd_kernel, logits)
        if isinstance(teacher, FullTeacher):
            fused_types = ()
            if impl == "fused":
                try:
                    from nemo_kd.kernels.full_kd_triton import FUSED_FULL_LOSS_TYPES as fused_types
                except ImportError:
                    pass
            if c.kd_loss_type not in fused_types:
                return (f"online full-vocab KD without the fused kernel (kd_kernel={c.kd_kernel!r}, "
                        f"kd_loss_type={c.kd_loss_type!r}) runs the chunked torch path, which allocates its own gradient "
                        f"buffer in the forward")
        if impl == "fused" and not isinstance(logits, ProjectedLogits) and logits.stride(-1) != 1:
            return "the fused kernels write in place only into logits with unit column stride"
        return None

    def _kd_per_token(self, logits: torch.Tensor, teacher, labels: Optional[torch.Tensor], inplace: bool = False):
        """``(kd [N], log q(label) [N] or None)``; top-k KD shares its vocab pass with the labels."""
        c = self.cfg
        settings = c.kd_settings
        run = dict(group=self.group, impl=c.kd_kernel, label_ids=labels, inplace_backward=inplace)
        n = logits.shape[0]
        if isinstance(teacher, TopKTeacher):
            if c.topk_convention == "exact_tail" and c.target_logits_scale != 1.0:
                raise ValueError(STORED_LSE_TEMPERATURE_ERROR)
            k = teacher.values.shape[-1]
            lse = teacher.lse.reshape(n) if teacher.lse is not None else None
            log_tail = teacher.log_tail.reshape(n) if teacher.log_tail is not None else None
            out = topk_kd_loss(logits, teacher.values.reshape(n, k), teacher.ids.reshape(n, k), settings,
                               teacher_lse=lse, teacher_log_tail=log_tail, **run)
            return out if labels is not None else (out, None)
        if isinstance(teacher, FullTeacher):
            out = full_kd_loss(logits, teacher.logits.reshape(n, -1), settings, **run)
            return out if labels is not None else (out, None)
        raise ValueError("kd_loss_weight > 0 needs a teacher (TopKTeacher or FullTeacher) in the batch")

    def _row_terms(self, z: torch.Tensor, labels, t_values, t_ids, t_lse, t_logits, t_log_tail=None, *, need_kd: bool,
                   need_label_lp: bool, inplace: bool, with_argmax: bool):
        """Per-token terms from logits rows ``z`` ``[n, V/TP]``: ``(kd, log q(label), smoothed CE, student
        argmax, online teacher's argmax)``.

        Row-wise (row ``i`` of each output reads row ``i`` of ``z`` and of the row inputs
        only), so it runs on the whole microbatch or, under a deferred output projection,
        chunk by chunk (:meth:`ProjectedLogits.map_rows`). Terms not asked for are None.
        """
        c = self.cfg
        kd = token_lp = ce = argmax = t_argmax = None
        if with_argmax:  # read before any backward can overwrite z
            argmax = vocab_parallel_argmax(z.detach(), self.group)
            if t_logits is not None:
                t_argmax = vocab_parallel_argmax(t_logits, self.group)
        if need_kd:
            teacher = TopKTeacher(t_values, t_ids, t_lse, t_log_tail) if t_values is not None else FullTeacher(t_logits)
            kd, token_lp = self._kd_per_token(z, teacher, labels if need_label_lp else None, inplace)
        if need_label_lp and token_lp is None:  # no KD pass to share (in place only if no KD read the logits)
            token_lp = vocab_parallel_logprobs_at(z, labels, group=self.group, impl=c.kd_kernel,
                                                  inplace_backward=inplace and c.kd_loss_weight == 0)[0]
        if c.sft_loss_weight > 0 and c.sft_label_smoothing > 0:
            ce = vocab_parallel_cross_entropy(z, labels, label_smoothing=c.sft_label_smoothing, group=self.group,
                                              impl=c.kd_kernel, vocab_size=self.vocab_size)
        return kd, token_lp, ce, argmax, t_argmax

    def __call__(self, student_logits, batch: ObjectiveBatch, norms: ObjectiveNormalisers) -> ObjectiveOutput:
        """``student_logits``: ``[B, T, V/TP]`` (or ``[B·T, V/TP]``) this rank's vocab shard, or a
        :class:`~nemo_kd.losses.projection.ProjectedLogits` (the output projection deferred into
        the loss: the same terms, computed chunk by chunk; not for cross-tokenizer KD)."""
        c = self.cfg
        shape = batch.labels.shape
        projected = isinstance(student_logits, ProjectedLogits)
        xtok = isinstance(batch.teacher, CrossTokenizerTeacher) and c.kd_loss_weight > 0
        if projected and xtok:
            raise ValueError("fuse_output_layer does not cover cross-tokenizer KD (its mapped top-k and chain "
                             "log-probs read the logits across rows): set fuse_output_layer=false")
        if self.vocab_size is not None:  # Megatron's padded vocabulary columns are not tokens
            if projected:
                if student_logits.valid_columns is None:
                    student_logits = replace(student_logits, valid_columns=padded_vocab_valid_columns(
                        student_logits.shape[-1], self.vocab_size, self.group))
            else:  # in place: the logits' gradient there is 0 (autograd records the copy)
                student_logits = mask_padded_vocab_(student_logits, self.vocab_size, self.group)
        logits = student_logits if projected else student_logits.reshape(-1, student_logits.shape[-1])
        labels = batch.labels.reshape(-1)
        kd_mask, sft_mask = _term_masks(c, batch)
        roles = batch.per_token(batch.roles_or_default())  # [B, T]: a packed row holds several samples
        loss = torch.zeros((), dtype=torch.float32, device=logits.device)
        metrics: Dict[str, torch.Tensor] = {}

        pairs_pos, pairs_neg = _pairs(batch)
        need_seq = c.dpo_loss_weight > 0 and pairs_pos.numel() > 0
        need_label_lp = self._need_label_lp(batch)
        inplace = False
        if not projected:
            # At most one pass below gets inplace=True: the single pass that reads the logits.
            blocker = self.inplace_blocker(logits, batch)
            inplace = blocker is None
            if c.inplace_logits_grad and blocker is not None and logits.requires_grad and torch.is_grad_enabled():
                config_reason = self._inplace_config_blocker(batch, logits)
                if config_reason is not None:  # a leaf's storage is protected on purpose: no warning
                    warnings.warn(f"inplace_logits_grad: {config_reason}; the logits gradient goes to a separate "
                                  "buffer (inplace_logits_grad=False silences this)",
                                  stacklevel=2)

        if xtok:
            xtok = batch.teacher.kd_loss(logits, c.kd_settings, group=self.group, impl=c.kd_kernel)
        need_kd = c.kd_loss_weight > 0 and not xtok
        teacher = batch.teacher if need_kd else None
        n = labels.shape[0]
        rows = (labels,
                teacher.values.reshape(n, -1) if isinstance(teacher, TopKTeacher) else None,
                teacher.ids.reshape(n, -1) if isinstance(teacher, TopKTeacher) else None,
                teacher.lse.reshape(n) if isinstance(teacher, TopKTeacher) and teacher.lse is not None else None,
                teacher.rows(n) if isinstance(teacher, FullTeacher) else None,
                teacher.log_tail.reshape(n) if isinstance(teacher, TopKTeacher) and teacher.log_tail is not None
                else None)
        full_teacher = teacher if isinstance(teacher, FullTeacher) else None
        if need_kd and rows[1] is None and rows[4] is None:
            raise ValueError("kd_loss_weight > 0 needs a teacher (TopKTeacher or FullTeacher) in the batch")
        terms = dict(need_kd=need_kd, need_label_lp=need_label_lp)
        token_loss = None  # set when the projection computes the token-level loss itself
        if projected:
            # A chunk being differentiated is the projection's own: written over when one pass reads it
            # (decided once here, not per chunk: the reason depends on the configuration only).
            chunk_inplace = c.inplace_logits_grad and self._inplace_config_blocker(batch, logits) is None

            def per_chunk(z, labels_c, tv, ti, tl, t_rows, t_tail, differentiate, metrics):
                t_logits = full_teacher.chunk_logits(t_rows) if full_teacher is not None else None
                return self._row_terms(z, labels_c, tv, ti, tl, t_logits, t_tail, **terms,
                                       inplace=differentiate and chunk_inplace, with_argmax=need_kd and metrics)

            if not need_seq and torch.is_grad_enabled() and logits.requires_grad:
                # The loss is linear in the per-token terms: their coefficients are known now, so the
                # projection takes each chunk's gradient while its logits are live (no recompute).
                coeffs = self._token_coefficients(shape, kd_mask, sft_mask, roles, norms, need_kd, need_label_lp)
                token_loss, (kd, token_lp, ce, student_argmax, teacher_argmax) = logits.linear_loss(
                    per_chunk, coeffs, *rows)
            else:
                kd, token_lp, ce, student_argmax, teacher_argmax = logits.map_rows(per_chunk, *rows)
        else:
            if full_teacher is not None and full_teacher.projected:  # a deferred teacher beside whole student logits
                rows = rows[:4] + (full_teacher.chunk_logits(rows[4]),) + rows[5:]
            kd, token_lp, ce, student_argmax, teacher_argmax = self._row_terms(logits, *rows, **terms,
                                                                               inplace=inplace, with_argmax=need_kd)
        if xtok:
            kd = xtok.per_token
        terms_loss, kd_term, sft_term = self._token_level_loss(kd, token_lp, ce, shape, kd_mask, sft_mask, roles, norms)
        loss = loss + (terms_loss if token_loss is None else token_loss)
        if need_label_lp:
            token_lp = token_lp.reshape(shape)
        if kd_term is not None:
            metrics["kd_loss"] = kd_term.detach()
            metrics["teacher_student_kd_sum"] = masked_sum(kd.detach().reshape(shape), kd_mask)
            metrics["kd_tokens"] = kd_mask.sum()
            if not xtok:
                metrics["token_agreement"] = self._token_agreement(student_argmax, teacher, kd_mask.reshape(-1),
                                                                   teacher_argmax)
            else:  # argmax agreement where the teacher's distribution maps one-to-one onto the student's
                metrics["token_agreement"] = token_agreement(
                    logits.detach(), xtok.mapped_topk_ids, self.group, teacher_topk_logits=xtok.mapped_topk_logits,
                    mask=kd_mask.reshape(-1) & xtok.one_to_one_mask)
                xb = batch.teacher.batch
                metrics["xtok_one_to_one"] = torch.tensor(float(xb.num_one_to_one))
                metrics["xtok_completion_tokens"] = torch.tensor(float(xb.num_student_tokens))
                metrics["xtok_vocab_coverage"] = xtok.metrics["vocab_teacher_coverage"]
        if sft_term is not None:
            metrics["sft_loss"] = sft_term.detach()

        if need_seq:
            seq = self._over_context_parallel(batch.sequence_logprobs(token_lp))
            out = self._preference(seq, batch, pairs_pos, pairs_neg)
            # each CP rank holds every pair whole: 1/CP of the term (and of its metrics) here, the sum over CP
            share = 1.0 / self.cp_size
            pref_term = out.losses.sum() * share / norms.pairs.clamp(min=1).to(out.losses.dtype)
            loss = loss + c.dpo_loss_weight * pref_term
            metrics["preference_loss"] = pref_term.detach()
            metrics["preference_margin_sum"] = out.margins.detach().sum() * share
            metrics["preference_accuracy_sum"] = (out.margins > 0).sum() * share
            metrics["pairs"] = torch.tensor(pairs_pos.numel() * share)
        return ObjectiveOutput(loss=loss, metrics=metrics)

    def _over_context_parallel(self, seq: SequenceLogProbs) -> SequenceLogProbs:
        """Each sample's log-prob and length over the whole row: this CP rank's partial sums added over the
        CP group (the same totals on every rank; :func:`~nemo_kd.losses.reduction.sum_over_ranks`,
        whose backward hands each rank's partial sum the whole ``∂ℓ/∂ log π`` of the pair losses that every
        rank adds ``1/CP`` of)."""
        if self.cp_size == 1:
            return seq
        total = sum_over_ranks(seq.sum, self.cp_group)
        length = seq.length.clone()
        torch.distributed.all_reduce(length, group=self.cp_group)
        return SequenceLogProbs(sum=total, mean=total / length.clamp(min=1).to(total.dtype), length=length)

    def _token_level_loss(self, kd, token_lp, ce, shape, kd_mask, sft_mask, roles, norms):
        """``(w_kd·KD term + w_sft·SFT term, KD term, SFT term)`` from per-token values (None: not used)."""
        c = self.cfg
        loss, kd_term, sft_term = 0.0, None, None
        if c.kd_loss_weight > 0:
            kd = kd.reshape(shape)
            weighted = kd * _kd_row_weights(c, roles).to(kd.dtype)
            kd_term = contribution(weighted, kd_mask, norms.kd, c.reduction)
            loss = loss + c.kd_loss_weight * kd_term
        if c.sft_loss_weight > 0:
            ce = -token_lp.reshape(shape) if c.sft_label_smoothing == 0.0 else ce.reshape(shape)
            sft_term = contribution(ce, sft_mask, norms.sft, c.reduction)
            loss = loss + c.sft_loss_weight * sft_term
        return loss, kd_term, sft_term

    def _token_coefficients(self, shape, kd_mask, sft_mask, roles, norms, need_kd, need_label_lp):
        """``∂L/∂`` each output of :meth:`_row_terms` per token ``[N]`` (None: no gradient): the
        token-level loss is linear in them (masks, row weights and global normalisers only)."""
        c = self.cfg
        n = shape.numel()
        probes = [torch.zeros(n, dtype=torch.float64, device=kd_mask.device, requires_grad=True) if want else None
                  for want in (need_kd, need_label_lp, c.sft_loss_weight > 0 and c.sft_label_smoothing > 0)]
        with torch.enable_grad():
            loss, _, _ = self._token_level_loss(*probes, shape, kd_mask, sft_mask, roles, norms)
            used = [p for p in probes if p is not None]
            grads = iter(torch.autograd.grad(loss, used, allow_unused=True)) if torch.is_tensor(loss) else iter(())
        out = [next(grads) if p is not None else None for p in probes]
        return (*[g if g is None else g.detach() for g in out], None, None)  # the two argmaxes: no gradient

    def _token_agreement(self, student_argmax: torch.Tensor, teacher, mask: torch.Tensor,
                         teacher_argmax: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Fraction of KD tokens where the student's argmax is the teacher's (the online teacher's
        argmax comes from the per-token pass, ``teacher_argmax``)."""
        n = student_argmax.shape[0]
        if isinstance(teacher, TopKTeacher):
            return token_agreement(None, teacher.ids.reshape(n, -1), self.group, student_argmax=student_argmax,
                                   teacher_topk_logits=teacher.values.reshape(n, -1), mask=mask)
        return token_agreement(None, teacher_argmax, self.group, student_argmax=student_argmax, mask=mask)

    @torch.no_grad()
    def _online_teacher_seq_logprobs(self, batch: ObjectiveBatch) -> torch.Tensor:
        """``log p(y | x)`` of each row's completion under the online teacher (temperature 1,
        its full vocab-parallel logits, as its KD term sees them), the DPKD/DPO reference."""
        teacher, labels = batch.teacher, batch.labels.reshape(-1)
        if teacher.projected:  # chunk by chunk from its hidden states
            lp = teacher.logits.map_rows(
                lambda z, y, differentiate, metrics: (vocab_parallel_logprobs_at(z, y, group=self.group)[0],),
                labels)[0]
        else:
            logits = teacher.logits.reshape(-1, teacher.logits.shape[-1])
            lp = vocab_parallel_logprobs_at(logits, labels, group=self.group)[0]
        total = batch.sequence_logprobs(lp.reshape(batch.labels.shape).double()).sum
        if self.cp_size > 1:  # this CP rank's positions of each sample: the whole sample's over the group
            torch.distributed.all_reduce(total, group=self.cp_group)
        return total

    def _preference(self, seq, batch: ObjectiveBatch, pos, neg) -> pref.PreferenceOutput:
        """The preference form's per-pair losses; settings left None take the form's own (paper) default."""
        c = self.cfg
        pol_w, pol_l = seq.sum[pos], seq.sum[neg]
        len_w, len_l = seq.length[pos], seq.length[neg]
        t = c.preference_loss_type

        def chosen(**kw):  # only the settings the user gave: the loss functions' defaults are the papers'
            return {k: v for k, v in kw.items() if v is not None}

        if t in ("dpkd", "dpo", "ipo"):
            ref = batch.teacher_seq_logprobs
            if ref is None and isinstance(batch.teacher, FullTeacher):
                ref = self._online_teacher_seq_logprobs(batch)
            if ref is None:
                raise ValueError(f"preference_loss_type={t!r} needs teacher_seq_logprobs (the teacher is the reference): "
                                 "a store made by compute_topk_logits, or an online teacher")
            ref = ref.detach().to(pol_w.dtype)
            ref_w, ref_l = ref[pos], ref[neg]
            if t == "ipo":
                return pref.ipo_loss(pol_w, pol_l, ref_w, ref_l, tau=c.ipo_tau, chosen_lengths=len_w,
                                     rejected_lengths=len_l, **chosen(length_normalize=c.length_normalize))
            if t == "dpkd":  # the teacher's output is preferred, the teacher is the reference
                return pref.dpkd_loss(pol_w, pol_l, ref_w, ref_l, len_w, len_l,
                                      label_smoothing=c.preference_label_smoothing,
                                      **chosen(beta=c.preference_beta, length_normalize=c.length_normalize))
            return pref.dpo_loss(pol_w, pol_l, ref_w, ref_l, label_smoothing=c.preference_label_smoothing,
                                 chosen_lengths=len_w, rejected_lengths=len_l,
                                 **chosen(beta=c.preference_beta, length_normalize=c.length_normalize))
        if t == "cpo":
            return pref.cpo_loss(pol_w, pol_l, nll_weight=c.cpo_nll_weight, chosen_lengths=len_w,
                                 label_smoothing=c.preference_label_smoothing,
                                 **chosen(beta=c.preference_beta, length_normalize_nll=c.cpo_nll_length_normalize))
        return pref.simpo_loss(pol_w, pol_l, len_w, len_l, label_smoothing=c.preference_label_smoothing,
                               **chosen(beta=c.preference_beta, gamma=c.simpo_gamma))
