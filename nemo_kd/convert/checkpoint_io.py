"""Where a converted (or trained) Megatron GPT lives on disk, and the two directory conversions.

A nemo_kd Megatron checkpoint directory::

    <path>/model_config.json   HFArchitecture (GPTModelConfig + family, RoPE scaling, original
                               HF config) and the vocabulary rows the weights were saved with
    <path>/weights/            Megatron dist_checkpointing, torch_dist backend, written from the
                               models' sharded_state_dict(): loadable at any TP/PP
    <path>/tokenizer/          tokenizer files + chat template copied from the HF model (optional)

Peak host memory (per process):

* :func:`convert_hf_to_megatron`: this rank's model shard (``params * bytes / (TP * PP)``)
  plus one full tensor (the largest is the embedding, ``vocab * hidden``); the HF
  checkpoint is memory-mapped, read one tensor at a time.
* :func:`convert_megatron_to_hf`: the full model at TP=1/PP=1 (``params * bytes``) plus one
  output shard buffer (``max_shard_bytes``, default 5 GiB; lower it to bound the peak).
* :func:`load_megatron_checkpoint`: the model shard; when the checkpoint was saved at a TP
  whose vocabulary padding differs, plus one full embedding / output matrix.

Everything runs on CPU (gloo) and GPU; dist_checkpointing needs ``torch.distributed``, which
:func:`ensure_parallel` sets up for single-process use.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from nemo_kd.convert.hf_config import HFArchitecture, architecture_to_hf_config, hf_config_to_architecture, read_hf_config
from nemo_kd.convert.hf_weights import SafetensorsReader, SafetensorsWriter, iter_hf_tensors, load_hf_weights, unwrap_model
from nemo_kd.models.builder import build_gpt_model
from nemo_kd.models.config import GPTModelConfig
from nemo_kd.models.sharding import shard_state_dict
from nemo_kd.parallel import state
from nemo_kd.parallel.state import ParallelConfig

__all__ = [
    "MODEL_CONFIG_FILE",
    "WEIGHTS_DIR",
    "TOKENIZER_DIR",
    "TOKENIZER_FILES",
    "LoadedModel",
    "ensure_parallel",
    "build_model_chunks",
    "save_megatron_checkpoint",
    "read_checkpoint_architecture",
    "load_megatron_checkpoint",
    "build_and_load",
    "convert_hf_to_megatron",
    "convert_megatron_to_hf",
    "copy_tokenizer_files",
    "is_megatron_checkpoint",
]

MODEL_CONFIG_FILE = "model_config.json"
WEIGHTS_DIR = "weights"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1
# Files that make up an HF tokenizer and its chat template (plus the generation defaults).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.json", "chat_template.jinja",
    "generation_config.json",
)
_VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


class LoadedModel(NamedTuple):
    """Model chunks of this rank (one per virtual pipeline stage) and their architecture."""

    model_chunks: List[torch.nn.Module]
    arch: HFArchitecture


@contextlib.contextmanager
def ensure_parallel(parallel: Optional[ParallelConfig] = None) -> Iterator[bool]:
    """Make sure Megatron's parallel state exists for the body; yields whether we created it.

    Already initialised: used as is (``parallel``, if given, must match its TP/PP).
    Otherwise: initialised from ``parallel`` (default TP=1, PP=1; a plain single-process run
    needs no rendezvous port, so concurrent conversions do not collide) and torn down on exit.
    """
    if state.is_initialized():
        if parallel is not None and (parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size) != (
                state.tp_size(), state.pp_size()):
            raise ValueError(f"parallel state is already TP={state.tp_size()} PP={state.pp_size()}, asked for "
                             f"TP={parallel.tensor_model_parallel_size} PP={parallel.pipeline_model_parallel_size}")
        yield False
        return
    state.initialize_parallel(parallel or ParallelConfig())  # a world of one needs no port
    try:
        yield True
    finally:
        state.destroy_parallel()


def _expert_layout(cfg: GPTModelConfig) -> Dict[str, int]:
    """This rank's ``ep_rank`` / ``ep_size`` and expert tensor-parallel ``etp_rank`` / ``etp_size`` for
    cutting a full state dict (EP=1 for a dense model)."""
    if not cfg.is_moe:
        return dict(ep_rank=0, ep_size=1)
    return dict(ep_rank=state.ep_rank(), ep_size=state.ep_size(), etp_rank=state.etp_rank(),
                etp_size=state.etp_size())


def _vpp_size() -> Optional[int]:
    cfg = state.config()
    return cfg.virtual_pipeline_model_parallel_size if cfg is not None else None


def build_model_chunks(arch: Union[HFArchitecture, GPTModelConfig], initialize_weights: bool = True,
                       **transformer_config_overrides) -> List[torch.nn.Module]:
    """This rank's model chunks for ``arch`` under the current parallel state.

    One chunk per virtual pipeline stage (a single one without interleaving). Applies what
    an :class:`HFArchitecture` adds to ``GPTModelConfig`` (GPT-2's tanh GELU, RoPE scaling).
    ``initialize_weights=False`` skips Megatron's random init (weights about to be loaded).
    """
    if isinstance(arch, GPTModelConfig):
        arch = HFArchitecture(family=None, model=arch)
    overrides = {**arch.transformer_config_overrides(), **transformer_config_overrides}
    if not initialize_weights:
        overrides.setdefault("perform_initialization", False)
    vpp = _vpp_size()
    chunks = []
    for vp_stage in (range(vpp) if vpp else [None]):
        model = build_gpt_model(arch.model, vp_stage=vp_stage, **overrides)
        arch.apply_to_model(model)
        chunks.append(model)
    return chunks


def _sharded_state_dict(model_chunks: Sequence[torch.nn.Module]) -> dict:
    # ShardedTensor keys are global (layer offsets, TP/PP-independent names), so the
    # top-level grouping by chunk does not constrain the layout that loads the checkpoint.
    return {f"chunk{i}": unwrap_model(chunk).sharded_state_dict() for i, chunk in enumerate(model_chunks)}


@contextlib.contextmanager
def _cpu_safe_dist_checkpointing():
    """Run Megatron's torch_dist writer in-process on CPU-only machines (scoped to one save).

    ``FileSystemWriterAsync`` (megatron-core 0.16.1) assumes a GPU training job:

    * staging calls ``torch.cuda.synchronize()``: we stage with blocking copies (a no-op
      for CPU tensors);
    * the write forks one worker per bucket and spawns a ``multiprocessing.Manager`` for
      the results (the spawn re-imports ``__main__``: a script without a main guard breaks);
    * each worker calls ``_process_memory()``, which raises without ``psutil``; the
      exception happens before the worker reports, so the parent waits forever (a hang,
      not an error). psutil is not a dependency of nemo_kd.

    * the save's finalisation all-reduces a flag allocated on ``torch.cuda.current_device()``
      (``state_dict_saver``): that module sees :mod:`nemo_kd.parallel.cpu_shim`'s CPU view of torch.

    Here buckets are written sequentially in this process through Megatron's own
    ``write_preloaded_data``, results travel through a plain queue, and memory logging
    reads 0 without psutil. Where CUDA exists nothing is changed.
    """
    if torch.cuda.is_available():
        yield
        return
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async, state_dict_saver
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    from nemo_kd.parallel.cpu_shim import _CpuTorch

    originals = {name: FileSystemWriterAsync.__dict__[name]
                 for name in ("preload_tensors", "write_preloaded_data_multiproc")}
    original_queue = filesystem_async._get_write_results_queue
    original_memory = filesystem_async._process_memory
    original_saver_torch = state_dict_saver.torch
    preload = originals["preload_tensors"].__func__

    def write_in_process(transform_list, use_msc, rank, write_buckets, global_results_queue):
        local_results, done = queue.Queue(), queue.Queue()
        results = {}
        for i, bucket in enumerate(write_buckets):
            done.put(i)
            FileSystemWriterAsync.write_preloaded_data(transform_list, i, bucket, local_results, done, True)
            index, result = local_results.get()
            if isinstance(result, Exception):
                global_results_queue.put(result)
                return
            results[index] = result
        global_results_queue.put(results)

    FileSystemWriterAsync.preload_tensors = staticmethod(lambda buckets, non_blocking=True: preload(buckets, False))
    FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(write_in_process)
    filesystem_async._get_write_results_queue = queue.Queue
    state_dict_saver.torch = _CpuTorch()
    if not filesystem_async.HAVE_PSUTIL:
        filesystem_async._process_memory = lambda: 0  # only feeds a debug log line
    try:
        yield
    finally:
        for name, value in originals.items():
            setattr(FileSystemWriterAsync, name, value)
        filesystem_async._get_write_results_queue = original_queue
        filesystem_async._process_memory = original_memory
        state_dict_saver.torch = original_saver_torch


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_megatron_checkpoint(
    model_chunks: Sequence[torch.nn.Module],
    cfg: Union[HFArchitecture, GPTModelConfig],
    path: str,
    tokenizer_dir: Optional[str] = None,
) -> None:
    """Save this rank's model chunks (all ranks call it) as a TP/PP-independent checkpoint.

    Args:
        model_chunks: the models :func:`build_model_chunks` (or ``build_gpt_model``) built.
        cfg: their architecture (a bare ``GPTModelConfig`` is stored with no HF family).
        path: checkpoint directory (created; an existing ``weights/`` is replaced).
        tokenizer_dir: a directory whose tokenizer files are copied to ``path/tokenizer``.
    """
    from megatron.core import dist_checkpointing

    arch = cfg if isinstance(cfg, HFArchitecture) else HFArchitecture(family=None, model=cfg)
    weights = os.path.join(path, WEIGHTS_DIR)
    if _is_rank0():
        if os.path.isdir(weights):
            shutil.rmtree(weights)
        os.makedirs(weights)
        meta = {
            "format_version": FORMAT_VERSION,
            "architecture": arch.to_dict(),
            # Vocabulary rows in the saved tensors (padding depends on the saving TP).
            "padded_vocab_rows": arch.model.padded_vocab_size(state.tp_size()),
        }
        with open(os.path.join(path, MODEL_CONFIG_FILE), "w") as f:
            json.dump(meta, f, indent=2)
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, os.path.join(path, TOKENIZER_DIR))
    _barrier()
    with _cpu_safe_dist_checkpointing():
        dist_checkpointing.save(_sharded_state_dict(model_chunks), weights)
    _barrier()


def is_megatron_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MODEL_CONFIG_FILE))


def _read_meta(path: str) -> dict:
    file = os.path.join(path, MODEL_CONFIG_FILE)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path!r} is not a nemo_kd Megatron checkpoint: no {MODEL_CONFIG_FILE}")
    try:
        with open(file) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"corrupt {file}: {e}") from e
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{file}: format_version {meta.get('format_version')!r}, this nemo_kd reads {FORMAT_VERSION}")
    return meta


def read_checkpoint_architecture(path: str) -> HFArchitecture:
    """The architecture stored next to a Megatron checkpoint (build models from it)."""
    return HFArchitecture.from_dict(_read_meta(path)["architecture"])


def load_megatron_checkpoint(path: str, model_chunks: Sequence[torch.nn.Module]) -> None:
    """Load a checkpoint from :func:`save_megatron_checkpoint` into this rank's chunks (all ranks call).

    Works at any TP/PP (and VPP) the architecture divides into: dist_checkpointing
    reshards. The one thing it cannot reshard is the vocabulary *padding*, which grows
    with TP (``padded_vocab_size(tp)``): when the saving TP padded differently, the
    embedding/output matrix is read whole and cut with
    :func:`nemo_kd.models.sharding.shard_state_dict` (the real rows never move).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    meta = _read_meta(path)
    cfg = HFArchitecture.from_dict(meta["architecture"]).model
    saved_rows = meta["padded_vocab_rows"]
    sharded = _sharded_state_dict(model_chunks)
    tp_rank, tp, pp_rank, pp, vpp = state.tp_rank(), state.tp_size(), state.pp_rank(), state.pp_size(), _vpp_size()
    whole = {}  # (chunk, local key) -> global key of vocabulary tensors read whole
    for chunk_name, chunk_sd in sharded.items():
        for local_key, sh in list(chunk_sd.items()):
            if isinstance(sh, ShardedTensor) and sh.key in _VOCAB_KEYS and sh.global_shape[0] != saved_rows:
                buffer = torch.empty((saved_rows,) + tuple(sh.global_shape[1:]), dtype=sh.dtype)
                # Every TP rank now reads the same whole tensor: mark the copies of TP ranks > 0
                # as replicas (Megatron's replica_id is (PP, TP, DP)) so exactly one is the main one.
                replica = sh.replica_id
                if tp_rank > 0:
                    replica = (replica[0], tp_rank, *replica[2:]) if isinstance(replica, tuple) else (replica, tp_rank)
                chunk_sd[local_key] = ShardedTensor.from_rank_offsets(sh.key, buffer, replica_id=replica)
                whole[(chunk_name, local_key)] = sh.key
    loaded = dist_checkpointing.load(sharded, os.path.join(path, WEIGHTS_DIR))
    for i, chunk in enumerate(model_chunks):
        chunk_sd = loaded[f"chunk{i}"]
        for (chunk_name, local_key), global_key in whole.items():
            if chunk_name == f"chunk{i}":
                vp = i if vpp else None
                chunk_sd[local_key] = shard_state_dict({global_key: chunk_sd[local_key][: cfg.vocab_size]},
                                                       cfg, tp_rank, tp, pp_rank, pp, vp, vpp,
                                                       **_expert_layout(cfg))[local_key]
        unwrap_model(chunk).load_state_dict(chunk_sd, strict=True)


def read_nemo_archive(path: str) -> Tuple[HFArchitecture, Dict[str, torch.Tensor]]:
    """Architecture and full (TP=1, PP=1) weights of a ``.nemo`` written by
    :class:`nemo_kd.models.distillation_model.GPTDistillationModel`.

    The archive holds ``model_config.yaml`` (``student``: the ``GPTModelConfig``;
    ``student_hf_architecture``: what it cannot say, for HF-initialised students) and
    ``model_weights.ckpt`` (``student.*`` tensors, gathered over TP/PP by ``save_to``).
    The weights are copied out of the tar to a temporary file and memory-mapped
    (``torch.load(weights_only=True, mmap=True)``), so the model is never held twice in
    host memory (archive bytes + tensors).
    """
    import tarfile
    import tempfile

    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "model_weights.ckpt")
        try:
            with tarfile.open(path, "r:*") as tar:
                members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
                missing = [n for n in ("model_config.yaml", "model_weights.ckpt") if n not in members]
                if missing:
                    raise ValueError(f"{path}: not a nemo_kd .nemo (missing {missing}; has {sorted(members)})")
                model_cfg = yaml.safe_load(tar.extractfile(members["model_config.yaml"]).read())
                with tar.extractfile(members["model_weights.ckpt"]) as src, open(weights, "wb") as dst:
                    shutil.copyfileobj(src, dst, 16 << 20)
        except tarfile.TarError as e:
            raise ValueError(f"{path}: cannot read the .nemo archive: {e}") from e
        if not isinstance(model_cfg, dict) or not isinstance(model_cfg.get("student"), dict):
            raise ValueError(f"{path}: model_config.yaml has no 'student' architecture section")
        arch = HFArchitecture.from_dict({**(model_cfg.get("student_hf_architecture") or {"family": None}),
                                         "model": model_cfg["student"]})
        # the mapping stays valid after the file is unlinked (POSIX); tensors are read on first use
        sd = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
    full = {k[len("student."):]: v for k, v in sd.items() if k.startswith("student.")}
    if not full:
        raise ValueError(f"{path}: model_weights.ckpt holds no 'student.*' tensors")
    return arch, full


def build_chunks_from_full_state_dict(arch: Union[HFArchitecture, GPTModelConfig], full: Dict[str, torch.Tensor],
                                      source: str) -> List[torch.nn.Module]:
    """This rank's model chunks (current parallel state; one per virtual pipeline stage) with their shards of a
    full state dict loaded."""
    if isinstance(arch, GPTModelConfig):
        arch = HFArchitecture(family=None, model=arch)
    vpp = _vpp_size()
    chunks = []
    for vp_stage, model in enumerate(build_model_chunks(arch, initialize_weights=False, wrap_float16=False)):
        shard = shard_state_dict(full, arch.model, state.tp_rank(), state.tp_size(), state.pp_rank(),
                                 state.pp_size(), vp_stage if vpp else None, vpp, **_expert_layout(arch.model))
        missing, unexpected = model.load_state_dict(shard, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise ValueError(f"{source}: checkpoint does not fit the model: missing {missing}, unexpected {unexpected}")
        if arch.model.params_dtype != "fp32":
            from megatron.core.transformer.module import Float16Module

            model = Float16Module(model.config, model)
        chunks.append(model)
    return chunks


def build_from_full_state_dict(arch: Union[HFArchitecture, GPTModelConfig], full: Dict[str, torch.Tensor],
                               source: str) -> torch.nn.Module:
    """This rank's GPT chunk (current parallel state) with its shard of a full state dict loaded."""
    if _vpp_size():
        raise ValueError(f"{source}: one model chunk per rank asked for, and the parallel state has virtual "
                         "pipeline stages (build_chunks_from_full_state_dict builds one per stage)")
    return build_chunks_from_full_state_dict(arch, full, source)[0]


def build_and_load(path: str, parallel: Optional[ParallelConfig] = None, progress: bool = False,
                   **hf_options) -> LoadedModel:
    """Build this rank's chunks and load weights from ``path`` (the teacher/student loader).

    ``path`` is a nemo_kd Megatron checkpoint (``model_config.json``), a nemo_kd ``.nemo``
    (:func:`read_nemo_archive`) or a Hugging Face model directory (``config.json`` + safetensors; streamed straight into this rank's
    shard). Parallel state: used if initialised, else initialised from ``parallel`` (and
    left initialised for the caller's use). ``hf_options`` go to
    :func:`~nemo_kd.convert.hf_config.hf_config_to_architecture` for HF directories.
    """
    if not state.is_initialized():
        state.initialize_parallel(parallel or ParallelConfig())
    elif parallel is not None and (parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size) != (
            state.tp_size(), state.pp_size()):
        raise ValueError("parallel state is already initialised with a different TP/PP than `parallel`")
    if os.path.isfile(path) and path.endswith(".nemo"):
        arch, full = read_nemo_archive(path)
        return LoadedModel(build_chunks_from_full_state_dict(arch, full, path), arch)
    if is_megatron_checkpoint(path):
        arch = read_checkpoint_architecture(path)
        chunks = build_model_chunks(arch, initialize_weights=False)
        load_megatron_checkpoint(path, chunks)
        return LoadedModel(chunks, arch)
    arch = hf_config_to_architecture(read_hf_config(path), **hf_options)
    chunks = build_model_chunks(arch, initialize_weights=False)
    load_hf_weights(chunks, arch, SafetensorsReader(path), state.tp_rank(), state.tp_size(), state.pp_rank(),
                    state.pp_size(), _vpp_size(), progress=progress and _is_rank0(), **_expert_layout(arch.model))
    return LoadedModel(chunks, arch)


def copy_tokenizer_files(src_dir: str, dst_dir: str) -> List[str]:
    """Copy the tokenizer files and chat template (:data:`TOKENIZER_FILES`, ``*.jinja``) present in ``src_dir``."""
    names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src_dir, n))]
    names += sorted({os.path.basename(p) for p in glob.glob(os.path.join(src_dir, "*.jinja"))} - set(names))
    if names:
        os.makedirs(dst_dir, exist_ok=True)
    for name in names:
        shutil.copy2(os.path.join(src_dir, name), os.path.join(dst_dir, name))
    return names


def convert_hf_to_megatron(
    hf_dir: str,
    out_dir: str,
    params_dtype: Optional[str] = None,
    make_vocab_size_divisible_by: int = 128,
    sliding_window: str = "window",
    transformer_impl: str = "local",
    progress: bool = True,
) -> HFArchitecture:
    """Convert an HF causal-LM directory into a nemo_kd Megatron checkpoint (all ranks call).

    Runs under the current parallel state (or TP=1/PP=1 in this process if none): each
    rank streams its own shard in, then dist_checkpointing writes a TP/PP-independent
    checkpoint. Tokenizer files and the chat template are copied to ``out_dir/tokenizer``.
    """
    arch = hf_config_to_architecture(read_hf_config(hf_dir), params_dtype=params_dtype,
                                     make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                                     transformer_impl=transformer_impl, sliding_window=sliding_window)
    reader = SafetensorsReader(hf_dir)  # fail on missing/corrupt files before building anything
    with ensure_parallel():
        chunks = build_model_chunks(arch, initialize_weights=False)
        load_hf_weights(chunks, arch, reader, state.tp_rank(), state.tp_size(), state.pp_rank(), state.pp_size(),
                        _vpp_size(), progress=progress and _is_rank0(), **_expert_layout(arch.model))
        save_megatron_checkpoint(chunks, arch, out_dir, tokenizer_dir=hf_dir)
    return arch


def convert_megatron_to_hf(
    megatron_dir: str,
    out_dir: str,
    family: Optional[str] = None,
    tokenizer_dir: Optional[str] = None,
    max_shard_bytes: int = 5 * 1024**3,
    progress: bool = True,
) -> List[str]:
    """Write a Megatron checkpoint (or a distilled student's ``.nemo``) as an HF directory
    ``AutoModelForCausalLM.from_pretrained`` loads.

    Loads the checkpoint whole at TP=1/PP=1 in this process (it must not run inside a TP/PP
    > 1 job; call it on one rank after saving) and writes safetensors shards + index,
    ``config.json``, and the tokenizer files/chat template (from ``tokenizer_dir``, else the
    checkpoint's ``tokenizer/``). ``family`` names the HF class for a model that never came
    from HF (or overrides the stored one). Returns the weight files written.
    """
    is_nemo = os.path.isfile(megatron_dir) and megatron_dir.endswith(".nemo")
    if is_nemo:  # a distilled student's .nemo: full weights + architecture (HF family if it came from HF)
        arch, nemo_state = read_nemo_archive(megatron_dir)
    else:
        arch = read_checkpoint_architecture(megatron_dir)
    if family is not None:
        arch.family = family
    hf_config = architecture_to_hf_config(arch)  # checks the family can hold this model
    if dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError("convert_megatron_to_hf runs in a single process (world size 1); "
                           "save with save_megatron_checkpoint and convert on one process")
    with ensure_parallel(ParallelConfig()):
        if is_nemo:
            model = build_from_full_state_dict(arch, nemo_state, megatron_dir)  # re-cut to TP=1 vocab padding
            del nemo_state
        else:
            [model] = build_model_chunks(arch, initialize_weights=False)
            load_megatron_checkpoint(megatron_dir, [model])
        full_state = unwrap_model(model).state_dict()
        writer = SafetensorsWriter(out_dir, max_shard_bytes)
        tensors = iter_hf_tensors(full_state, arch)
        if progress:
            from tqdm import tqdm

            from nemo_kd.convert.hf_weights import weight_rules

            total = sum(len(rule.hf_keys) for rule in weight_rules(arch))
            tensors = tqdm(tensors, desc="export HF tensors", unit="tensor", total=total)
        for name, tensor in tensors:
            writer.add(name, tensor)
        files = writer.close()
        del full_state, model
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    source = tokenizer_dir or os.path.join(megatron_dir, TOKENIZER_DIR)
    if os.path.isdir(source):
        copy_tokenizer_files(source, out_dir)
    elif is_nemo:
        import warnings

        warnings.warn(f"{megatron_dir}: a .nemo carries no tokenizer files; pass tokenizer_dir "
                      "(--tokenizer-dir) to ship the tokenizer and chat template with the model")
    return files
