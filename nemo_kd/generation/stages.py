"""What every data-pipeline stage shares: loading a model to sample from, data-parallel
sharding of the prompts, and resumable, atomic stage outputs.

* :func:`load_policy` – a Megatron-core GPT from any checkpoint a teacher loads from
  (:func:`nemo_kd.teacher.teachers.load_megatron_teacher`: nemo_kd checkpoint, ``.nemo``, Hugging
  Face directory) (``backend: megatron``, TP-sharded under the current parallel state), or a
  Hugging Face model run by ``transformers`` (``backend: hf``), with its
  :class:`~nemo_kd.data.tokenization.ConversationTokenizer`.
  ``type: served`` is a teacher behind an HTTP server instead (vLLM, SGLang, ``nemo-kd-serve-teacher``; the
  keys of :class:`~nemo_kd.teacher.served.ServedTeacherConfig` as extraction's ``teacher.type=served`` takes
  them, plus ``sampled_logprobs``): no model is loaded, the stages sample and score through
  :class:`~nemo_kd.generation.served_sampling.ServedPolicy`, with the local tokenizer (``tokenizer``).
* :func:`run_stage` – runs a stage over this data-parallel rank's contiguous block of
  prompts, gathers the blocks on global rank 0 and writes the output JSON Lines atomically
  with a ``.meta.json`` beside it recording the stage's settings. A rerun with the same
  settings skips a finished stage; different settings against an existing output are
  refused (delete it to redo the stage), so an interrupted pipeline resumes stage by stage
  and never mixes outputs of different settings.
* :func:`output_writer` – one writer per output directory: global rank 0 holds the
  directory's :class:`~nemo_kd.output_lock.OutputLock` (``<dir>/.writer.lock``) for the whole
  run, so a second run into the same directory is refused at start-up naming the first
  (host, pid, start time, Slurm job, command), on every rank. With the lock held it removes
  the temporary files (``*.tmp-*``) a killed run left, naming them in the log; a run killed
  while holding the lock leaves a stale lock that the next run takes over. A pipeline wraps
  its whole run in it; :func:`run_stage` called outside one locks the output's directory for
  the stage. Temporary names carry :func:`~nemo_kd.output_lock.temp_tag` (per process, per
  host), written by :func:`atomic_write_jsonl` / :func:`atomic_write_json`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch

from nemo_kd.config_keys import check_keys
from nemo_kd.generation.responses import shard_range
from nemo_kd.output_lock import OutputLock, OutputLockedError, remove_stale_temps, temp_tag

logger = logging.getLogger(__name__)

TEMP_GLOBS = ("*.tmp-*",)  # temporary files of atomic_write_* in an output directory (not its subdirectories)


def known_keys(cls, d, what: str) -> dict:
    """``d`` as a plain dict, refusing keys that are not fields of the dataclass ``cls``
    (a typo in a YAML config fails naming the section, not silently)."""
    d = dict(d or {})
    check_keys(what, d, cls.__dataclass_fields__)
    return d


POLICY_TYPES = ("local", "served")
# ServedTeacherConfig keys that say how to reach a server, not what it serves: out of a stage's settings, so a
# stage resumes against the same teacher at another address (its fingerprint is in the stage's .meta.json)
_TRANSPORT_KEYS = ("url", "concurrency", "api_key_env", "connect_timeout_s", "request_timeout_s", "max_retries",
                   "backoff_initial_s", "backoff_max_s")


def checkpoint_fingerprint(path: str) -> Optional[str]:
    """sha256 (16 hex digits) of every file of a checkpoint (a file or a directory): relative path, size and
    modification time in ns, as ``make`` judges staleness, without reading the weights (a 100B-parameter
    checkpoint is read once, to load it). A checkpoint written again at the same path (a new warm start, a
    retrained model) changes it, so a resumed pipeline refuses the stages the old one produced instead of
    mixing two models' samples; a copy that keeps times (``cp -p``, ``rsync -a``) keeps it. ``None`` when the
    path is not on this file system (nothing to compare)."""
    if not os.path.exists(path):
        return None
    root = os.path.abspath(path)
    files = [root] if os.path.isfile(root) else sorted(
        os.path.join(d, f) for d, _, names in os.walk(root) for f in names)
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.relpath(f, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


@dataclass
class PolicySpec:
    """A model to sample from (teacher or student): loaded (``type: local``) or behind a server (``served``)."""

    checkpoint: str = "???"
    tokenizer: Optional[str] = None  # default: the checkpoint directory
    prompt_format: str = "chat"
    backend: str = "megatron"  # megatron | hf
    trust_remote_code: bool = False  # hf only, never on unless asked
    num_samples: int = 1
    sampling: Dict[str, Any] = field(default_factory=dict)  # SamplingConfig fields
    type: str = "local"  # local | served
    served: Dict[str, Any] = field(default_factory=dict)  # type=served: ServedTeacherConfig fields, sampled_logprobs

    @classmethod
    def from_dict(cls, d) -> "PolicySpec":
        from nemo_kd.teacher.served import ServedTeacherConfig

        d = dict(d or {})
        # the server's keys sit beside the others, as in extraction's config (conf/build_*.yaml lists them with
        # their defaults, which a local model ignores)
        names = set(ServedTeacherConfig.field_names()) | {"sampled_logprobs"}
        given = {k: d.pop(k) for k in list(d) if k in names}
        if d.get("type", "local") == "served":
            d["served"] = {**dict(d.get("served") or {}), **given}
        else:
            defaults = {f.name: f.default for f in dataclasses.fields(ServedTeacherConfig)}
            defaults["sampled_logprobs"] = "auto"
            set_here = sorted(k for k, v in given.items() if v is not None and v != defaults.get(k))
            if set_here:
                raise ValueError(f"{set_here} are keys of a served teacher: set type=served (or drop them)")
        spec = cls(**known_keys(cls, d, "model"))
        if spec.type not in POLICY_TYPES:
            raise ValueError(f"type must be one of {POLICY_TYPES}, got {spec.type!r}")
        if spec.type == "served":
            if not spec.tokenizer:
                raise ValueError("type=served needs `tokenizer`: the teacher's tokenizer directory (prompts are sent "
                                 "as the token ids it produces)")
            served = dict(spec.served)
            logprobs = served.pop("sampled_logprobs", "auto")
            ServedTeacherConfig(**served)  # refuses a missing url, a bad dialect, ... before anything runs
            from nemo_kd.generation.served_sampling import ServedPolicy

            ServedPolicy.__post_init__(ServedPolicy(None, logprobs))
            return spec
        if spec.served:
            raise ValueError("`served` keys are for type=served")
        if spec.checkpoint in (None, "???"):
            raise ValueError("a model needs `checkpoint`")
        if spec.backend not in ("megatron", "hf"):
            raise ValueError(f"backend must be 'megatron' or 'hf', got {spec.backend!r}")
        return spec

    def identity(self, keys: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        """What a stage's settings record of this model: ``keys`` of it (default: every field), a local model's
        as before ``type`` existed, a served one by what it serves (not its address)."""
        from dataclasses import asdict

        if self.type == "local":
            d = asdict(self)
            d.pop("type"), d.pop("served")
            d = {k: d[k] for k in keys} if keys is not None else d
            if "checkpoint" in d:  # the weights, not only their path: a checkpoint re-made in place is another model
                d["checkpoint_files"] = checkpoint_fingerprint(self.checkpoint)
            return d
        d = {k: getattr(self, k) for k in (keys or ("tokenizer", "prompt_format", "num_samples", "sampling"))
             if k not in ("checkpoint", "backend", "trust_remote_code")}
        d.update(type="served", served={k: v for k, v in self.served.items() if k not in _TRANSPORT_KEYS})
        return d

    def sampling_config(self):
        from nemo_kd.generation.sampling import SamplingConfig

        return SamplingConfig(**dict(self.sampling))


@dataclass
class PipelineConfig:
    """What every data pipeline's config has (``conf/build_*.yaml``); the pipelines add their own."""

    prompts: str = "???"
    output_dir: str = "???"
    teacher: PolicySpec = field(default_factory=PolicySpec)
    student: PolicySpec = field(default_factory=PolicySpec)
    response_filter: Dict[str, Any] = field(default_factory=dict)  # ResponseFilterConfig fields
    max_seq_length: int = 2048  # prompt + response tokens (sampling and scoring)
    batch_size: int = 64  # sequences per forward (per data-parallel rank)
    parallel: Dict[str, Any] = field(default_factory=dict)  # ParallelConfig fields
    progress: bool = True
    # scoring: (prompt, response) pairs packed into rows of pack_length (null: max_seq_length), batch_size rows a
    # forward (response_logprobs' pack_length); the same scores up to rounding, so no stage setting
    pack_sequences: bool = False
    pack_length: Optional[int] = None

    def check_required(self) -> None:
        for name in ("prompts", "output_dir"):
            if getattr(self, name) in (None, "???"):
                raise ValueError(f"`{name}` is required")

    def scoring_pack_length(self, role: str) -> Optional[int]:
        """The ``pack_length`` the model ``role`` (``teacher`` / ``student``) scores with (None: padded; a served
        model batches on its server); refuses, naming the keys, what cannot pack."""
        if not isinstance(self.pack_sequences, bool):
            raise ValueError(f"pack_sequences must be true or false, got {self.pack_sequences!r}")
        spec: PolicySpec = getattr(self, role)
        if not self.pack_sequences or spec.type == "served":
            return None
        n = self.max_seq_length if self.pack_length is None else self.pack_length
        if isinstance(n, bool) or not isinstance(n, int) or n < self.max_seq_length:
            raise ValueError(f"pack_length ({self.pack_length!r}) must be an integer >= max_seq_length "
                             f"({self.max_seq_length}): a packed row holds at least one whole pair")
        if spec.backend != "megatron":
            raise ValueError(f"pack_sequences: {role}.backend={spec.backend} scores with transformers, which reads no "
                             "packed rows; use backend megatron (the same checkpoint loads) or pack_sequences: false")
        return n


@dataclass
class Policy:
    model: Optional[torch.nn.Module]  # None for a served teacher
    ctok: object  # ConversationTokenizer
    vocab_size: int  # the tokenizer's size: ids sampled and scored are below it
    served: Optional[Any] = None  # a ServedPolicy (type=served): sample_responses / score_responses take it

    def record(self, sampling=None) -> Dict[str, Any]:
        """What a stage's ``.meta.json`` records beyond its settings (a served teacher's fingerprint)."""
        return self.served.record(sampling) if self.served is not None and sampling is not None else (
            {"served_teacher": self.served.teacher.client.fingerprint()} if self.served is not None else {})


def load_policy(spec: PolicySpec, max_seq_length: int) -> Policy:
    """The model (eval mode) and its conversation tokenizer; parallel state must be initialised.
    ``type: served``: the client of the server (connected and probed) and the local tokenizer."""
    from transformers import AutoTokenizer

    from nemo_kd.data.tokenization import ConversationTokenizer

    from nemo_kd.models.nemo_artifacts import checkpoint_tokenizer_dir

    if spec.type == "served":
        from nemo_kd.generation.served_sampling import ServedPolicy
        from nemo_kd.teacher.served import ServedTeacher, ServedTeacherConfig

        tok = AutoTokenizer.from_pretrained(spec.tokenizer, trust_remote_code=spec.trust_remote_code)
        served = dict(spec.served)
        logprobs = served.pop("sampled_logprobs", "auto")
        teacher = ServedTeacher(ServedTeacherConfig(**served), tokenizer_size=len(tok))
        if len(tok) > teacher.vocab_size:
            teacher.close()
            raise ValueError(f"tokenizer {spec.tokenizer} has {len(tok)} tokens, more than the served teacher's "
                             f"vocabulary ({teacher.vocab_size})")
        ctok = ConversationTokenizer(tok, spec.prompt_format, max_seq_length, "truncate")
        return Policy(None, ctok, len(tok), ServedPolicy(teacher, logprobs))
    tok_path = checkpoint_tokenizer_dir(spec.checkpoint, spec.tokenizer)  # a .nemo: its packed tokenizer
    if os.path.isfile(tok_path):
        raise ValueError(f"{spec.checkpoint}: give `tokenizer` (a tokenizer directory) for a checkpoint file")
    tok = AutoTokenizer.from_pretrained(tok_path, trust_remote_code=spec.trust_remote_code)
    ctok = ConversationTokenizer(tok, spec.prompt_format, max_seq_length, "truncate")
    if spec.backend == "hf":
        from nemo_kd.generation.sampling import HFCausalLM

        model = HFCausalLM.from_pretrained(spec.checkpoint, trust_remote_code=spec.trust_remote_code)
        vocab = model.vocab_size
    else:  # every format a teacher loads from (local full state dict, converted, .nemo, HF directory)
        from nemo_kd.parallel import state
        from nemo_kd.teacher.teachers import load_megatron_teacher

        if state.pp_size() > 1:
            raise ValueError("sampling needs pipeline_model_parallel_size=1 (TP and DP are fine)")
        model, arch = load_megatron_teacher(spec.checkpoint, state.tp_rank(), state.tp_size(), 0, 1)
        vocab = arch.vocab_size
    if len(tok) > vocab:
        raise ValueError(f"tokenizer {tok_path} has {len(tok)} tokens, more than the model's vocabulary ({vocab})")
    model.eval()
    # Rows past the tokenizer (an HF embedding padded to a round size, e.g. Qwen's 152,064 for
    # 151,665 tokens) are no tokens: never sample them, and leave them out of every softmax.
    return Policy(model, ctok, len(tok))


def _settings_hash(settings: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_done(path: str, settings: Dict[str, Any]) -> bool:
    """True if ``path`` holds this stage's finished output for ``settings``; refuses other settings."""
    meta = path + ".meta.json"
    if not os.path.exists(path):
        return False
    if not os.path.exists(meta):
        raise FileExistsError(f"{path} exists but was not written by this pipeline (no {meta}); move it away")
    with open(meta) as f:
        old = json.load(f)
    if old.get("settings_hash") != _settings_hash(settings):
        raise FileExistsError(f"{path} was written with other settings ({old.get('settings')}); delete it (and the "
                              f"stages after it) to redo the stage with {settings}")
    return True


def _atomic_write(path: str, write: Callable[[Any], None]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{temp_tag()}"  # per process and host: no two writers share a temp name
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_jsonl(path: str, rows: Sequence[Dict[str, Any]]) -> None:
    """All rows or nothing: a per-process temp file (``<path>.tmp-<temp_tag>``) renamed over ``path``."""
    def write(f):
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    _atomic_write(path, write)


def atomic_write_json(path: str, obj: Any, indent: Optional[int] = 1) -> None:
    """``obj`` as JSON, written like :func:`atomic_write_jsonl`."""
    _atomic_write(path, lambda f: json.dump(obj, f, indent=indent, default=str))


def _write_meta(path: str, settings: Dict[str, Any], extra: Dict[str, Any]) -> None:
    atomic_write_json(path + ".meta.json", {"settings": settings, "settings_hash": _settings_hash(settings), **extra})


_covered: List[str] = []  # absolute output directories this process runs inside an output_writer of (every rank)


def _dist_rank0():
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    return distributed, (not distributed or dist.get_rank() == 0)


@contextlib.contextmanager
def output_writer(directory: str, what: str = "pipeline output directory",
                  temp_globs: Sequence[str] = TEMP_GLOBS) -> Iterator[Optional[OutputLock]]:
    """One writer per output ``directory`` for the duration of the block (module docstring).

    Collective under ``torch.distributed``: global rank 0 takes the lock; if it is refused,
    every rank raises :class:`~nemo_kd.output_lock.OutputLockedError` with rank 0's message
    (no rank is left waiting in a collective). With the lock held, rank 0 removes what
    ``temp_globs`` (relative to ``directory``) match (temporary files of killed runs) and
    logs them. Yields the lock on global rank 0, ``None`` on the other ranks.
    """
    directory = os.path.abspath(os.fspath(directory))
    distributed, rank0 = _dist_rank0()
    lock, err = None, None
    if rank0:
        try:
            lock = OutputLock(directory, name="writer", what=what).acquire()
        except Exception as e:  # every rank must hear of it: report, then raise
            err = e
    if distributed:
        import torch.distributed as dist

        box = [None if err is None else (isinstance(err, OutputLockedError), type(err).__name__, str(err),
                                         getattr(err, "holder", None))]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None and err is None:
            refused, kind, msg, holder = box[0]
            err = (OutputLockedError(f"(global rank 0) {msg}", directory, holder,
                                     os.path.join(directory, ".writer.lock")) if refused else
                   RuntimeError(f"global rank 0 could not take the writer's lock of {directory}: {kind}: {msg}"))
    if err is not None:
        raise err
    _covered.append(directory)
    try:
        if rank0:
            removed = [p for g in temp_globs for p in remove_stale_temps(directory, g, keep_tag=temp_tag())]
            if removed:
                logger.warning("%s: removed %d temporary file(s) left by a killed run: %s", directory, len(removed),
                               ", ".join(removed))
        yield lock
    finally:
        _covered.remove(directory)
        if lock is not None:
            lock.release()


def _is_covered(path: str) -> bool:
    p = os.path.abspath(path)
    return any(p.startswith(d.rstrip(os.sep) + os.sep) for d in _covered)


def run_stage(path: str, settings: Dict[str, Any], num_items: int,
              work: Callable[[range], List[Dict[str, Any]]],
              record: Optional[Dict[str, Any]] = None) -> Optional[List[Dict[str, Any]]]:
    """Run ``work`` on this DP rank's block of ``range(num_items)``; global rank 0 writes all rows.

    Returns the rows on global rank 0 (``None`` elsewhere), read back from ``path`` when the
    stage was already done with the same ``settings``. Outside an :func:`output_writer` of a
    directory above ``path``, the stage holds the writer's lock of ``path``'s directory
    (refused while another process writes there; temporary files of ``path`` that a killed
    run left are removed). ``record`` goes into the ``.meta.json`` beside the settings (not hashed: e.g. the
    served teacher's fingerprint and where its log-probs came from).
    """
    if _is_covered(path):
        return _run_stage(path, settings, num_items, work, record)
    name = glob.escape(os.path.basename(path))
    with output_writer(os.path.dirname(os.path.abspath(path)), "stage output directory",
                       (f"{name}.tmp-*", f"{name}.meta.json.tmp-*")):
        return _run_stage(path, settings, num_items, work, record)


def _run_stage(path: str, settings: Dict[str, Any], num_items: int, work: Callable[[range], List[Dict[str, Any]]],
               record: Optional[Dict[str, Any]] = None) -> Optional[List[Dict[str, Any]]]:
    import torch.distributed as dist

    distributed, rank0 = _dist_rank0()
    if not distributed:  # one process: it is rank 0 of a data-parallel world of one
        if stage_done(path, settings):
            with open(path) as f:
                return [json.loads(line) for line in f]
        rows = work(range(num_items)) if num_items else []
        atomic_write_jsonl(path, rows)
        _write_meta(path, settings, {"rows": len(rows), **(record or {})})
        return rows

    from nemo_kd.parallel import state

    # on the collective backend's device (NCCL broadcasts CUDA tensors only)
    device = state.device() if state.is_initialized() else torch.device("cpu")
    done = torch.tensor([int(stage_done(path, settings)) if rank0 else 0], device=device)
    dist.broadcast(done, src=0)
    if bool(done):
        if not rank0:
            return None
        with open(path) as f:
            return [json.loads(line) for line in f]
    dp_rank, dp_size = (state.dp_rank(), state.dp_size()) if state.is_initialized() else (0, 1)
    block = shard_range(num_items, dp_rank, dp_size)
    rows = work(block) if len(block) else []
    gathered: List[Optional[List[Dict[str, Any]]]] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rows if state.tp_rank() == 0 else [])
    rows = [r for part in gathered for r in part]
    if rank0:
        atomic_write_jsonl(path, rows)
        _write_meta(path, settings, {"rows": len(rows), **(record or {})})
    dist.barrier()
    return rows if rank0 else None

