"""``compute_topk_logits``: run a (TP/PP/DP-sharded) teacher over a dataset into the logits store.

Pipeline, per DP rank::

    records (read_records: file:line errors / skip_bad_samples)
      -> ConversationTokenizer (chat template or plain; over-long samples truncated or dropped, counted)
      -> this DP rank's contiguous sample block (shard_sample_range)
      -> resume at the store writer's next_sample_index
      -> fixed batches -> teacher forward -> teacher_token_stats (top-k / LSE / label log-prob / log tail, TP group)
      -> StoreWriter.append per sample -> commit every ``commit_every`` batches -> finalize

Rows and labels. For a sample of ``L`` tokens whose completion starts at position
``P`` (``P >= 1``), completion token ``j`` (``P <= j < L``) is predicted by the
teacher's output at position ``j - 1``: the store's row ``j - P`` holds the top-k of
``logits[j - 1]`` and the label log-prob ``log p(token_j | tokens_<j)``; the sample's
``seq_logprob`` is the float64 sum of those. A sample dropped as over-long is written
with 0 tokens, so store index == dataset index.

Log tail mass. An in-process teacher (Megatron, Hugging Face) also stores, per token, its
log-probability outside the top-k (``log Σ_{v ∉ top-k} p_v``, a direct float64 sum over the full
vocabulary: the store's ``teacher_log_tail`` extension), which ``exact_tail`` reads instead of
``1 − Σ_k p``. A served teacher (log-probs over HTTP, no full vocabulary) and cross-tokenizer
stores have none.

Cross-tokenizer (``align_teacher_template: true``, store format version 2). The
teacher renders every conversation with *its own* chat template and tokenizer (the
``tokenizer`` argument; ``prompt_format`` as usual) – exactly the same teacher input as
the same-tokenizer path, so the top-k payload is the same – and the student's rendering
(``student_tokenizer`` / ``student_prompt_format`` / ``student_max_seq_length``) is
tokenised alongside, on the writer ranks only. Per sample the writer also stores the
student↔teacher completion-token alignment (:func:`nemo_kd.align.align_samples`), the
teacher's completion token ids and their log-probs (the chain-rule terms of
:func:`nemo_kd.align.cross_tokenizer_kd_loss`); the manifest records both tokenizer
hashes, the alignment version and the teacher → student vocabulary map
(:func:`nemo_kd.align.build_vocab_map`). A sample dropped as over-long on either side
keeps its row with an empty alignment. ``align_teacher_template: false`` (default)
runs none of this: the store is format version 1, byte-identical to before.

Determinism and resume. Batches are aligned to absolute offsets in the rank's block
(batch ``b`` holds samples ``block.start + b·batch_size ...``), are right-padded to
their own longest sample, and only whole batches are committed, so a resumed run
processes exactly the batches an uninterrupted run would and writes the same bytes
(``tests/test_extract.py`` kills the script with SIGKILL and compares).

Who does what. Every rank tokenises its DP block and runs the teacher; only TP rank 0
of the last pipeline stage of each DP replica opens a :class:`StoreWriter` (shard =
DP rank). The writer's resume point is shared with the other ranks of its replica by
two small all-reduces (TP, then PP). The stats are computed inside Megatron's
``loss_func`` on the last stage, one micro-batch at a time (see
:mod:`nemo_kd.teacher.teachers`); an error there (e.g. NaN logits, naming the
sample) is caught, the schedule drains, and a per-batch flag all-reduced over the
pipeline makes every stage raise instead of hanging. Global rank 0 shows a tqdm bar
(its block's samples, completion tokens/s).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from nemo_kd.data.packing import pack_plan
from nemo_kd.data.records import RecordSet, read_records
from nemo_kd.data.tokenization import ConversationTokenizer, TokenizationError, TokenizedSample
from nemo_kd.losses.projection import ProjectedLogits
from nemo_kd.losses.token_stats import teacher_token_stats
from nemo_kd.teacher.store import (
    ALIGNMENT_EXTENSION,
    LOG_TAIL_EXTENSION,
    StoredAlignment,
    StoreManifest,
    StoreWriter,
    cross_tokenizer_extension,
    finalize_manifest,
    log_tail_extension,
    shard_sample_range,
)
from nemo_kd.teacher.served import SERVED_TEACHER_EXTENSION, ServedTeacher, ServedTeacherConfig
from nemo_kd.teacher.teachers import Teacher, TeacherSpec, build_teacher

__all__ = ["ExtractConfig", "ExtractSummary", "compute_topk_logits", "run_from_config", "main"]

# Test hook: seconds to sleep after each batch (lets the kill-and-resume test land a SIGKILL mid-run).
_BATCH_DELAY_ENV = "NEMO_KD_EXTRACT_BATCH_DELAY"

log = logging.getLogger(__name__)


@dataclass
class ExtractConfig:
    """Settings of one extraction run (``conf/compute_topk_logits.yaml`` mirrors these)."""

    data_path: str
    output_path: str
    top_k: int = 100  # NeMo-Aligner's default
    values_dtype: str = "bfloat16"  # float32 | bfloat16 | float16 (ids int32 and LSE fp32 always)
    prompt_format: str = "chat"  # chat | plain
    max_seq_length: int = 2048
    overlong: str = "truncate"  # truncate | drop
    skip_bad_samples: bool = False
    split: Optional[str] = None  # split of a DatasetDict directory
    batch_size: int = 8
    micro_batch_size: Optional[int] = None  # None: batch_size (raise it above 1 micro-batch for PP)
    commit_every: int = 1  # batches between durable commits
    progress: bool = True
    # Cross-tokenizer (store format version 2): the teacher keeps its own template/tokenizer, the
    # student's rendering is aligned to it (module docstring).
    align_teacher_template: bool = False
    student_tokenizer_path: Optional[str] = None  # HF tokenizer directory of the student (run_from_config)
    student_prompt_format: str = "chat"  # chat (the student tokenizer's template) | plain
    student_max_seq_length: Optional[int] = None  # None: max_seq_length (must equal the training data's)
    # Megatron teacher: project only the completion positions' hidden states onto the vocabulary,
    # output_layer_chunk_tokens at a time (nemo_kd.losses.projection), instead of computing
    # [batch, seq, V/TP] logits for every position (prompt and padding included).
    fuse_output_layer: bool = False
    output_layer_chunk_tokens: int = 2048
    # Megatron teacher: each batch's samples packed into rows of max_seq_length (nemo_kd.data.packing:
    # first-fit decreasing, attention kept inside each sample, positions restarting) instead of one
    # right-padded row each; the same store. micro_batch_size then counts rows (None: 1).
    pack_sequences: bool = False
    pack_length: Optional[int] = None  # packed row length (None: max_seq_length), <= the teacher's positions
    # Store the teacher's log tail mass per token (the store's teacher_log_tail extension, module docstring):
    # in-process teachers of a same-tokenizer store; a served teacher or a cross-tokenizer store has none.
    log_tail: bool = True

    def __post_init__(self):
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.output_layer_chunk_tokens < 1:
            raise ValueError(f"output_layer_chunk_tokens must be >= 1, got {self.output_layer_chunk_tokens}")
        if self.batch_size < 1 or self.commit_every < 1:
            raise ValueError("batch_size and commit_every must be >= 1")
        mbs = self.micro_batch_size or self.batch_size
        if mbs < 1 or (self.batch_size % mbs and not self.pack_sequences):  # packed: mbs counts rows
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({mbs})")
        if self.student_prompt_format not in ("chat", "plain"):
            raise ValueError(f"student_prompt_format must be 'chat' or 'plain', got {self.student_prompt_format!r}")


@dataclass
class ExtractSummary:
    """What a run did (global numbers, identical on every rank)."""

    output_path: str
    num_samples: int  # dataset samples (after skipping bad ones) == store samples
    num_tokens: int  # completion tokens in the finished store
    samples_processed: int  # samples this run computed (excludes samples resumed from disk)
    tokens_processed: int  # completion tokens this run computed
    resumed_samples: int  # samples already committed when this run started
    skipped: int  # malformed input samples skipped (skip_bad_samples)
    truncated: int  # over-long samples truncated (in the blocks processed by this run)
    dropped: int  # over-long samples dropped (written with 0 tokens)
    store_bytes: int  # payload + index (+ log tail) bytes of the finished store
    bytes_per_token: float
    elapsed_s: float  # wall time of the extraction loop (slowest rank)
    tokens_per_s: float  # tokens_processed / elapsed_s
    stats_s: float = 0.0  # time in top-k/LSE (slowest last-stage rank)
    write_s: float = 0.0  # time in append/commit/finalize (slowest writer)
    align_s: float = 0.0  # cross-tokenizer: student tokenisation + alignment (slowest writer)
    one_to_one_fraction: Optional[float] = None  # cross-tokenizer: student completion tokens aligned 1:1 (this run)
    skipped_report: str = ""
    manifest: Dict[str, Any] = field(default_factory=dict, repr=False)

    def format(self) -> str:
        lines = [
            f"teacher top-k logits store: {self.output_path}",
            f"  samples            {self.num_samples} ({self.samples_processed} computed now, {self.resumed_samples} resumed)",
            f"  completion tokens  {self.num_tokens} ({self.tokens_processed} computed now)",
            f"  bytes/token        {self.bytes_per_token:.2f} ({self.store_bytes} bytes)",
            f"  skipped bad input  {self.skipped}",
            f"  over-long          {self.truncated} truncated, {self.dropped} dropped",
            f"  time               {self.elapsed_s:.2f} s ({self.tokens_per_s:.1f} tokens/s;"
            f" top-k {self.stats_s:.2f} s, writing {self.write_s:.2f} s)",
        ]
        if self.one_to_one_fraction is not None:
            lines.append(f"  cross-tokenizer    {100 * self.one_to_one_fraction:.1f}% of student completion tokens "
                         f"aligned one-to-one (alignment {self.align_s:.2f} s)")
        if self.skipped_report:
            lines.append(self.skipped_report)
        return "\n".join(lines)


# ----------------------------------------------------------------------------- helpers


class _Layout:
    """Ranks of this process (works without torch.distributed / Megatron: a world of one)."""

    def __init__(self):
        from nemo_kd.parallel import state

        self.dist = dist.is_available() and dist.is_initialized()
        self.megatron = state.is_initialized()
        self.global_rank = dist.get_rank() if self.dist else 0
        if self.megatron:
            self.tp_rank, self.tp_size = state.tp_rank(), state.tp_size()
            self.pp_rank, self.pp_size = state.pp_rank(), state.pp_size()
            self.dp_rank, self.dp_size = state.dp_rank(), state.dp_size()
            self.tp_group, self.pp_group, self.dp_group = state.tp_group(), state.pp_group(), state.dp_group()
            self.last_stage = state.is_pipeline_last_stage()
        else:
            world = dist.get_world_size() if self.dist else 1
            self.tp_rank, self.tp_size, self.pp_rank, self.pp_size = 0, 1, 0, 1
            self.dp_rank, self.dp_size = self.global_rank, world
            self.tp_group = self.pp_group = None
            self.dp_group = dist.group.WORLD if self.dist else None
            self.last_stage = True

    def all_reduce_mp(self, t: torch.Tensor, op=None) -> torch.Tensor:
        """All-reduce over this DP replica's model-parallel ranks (TP, then PP)."""
        op = op or dist.ReduceOp.MAX
        if self.tp_size > 1:
            dist.all_reduce(t, op=op, group=self.tp_group)
        if self.pp_size > 1:
            dist.all_reduce(t, op=op, group=self.pp_group)
        return t

    def all_reduce_dp(self, t: torch.Tensor, op) -> torch.Tensor:
        if self.dist and self.dp_size > 1:
            dist.all_reduce(t, op=op, group=self.dp_group)
        return t

    def barrier(self) -> None:
        if self.dist:
            dist.barrier()


def _sample_name(records: RecordSet, i: int) -> str:
    r = records[i]
    return f"sample {i} ({r.source_file}:{r.source_line})" if r.source_file else f"sample {i}"


def _tokenize_block(records: RecordSet, ctok: ConversationTokenizer, block: range) -> List[Optional[TokenizedSample]]:
    out = []
    for i in block:
        ts = ctok(records[i].messages, sample_name=_sample_name(records, i))
        if ts is None:  # dropped as over-long; each rank names the drops of its own block
            log.warning("%s%s: not extracted, %s (stored with 0 tokens; training drops it too)",
                        f"id {records[i].id!r}, " if records[i].id is not None else "", _sample_name(records, i),
                        ctok.stats.dropped_reasons[-1])
        if ts is not None and ts.num_prompt_tokens < 1:
            raise TokenizationError(f"{_sample_name(records, i)}: the prompt renders to no tokens, so the first "
                                    "completion token has no teacher position predicting it")
        out.append(ts)
    return out


def _batches(block: range, start: int, batch_size: int):
    """Batches of ``block`` from ``start``, aligned to ``block.start + b * batch_size``."""
    i = start
    while i < block.stop:
        end = min(block.stop, block.start + ((i - block.start) // batch_size + 1) * batch_size)
        yield range(i, end)
        i = end


class _BatchStats:
    """Per-batch stats collected on the last stage (inside Megatron's loss_func)."""

    def __init__(self, rows, tokens_cpu, k, vocab_size, with_log_tail=False):
        self.rows, self.tokens, self.k, self.vocab_size = rows, tokens_cpu, k, vocab_size
        self.with_log_tail = with_log_tail
        self.parts: List[tuple] = []
        self.sample_of: List[torch.Tensor] = []  # each part's rows' sample indices
        self.error: Optional[BaseException] = None
        self.seconds = 0.0

    def __call__(self, first: int, logits: torch.Tensor, group) -> None:
        if self.error is not None:
            return  # every TP rank caught the same error: skip (collectives stay matched)
        t0 = time.perf_counter()
        try:
            seq = self.tokens.shape[1]
            # [mbs, S, V/TP] logits, or the deferred projection's [mbs·S, H] hidden states
            b = logits.shape[0] // seq if isinstance(logits, ProjectedLogits) else logits.shape[0]
            r_idx, pos, samples = [], [], []
            for r in range(first, first + b):
                row = self.rows[r]
                if row is None:
                    continue
                for sample, p, length, o in row:  # the row's samples (one when padded)
                    r_idx.append(torch.full((length - p,), r - first, dtype=torch.int64))
                    pos.append(torch.arange(o + p - 1, o + length - 1))
                    samples.append(torch.full((length - p,), sample, dtype=torch.int64))
            if not r_idx:
                return
            r_idx, pos, samples = torch.cat(r_idx), torch.cat(pos), torch.cat(samples)
            dev = logits.device
            labels = self.tokens[r_idx + first, pos + 1].to(dev)

            def stats_of(rows, labels, samples, positions, differentiate=False, metrics=True):
                st = teacher_token_stats(rows, self.k, labels, group=group, row_sample_index=samples,
                                         row_positions=positions, vocab_size=self.vocab_size,
                                         with_log_tail=self.with_log_tail)
                out = (st.values, st.ids, st.lse, st.label_logprobs)
                return out + (st.log_tail,) if self.with_log_tail else out

            if isinstance(logits, ProjectedLogits):
                # Deferred output projection: only the completion rows are projected, a chunk at a time
                # (no [B, S, V/TP] logits; prompt and padding positions skip the output layer).
                completion = ProjectedLogits(logits.hidden[(r_idx * seq + pos).to(dev)], logits.weight,
                                             logits.token_chunk)
                stats = completion.map_rows(stats_of, labels, samples, pos + 1)
            else:
                stats = stats_of(logits[r_idx.to(dev), pos.to(dev)], labels, samples, pos + 1)  # [n, V/TP]
            self.parts.append(tuple(t.cpu() for t in stats))
            self.sample_of.append(samples)
        except BaseException as e:  # noqa: BLE001 - re-raised after the pipeline schedule drains
            self.error = e
        finally:
            self.seconds += time.perf_counter() - t0

    def concatenated(self):
        """The parts' rows in sample order (packed rows hold samples out of order; each sample's own rows
        stay in position order: a stable sort)."""
        if not self.parts:
            return None
        out = [torch.cat([p[j] for p in self.parts]) for j in range(len(self.parts[0]))]
        if self.sample_of:
            order = torch.sort(torch.cat(self.sample_of), stable=True).indices
            out = [t[order] for t in out]
        return out


def _pack_batch(samples: List[Optional[TokenizedSample]], indices: range, micro_batch_size: int, seq: int):
    """:func:`_pad_batch` with the batch's samples packed into rows of ``seq`` (first-fit decreasing,
    :func:`~nemo_kd.data.packing.pack_plan`; a sample keeps all its tokens, so its labels stay in its
    segment): ``(tokens, rows, position_ids, segment_ids)``, ``rows[r]`` the row's samples
    ``[(sample, P, L, offset), ...]``."""
    real = [(i, s) for i, s in zip(indices, samples) if s is not None]
    if not real:
        return None, [], None, None
    plan = pack_plan([len(s.input_ids) for _, s in real], seq, window=len(real), shuffle=False)
    rows_n = -(-len(plan) // micro_batch_size) * micro_batch_size
    tokens = torch.zeros(rows_n, seq, dtype=torch.int64)
    positions = torch.zeros(rows_n, seq, dtype=torch.int64)
    segments = torch.full((rows_n, seq), -1, dtype=torch.int64)
    rows: List[Optional[list]] = [None] * rows_n
    for r, pack in enumerate(plan):
        rows[r], o = [], 0
        for j, q in enumerate(pack):
            i, s = real[q]
            n = len(s.input_ids)
            tokens[r, o:o + n] = torch.tensor(s.input_ids, dtype=torch.int64)
            positions[r, o:o + n] = torch.arange(n)
            segments[r, o:o + n] = j
            rows[r].append((i, s.num_prompt_tokens, n, o))
            o += n
    return tokens, rows, positions, segments


def _pad_batch(samples: List[Optional[TokenizedSample]], indices: range, micro_batch_size: int):
    """Right-padded ``[B, S]`` tokens (B a multiple of micro_batch_size) + per row its one sample
    ``[(sample, P, L, offset 0)]`` (the row format of :func:`_pack_batch`)."""
    real = [(i, s) for i, s in zip(indices, samples) if s is not None]
    if not real:
        return None, []
    seq = max(len(s.input_ids) for _, s in real)
    rows_n = -(-len(real) // micro_batch_size) * micro_batch_size
    tokens = torch.zeros(rows_n, seq, dtype=torch.int64)
    rows: List[Optional[list]] = [None] * rows_n
    for r, (i, s) in enumerate(real):
        tokens[r, : len(s.input_ids)] = torch.tensor(s.input_ids, dtype=torch.int64)
        rows[r] = [(i, s.num_prompt_tokens, len(s.input_ids), 0)]
    return tokens, rows


class _CrossTokenizer:
    """The student side of a cross-tokenizer extraction: its rendering, the alignment, the vocab map."""

    def __init__(self, cfg: ExtractConfig, teacher_ct: ConversationTokenizer, student_tokenizer, teacher: Teacher,
                 records: RecordSet):
        from nemo_kd.align import build_vocab_map

        if student_tokenizer is None:
            raise ValueError("align_teacher_template=true needs the student's tokenizer (student_tokenizer_path): "
                             "the alignment is made against the student's own rendering")
        self.teacher_ct, self.records = teacher_ct, records
        self.student_ct = ConversationTokenizer(student_tokenizer, cfg.student_prompt_format,
                                                cfg.student_max_seq_length or cfg.max_seq_length, cfg.overlong)
        t_tok = teacher_ct.tokenizer
        self.vocab_map = build_vocab_map(student_tokenizer, t_tok,
                                         teacher_vocab_size=max(int(teacher.vocab_size), len(t_tok)))
        self.extension, self.vocab_map_bytes = cross_tokenizer_extension(
            self.vocab_map, self.student_ct.hash, teacher_ct.hash, self.student_ct.max_seq_length)
        self.seconds = 0.0
        self.one_to_one = self.student_tokens = 0

    def alignment(self, i: int, t_sample: Optional[TokenizedSample], label_logprobs) -> StoredAlignment:
        from nemo_kd.align import align_rendered

        t0 = time.perf_counter()
        messages, name = list(self.records[i].messages), _sample_name(self.records, i)
        s_sample = self.student_ct(messages, sample_name=name)
        groups = align_rendered(messages, s_sample, t_sample, self.student_ct.tokenizer, self.teacher_ct.tokenizer,
                                name)
        t_ids = [] if t_sample is None else t_sample.input_ids[t_sample.num_prompt_tokens:]
        self.one_to_one += int(groups.one_to_one.sum())
        self.student_tokens += groups.num_student_tokens
        self.seconds += time.perf_counter() - t0
        return StoredAlignment.from_groups(groups, t_ids, label_logprobs)


# ----------------------------------------------------------------------------- the loop


def compute_topk_logits(
    cfg: ExtractConfig,
    teacher: Teacher,
    tokenizer,
    records: Optional[RecordSet] = None,
    student_tokenizer=None,
) -> ExtractSummary:
    """Extract ``cfg.top_k`` teacher logits per completion token of ``cfg.data_path`` into ``cfg.output_path``.

    Call on every rank (after :func:`nemo_kd.parallel.initialize_parallel` for a
    Megatron teacher; without it a single process is a world of one, or DP over an
    initialised ``torch.distributed`` world). ``tokenizer`` is a Hugging Face fast
    tokenizer (the teacher's). ``records`` overrides reading ``cfg.data_path``.
    Returns the same :class:`ExtractSummary` on every rank. ``student_tokenizer``
    (a fast tokenizer): the student's, for ``cfg.align_teacher_template`` (a
    cross-tokenizer store, module docstring).

    Raises:
        DataError: a malformed sample (``file:line: reason``) without ``skip_bad_samples``.
        NonFiniteLogitsError: NaN/Inf teacher logits (names the sample and position).
        StoreMismatchError: ``output_path`` holds a (partial) store built with other settings.
    """
    layout = _Layout()
    if records is None:
        records = read_records(cfg.data_path, skip_bad_samples=cfg.skip_bad_samples, split=cfg.split)
    max_len = cfg.max_seq_length
    if teacher.max_seq_length and max_len > teacher.max_seq_length:
        raise ValueError(f"max_seq_length {max_len} exceeds the teacher's max_position_embeddings "
                         f"{teacher.max_seq_length}")
    # A store is reproducible (resume writes the bytes an uninterrupted run writes; any DP / EP layout the same
    # store): refused rather than warned, since a warning scrolls by while a whole store gets written.
    # imported here, not at the top: nemo_kd.models loads Megatron, which `--help` must not wait for
    from nemo_kd.models.router_terms import check_token_dropping

    check_token_dropping(getattr(teacher, "model", None), "extracting top-k logits",
                         "a sample's stored logits would depend on its batch-mates (batch_size, micro_batch_size, "
                         "pack_sequences, the DP layout) and a resumed extraction would not write what an "
                         "uninterrupted one writes", "moe_expert_capacity_factor: null in the teacher checkpoint's "
                         "architecture (model_config.json of a converted checkpoint, gpt_config.json of a full one, "
                         "the student section of a .nemo's model_config.yaml) to extract from the dropless teacher",
                         refuse=True)
    ctok = ConversationTokenizer(tokenizer, cfg.prompt_format, max_len, cfg.overlong)
    num_samples = len(records)
    if num_samples == 0:  # a 0-sample store would pass every check and train on nothing
        raise ValueError(f"{cfg.data_path or records.source}: no samples to extract"
                         + (f" (every line was bad: {records.skipped_report()})" if records.skipped else ""))
    block = shard_sample_range(num_samples, layout.dp_rank, layout.dp_size)
    samples = _tokenize_block(records, ctok, block)

    manifest = StoreManifest(
        k=int(cfg.top_k), values_dtype=cfg.values_dtype, dataset_hash=records.content_hash,
        tokenizer_hash=ctok.hash, teacher_name=teacher.name, teacher_hash=teacher.hash,
        max_seq_length=max_len, num_samples=num_samples, logits_scale_applied=False, logits_scale=1.0,
        teacher_vocab_size=int(teacher.vocab_size),
    )
    if cfg.values_dtype != "float32":  # 16-bit values as log-probs (store format 3, see nemo_kd.teacher.store)
        manifest.values_encoding = "logprobs"
        manifest.format_version = manifest.min_reader_version = 3
    served = isinstance(teacher, ServedTeacher)  # log-probs over HTTP, LSE 0 (nemo_kd.teacher.served)
    if cfg.pack_sequences and not teacher.packs_sequences:
        raise ValueError(f"pack_sequences=true needs a Megatron teacher (it packs rows with a block attention "
                         f"mask); this teacher is {type(teacher).__name__}: set pack_sequences=false")
    if cfg.pack_sequences and cfg.pack_length is not None and not (
            cfg.max_seq_length <= cfg.pack_length <= (teacher.max_seq_length or cfg.pack_length)):
        raise ValueError(f"pack_length ({cfg.pack_length}) must lie between max_seq_length ({cfg.max_seq_length}) and "
                         f"the teacher's max_position_embeddings ({teacher.max_seq_length})")
    if served:
        manifest.extensions = {SERVED_TEACHER_EXTENSION: teacher.manifest_record}
    # The log tail mass needs the full vocabulary: in-process teachers only; cross-tokenizer stores go without.
    with_log_tail = cfg.log_tail and not served and not cfg.align_teacher_template
    if with_log_tail:
        manifest.extensions = dict(manifest.extensions, **{LOG_TAIL_EXTENSION: log_tail_extension()})
    if cfg.top_k > teacher.vocab_size:
        raise ValueError(f"top_k={cfg.top_k} exceeds the teacher's vocabulary ({teacher.vocab_size})")
    is_writer = teacher.owns_logits and layout.last_stage and layout.tp_rank == 0
    xtok = None
    if cfg.align_teacher_template:
        xtok = _CrossTokenizer(cfg, ctok, student_tokenizer, teacher, records)
        manifest.format_version = manifest.min_reader_version = max(2, manifest.format_version)
        manifest.extensions = dict(manifest.extensions, **{ALIGNMENT_EXTENSION: xtok.extension})
    elif student_tokenizer is not None:
        raise ValueError("a student tokenizer was given but align_teacher_template is false: the store would be "
                         "built for the teacher's tokenisation only (set align_teacher_template=true)")

    # Open the writer (resume) on the writer rank; share its resume point (or failure) with the replica.
    writer, open_error = None, None
    if is_writer:
        try:
            writer = StoreWriter(cfg.output_path, manifest, layout.dp_rank, layout.dp_size)
            if xtok is not None:
                writer.write_vocab_map(xtok.vocab_map_bytes)
        except BaseException as e:  # noqa: BLE001 - re-raised below, after telling the other ranks
            open_error = e
    info = torch.tensor([writer.next_sample_index if writer else -1, 1 if open_error else 0], dtype=torch.int64)
    layout.all_reduce_mp(info)
    if open_error is not None:
        raise open_error
    if int(info[1]):
        raise RuntimeError("the store writer of this data-parallel replica failed to open (see its rank's error)")
    start = int(info[0])
    resumed = start - block.start

    bar = None
    if cfg.progress and layout.global_rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=len(block), initial=resumed, unit="sample", dynamic_ncols=True, file=sys.stderr,
                   desc=f"top-k logits (DP rank 0 of {layout.dp_size})")

    delay = float(os.environ.get(_BATCH_DELAY_ENV, "0") or 0)
    # A served teacher scores this rank's remaining samples in order, requests running ahead of the writer.
    stream = teacher.stream(((i, samples[i - block.start]) for i in range(start, block.stop)), cfg.top_k,
                            lambda i: _sample_name(records, i)) if served else None
    # rows per forward: packed rows are few and long, so one at a time unless set
    mbs = cfg.micro_batch_size or (1 if cfg.pack_sequences else cfg.batch_size)
    samples_done = tokens_done = 0
    stats_s = write_s = 0.0
    t_loop = time.perf_counter()
    for b, indices in enumerate(_batches(block, start, cfg.batch_size)):
        batch_samples = [samples[i - block.start] for i in indices]
        positions = segments = None
        if served:
            tokens, rows = None, []
        elif cfg.pack_sequences:
            tokens, rows, positions, segments = _pack_batch(batch_samples, indices, mbs,
                                                            cfg.pack_length or cfg.max_seq_length)
        else:
            tokens, rows = _pad_batch(batch_samples, indices, mbs)
        collector = _BatchStats(rows, tokens, cfg.top_k, teacher.vocab_size, with_log_tail)
        if stream is not None:
            try:
                collector.parts, collector.seconds = stream.next_batch(indices, batch_samples)
            except BaseException:
                if writer is not None:  # release the shard (committed batches stay): a caller may rerun in-process
                    writer.close()
                raise
        elif tokens is not None:
            packing = dict(position_ids=positions, segment_ids=segments) if segments is not None else {}
            teacher.run(tokens, collector, mbs,
                        output_chunk_tokens=cfg.output_layer_chunk_tokens if cfg.fuse_output_layer else None,
                        **packing)
        stats_s += collector.seconds
        failed = torch.tensor([1 if collector.error is not None else 0], dtype=torch.int64)
        layout.all_reduce_mp(failed)
        if collector.error is not None:
            raise collector.error
        if int(failed[0]):
            raise RuntimeError(f"the teacher failed on the last pipeline stage in samples {indices.start}.."
                               f"{indices.stop - 1} (see that rank's error)")
        n_tokens = sum(s.num_completion_tokens for s in batch_samples if s is not None)
        if writer is not None:
            t0 = time.perf_counter()
            stats = collector.concatenated()
            offset = 0
            for i, s in zip(indices, batch_samples):
                if s is None:  # dropped as over-long: 0 tokens keeps store index == dataset index
                    writer.append(i, torch.zeros(0, cfg.top_k), torch.zeros(0, cfg.top_k, dtype=torch.int64),
                                  torch.zeros(0), 0.0, alignment=xtok.alignment(i, None, []) if xtok else None,
                                  log_tail=torch.zeros(0) if with_log_tail else None)
                    continue
                n = s.num_completion_tokens
                values, ids, lse, label_lp, *log_tail = (t[offset:offset + n] for t in stats)
                offset += n
                writer.append(i, values, ids, lse, float(label_lp.double().sum()),
                              alignment=xtok.alignment(i, s, label_lp) if xtok else None,
                              log_tail=log_tail[0] if log_tail else None)
            if (b + 1) % cfg.commit_every == 0:
                writer.commit()
            write_s += time.perf_counter() - t0
        samples_done += len(indices)
        tokens_done += n_tokens
        if bar is not None:
            bar.update(len(indices))
            elapsed = time.perf_counter() - t_loop
            bar.set_postfix_str(f"{tokens_done / max(elapsed, 1e-9):.0f} tok/s", refresh=False)
        if delay:
            time.sleep(delay)
    if writer is not None:
        t0 = time.perf_counter()
        writer.commit()
        writer.finalize()
        writer.close()
        write_s += time.perf_counter() - t0
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t_loop

    # Global totals: every replica's (tp, pp)-peer sums over DP; maxima over everything.
    counts = torch.tensor([samples_done, tokens_done, resumed, ctok.stats.truncated, ctok.stats.dropped,
                           xtok.one_to_one if xtok else 0, xtok.student_tokens if xtok else 0], dtype=torch.int64)
    layout.all_reduce_dp(counts, dist.ReduceOp.SUM)
    if xtok is not None:  # the alignment ran on the writer ranks only: share their totals with the replica
        layout.all_reduce_mp(counts)
    times = torch.tensor([elapsed, stats_s, write_s, xtok.seconds if xtok else 0.0], dtype=torch.float64)
    if layout.dist:
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
    layout.barrier()  # every shard is final: the manifest can be read (or assembled) now
    manifest_path = os.path.join(cfg.output_path, "manifest.json")
    if not os.path.exists(manifest_path) and layout.global_rank == 0:
        finalize_manifest(cfg.output_path)
    layout.barrier()
    with open(manifest_path) as f:
        final = json.load(f)
    store_bytes = sum(s["payload_bytes"] + s["index_bytes"] for s in final["shards"]) + \
        sum(t["bytes"] for t in (final.get("extensions") or {}).get(LOG_TAIL_EXTENSION, {}).get("shards", []))
    num_tokens = int(final["num_tokens"])
    elapsed_max = float(times[0])
    return ExtractSummary(
        output_path=cfg.output_path,
        num_samples=num_samples,
        num_tokens=num_tokens,
        samples_processed=int(counts[0]),
        tokens_processed=int(counts[1]),
        resumed_samples=int(counts[2]),
        skipped=len(records.skipped),
        truncated=int(counts[3]),
        dropped=int(counts[4]),
        store_bytes=store_bytes,
        bytes_per_token=store_bytes / num_tokens if num_tokens else math.nan,
        elapsed_s=elapsed_max,
        tokens_per_s=int(counts[1]) / elapsed_max if elapsed_max > 0 else math.nan,
        stats_s=float(times[1]),
        write_s=float(times[2]),
        align_s=float(times[3]),
        one_to_one_fraction=(int(counts[5]) / max(int(counts[6]), 1)) if xtok else None,
        skipped_report=records.skipped_report(),
        manifest=final,
    )


# ----------------------------------------------------------------------------- config entry points


def _plain(cfg) -> dict:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:
        pass
    return dict(cfg)


# Keys of conf/compute_topk_logits.yaml besides ExtractConfig's fields.
RUN_CONFIG_KEYS = {"teacher", "parallel", "tokenizer_path"}


def parse_teacher_section(teacher_cfg) -> Tuple[TeacherSpec, Optional[ServedTeacherConfig]]:
    """``teacher.*`` of ``conf/compute_topk_logits.yaml`` → the in-process spec and, for
    ``teacher.type=served``, the client's settings (each key checked: a served key on an
    in-process teacher, or ``teacher.path`` on a served one, is refused by name)."""
    teacher_cfg = dict(teacher_cfg or {})
    spec_keys = {f.name for f in dataclasses.fields(TeacherSpec)}
    served_keys = {f.name: f.default for f in dataclasses.fields(ServedTeacherConfig)}
    unknown = sorted(set(teacher_cfg) - spec_keys - set(served_keys))
    if unknown:
        raise ValueError(f"unknown teacher keys {unknown}; valid keys: {sorted(spec_keys | set(served_keys))}")
    if teacher_cfg.get("type") == "served":
        if teacher_cfg.get("path"):
            raise ValueError("teacher.path is for in-process teachers; a served teacher is teacher.url, and its "
                             "tokenizer (the token ids sent) is tokenizer_path")
        served_cfg = ServedTeacherConfig(**{k: teacher_cfg[k] for k in served_keys if k in teacher_cfg})
        return TeacherSpec(type="served", trust_remote_code=bool(teacher_cfg.get("trust_remote_code", False)),
                           name=served_cfg.name), served_cfg
    stray = sorted(k for k, default in served_keys.items()
                   if k not in spec_keys and k in teacher_cfg and teacher_cfg[k] != default)
    if stray:
        raise ValueError(f"teacher.{', teacher.'.join(stray)}: for teacher.type=served only, not "
                         f"teacher.type={teacher_cfg.get('type', 'megatron')}")
    return TeacherSpec(**{k: v for k, v in teacher_cfg.items() if k in spec_keys}), None


def run_from_config(cfg, teacher_loader=None) -> ExtractSummary:
    """Run from the Hydra/OmegaConf config of ``conf/compute_topk_logits.yaml`` (torchrun / srun aware).

    Initialises the parallel state from the launcher's environment (``RANK`` /
    ``WORLD_SIZE`` of torchrun, ``SLURM_PROCID`` / ``SLURM_NTASKS`` of srun; a plain
    ``python`` run is a world of one), builds the tokenizer and the teacher, runs
    :func:`compute_topk_logits`, prints the summary on global rank 0 and tears down.
    """
    from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel, is_initialized

    c = _plain(cfg)
    spec, served_cfg = parse_teacher_section(c.get("teacher"))
    names = {f.name for f in dataclasses.fields(ExtractConfig)}
    unknown = sorted(set(c) - names - RUN_CONFIG_KEYS)
    if unknown:  # a typo would otherwise fall back to a default silently
        raise ValueError(f"unknown compute_topk_logits keys {unknown}; valid keys: {sorted(names | RUN_CONFIG_KEYS)}")
    extract_cfg = ExtractConfig(**{k: c[k] for k in names if k in c})
    parallel = dict(c.get("parallel") or {})
    if served_cfg is not None and not c.get("tokenizer_path"):
        raise ValueError("teacher.type=served needs tokenizer_path: the teacher's own tokenizer, which renders "
                         "the token ids sent to the server")
    if os.environ.get("NEMO_KD_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["NEMO_KD_NUM_THREADS"]))
    owns = not is_initialized()
    if owns:
        initialize_parallel(ParallelConfig.from_dict(parallel))
    try:
        from transformers import AutoTokenizer

        from nemo_kd.models.nemo_artifacts import checkpoint_tokenizer_dir

        tok_path = checkpoint_tokenizer_dir(spec.path, c.get("tokenizer_path"))  # a .nemo: its packed tokenizer
        tokenizer = AutoTokenizer.from_pretrained(tok_path, trust_remote_code=bool(spec.trust_remote_code))
        student_tokenizer = None
        if extract_cfg.align_teacher_template:
            if not extract_cfg.student_tokenizer_path:
                raise ValueError("align_teacher_template=true needs student_tokenizer_path (the student's tokenizer)")
            student_tokenizer = AutoTokenizer.from_pretrained(extract_cfg.student_tokenizer_path)
        teacher = (ServedTeacher(served_cfg, tokenizer_size=len(tokenizer)) if served_cfg is not None
                   else build_teacher(spec, loader=teacher_loader))
        try:
            summary = compute_topk_logits(extract_cfg, teacher, tokenizer, student_tokenizer=student_tokenizer)
        finally:
            if served_cfg is not None:
                teacher.close()
        if (dist.get_rank() if dist.is_initialized() else 0) == 0:
            print(summary.format(), flush=True)
        return summary
    finally:
        if owns:
            destroy_parallel()


def _default_conf_dir() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.normpath(os.path.join(here, "..", "..", "conf"))


def main() -> None:
    """Console entry point ``nemo-kd-compute-topk-logits`` (Hydra; overrides as ``key=value``).

    Uses ``conf/compute_topk_logits.yaml`` of the source checkout; pass
    ``--config-path``/``--config-name`` to use another one.
    """
    import hydra

    @hydra.main(config_path=_default_conf_dir(), config_name="compute_topk_logits", version_base=None)
    def _app(cfg) -> None:
        run_from_config(cfg)

    _app()


if __name__ == "__main__":
    main()
