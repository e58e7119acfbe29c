"""Training checkpoints through Megatron ``dist_checkpointing``: reshardable across TP/PP/DP (and EP).

A checkpoint is a directory::

    <path>/weights/    dist_checkpointing (torch_dist): the student's ShardedTensors and the
                       Megatron optimizer's state mapped onto them (Adam moments, fp32 main
                       params) – global, layout-independent keys, so a run saved at
                       (TP, PP, DP) = (2, 1, 1) resumes at (1, 2, 1) or (1, 1, 2)
    <path>/common.pt   rank 0: scheduler, engine step, skipped-step count, the saving layout
                       and whatever the caller adds (Lightning loops and callbacks, ``consumed_samples``)
    <path>/rng/rank<N>.pt   each rank's RNG states (torch, CUDA, Megatron's tracker, python, numpy)

Resuming restores weights, optimizer, scheduler and data position at any layout the
architecture divides into. RNG states are per rank, so they are restored only when the
layout is the one that saved them (else a warning: the run goes on, with fresh RNG
streams – which matters only for dropout).

The write is atomic: everything goes to ``<path>.tmp-<tag>`` first (``<tag>``: the writing
process's :func:`nemo_kd.output_lock.temp_tag`, ``p<pid>-<host>-<time>``, unique on a shared
file system) and is renamed into place by rank 0 after every rank finished, so a run killed
mid-save leaves the previous checkpoint untouched and no half-written one that looks complete.
Overwriting an existing name (a resumed run saving a step its killed predecessor saved too)
moves the old one to ``<path>.old-<tag>`` between the two renames. What a killed save leaves
is repaired by :func:`repair_interrupted_saves`: at the next start of a run (with the run's
lock held, :mod:`nemo_kd.training.resume`) and again at every save.

Vocabulary padding: Megatron pads the vocabulary to a multiple of 128·TP, so changing TP
can change the embedding's row count. Model weights cope (:mod:`nemo_kd.convert.checkpoint_io`
reads them whole and re-cuts), but the optimizer's moments of those rows cannot be
resharded by dist_checkpointing; resuming at a TP with another padded size is refused
with a message (choose ``vocab_size`` a multiple of 128·TP for every TP you will use).
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from nemo_kd.models.config import TRAINING_ONLY_KEYS
from nemo_kd.output_lock import temp_tag
from nemo_kd.parallel import state

__all__ = ["CheckpointLayoutError", "is_training_checkpoint", "load_training_checkpoint", "remove_training_checkpoint",
           "repair_interrupted_saves", "save_training_checkpoint"]

log = logging.getLogger(__name__)

FORMAT = "nemo_kd.training_checkpoint.v1"
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
WEIGHTS_DIR, COMMON_FILE, RNG_DIR = "weights", "common.pt", "rng"


class CheckpointLayoutError(ValueError):
    """The checkpoint cannot be resumed with this run's architecture or parallel layout."""


def is_training_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMMON_FILE)) and os.path.isdir(os.path.join(path, WEIGHTS_DIR))


def _layout() -> Dict[str, int]:
    layout = {"tp": state.tp_size(), "pp": state.pp_size(), "dp": state.dp_size(),
              "world": dist.get_world_size() if dist.is_initialized() else 1}
    if state.ep_size() > 1:  # expert parallelism (MoE): its ranks' RNG streams differ too (absent: EP=1)
        layout["ep"] = state.ep_size()
    return layout


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _chunks(engine) -> list:
    """The engine's model chunks (one per virtual pipeline stage; one without them)."""
    return list(getattr(engine, "chunks", None) or [engine.module])


def _sharded(engine, is_loading: bool) -> dict:
    from nemo_kd.convert.hf_weights import unwrap_model

    chunks = _chunks(engine)
    # Virtual pipeline stages: one sharded state dict per model chunk (Megatron-LM's model0, model1, ...).
    # Its keys are global (layer offsets of the chunk's virtual stage), so a checkpoint saved with virtual
    # stages loads without them and the other way round.
    model_sd = unwrap_model(chunks[0]).sharded_state_dict() if len(chunks) == 1 else \
        {f"model{i}": unwrap_model(chunk).sharded_state_dict() for i, chunk in enumerate(chunks)}
    # Megatron's distributed optimizer defaults to 'fully_sharded_model_space' (flattened ranges, which
    # megatron-core 0.16's dist_checkpointing refuses to save); 'fully_reshardable' stores each
    # parameter's state in its canonical shape, so a checkpoint reshards over TP/PP/DP like the
    # non-distributed optimizer's. Other optimizers ignore the metadata.
    optimizer_sd = engine.optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=OPTIMIZER_METADATA)
    return {"model": model_sd, "optimizer": optimizer_sd}


def _materialise_distributed_optimizer_state(optimizer) -> None:
    """Give a fresh distributed optimizer the Adam state tensors the checkpoint is loaded into.

    Without TE's/apex's fused Adam, Megatron's ``DistributedOptimizer.state_dict`` reads the step
    from the per-parameter state, which a never-stepped optimizer lacks (``assert len(steps) == 1``).
    Megatron's own dummy-state initialiser (one step on zero grads) creates it; every value it
    touches (moments, step, fp32 main params) is overwritten by the load that follows.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(inner, DistributedOptimizer) and not inner.optimizer.state:
            inner._init_optimizer_states_with_dummy_values()


def _rng_state() -> Dict[str, Any]:
    from megatron.core import tensor_parallel

    name, keys, pos, has_gauss, cached = np.random.get_state()
    # numpy's state as plain types and a tensor: the file loads with torch.load(weights_only=True)
    out = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
           "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def _set_rng_state(rng: Dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    tensor_parallel.get_cuda_rng_tracker().set_states(rng["tracker"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


# The temporary names save_training_checkpoint uses: <path>.tmp-<tag> / <path>.old-<tag>, and
# remove_training_checkpoint's <path>.del-<tag>; <tag> a temp_tag (p<pid>-<host>-<time>) or, from before
# temp_tag, the bare pid.
INTERRUPTED_SAVE_NAME = re.compile(r"(?P<path>.+)\.(?P<kind>tmp|old|del)-(?P<tag>\d+|p\d+-[A-Za-z0-9_.-]+)")
_REMOVED_WHAT = {"tmp": "the unfinished checkpoint of a killed save",
                 "old": "the checkpoint a killed save had replaced already",
                 "del": "a checkpoint whose removal was killed"}


def repair_interrupted_saves(directory: str, keep_tag: Optional[str] = None) -> List[str]:
    """Repair what saves killed in ``directory`` left; return what was done, one line each (for the log).

    * ``<path>.old-<tag>`` with no ``<path>``: the save was killed between its two renames. Its
      ``<path>.tmp-<tag>`` is complete then (the renames start after every rank finished), so the
      swap is completed; without one the old checkpoint is put back. Either way ``<path>`` is a
      complete checkpoint again (a ``-last`` one is what the next resume needs).
    * every other ``<path>.tmp-<tag>`` / ``<path>.old-<tag>`` directory (a half-written checkpoint,
      or one already replaced) and every ``<path>.del-<tag>`` (a removal that was killed) is removed:
      each is a checkpoint's size.

    Only directories with these names are touched, and not those of ``keep_tag`` (this process's
    own save). Call it on one rank, with the directory's one writer (the run's lock) holding it:
    then no live process owns what it removes.
    """
    done: List[str] = []
    if not os.path.isdir(directory):
        return done
    leftovers = []
    for name in sorted(os.listdir(directory)):
        match = INTERRUPTED_SAVE_NAME.fullmatch(name)
        full = os.path.join(directory, name)
        if match and match["tag"] != keep_tag and os.path.isdir(full):
            leftovers.append((match, full))
    for match, full in leftovers:
        path = os.path.join(directory, match["path"])
        if match["kind"] != "old" or os.path.exists(path):
            continue
        tmp = f"{path}.tmp-{match['tag']}"
        for source, what in ((tmp, "completed a save killed between its renames"),
                             (full, "put back the checkpoint a killed save was replacing")):
            if is_training_checkpoint(source):
                os.replace(source, path)
                done.append(f"{path}: {what} (from {os.path.basename(source)})")
                break
    for match, full in leftovers:
        if os.path.isdir(full):
            shutil.rmtree(full, ignore_errors=True)
            done.append(f"{full}: removed, {_REMOVED_WHAT[match['kind']]}")
    return done


def remove_training_checkpoint(path: str) -> None:
    """Remove the checkpoint at ``path`` (one rank) so that a kill cannot leave half of one under its name:
    it is renamed to ``<path>.del-<tag>`` first (one atomic step: ``path`` is then gone, and a resume cannot pick a
    checkpoint whose weights were half deleted), then deleted; a kill during the delete leaves the ``.del-``
    directory to :func:`repair_interrupted_saves`."""
    if not os.path.exists(path):
        return
    doomed = f"{os.path.abspath(path)}.del-{temp_tag()}"
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def save_training_checkpoint(engine, path: str, common: Optional[Dict[str, Any]] = None) -> None:
    """Save the engine's student, optimizer, scheduler and step (all ranks call it).

    ``common``: picklable extras written by rank 0 (e.g. Lightning's loop state).
    """
    from megatron.core import dist_checkpointing

    from nemo_kd.convert.checkpoint_io import _cpu_safe_dist_checkpointing

    path = os.path.abspath(path)
    # every rank must agree on the temporary directory: rank 0 names it (its process's tag)
    tags = [temp_tag()]
    if dist.is_initialized():
        dist.broadcast_object_list(tags, src=0)
    tag = tags[0]
    tmp = f"{path}.tmp-{tag}"
    if _rank() == 0:
        # a run's start repairs its checkpoint directory already (nemo_kd.training.resume); this catches
        # checkpoints saved outside the recipe (a directory has one writer: any other save's temp is dead)
        for line in repair_interrupted_saves(os.path.dirname(path), keep_tag=tag):
            log.warning(line)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, WEIGHTS_DIR))
        os.makedirs(os.path.join(tmp, RNG_DIR))
    _barrier()
    with _cpu_safe_dist_checkpointing():
        dist_checkpointing.save(_sharded(engine, is_loading=False), os.path.join(tmp, WEIGHTS_DIR))
    torch.save({"layout": _layout(), "rng": _rng_state()}, os.path.join(tmp, RNG_DIR, f"rank{_rank()}.pt"))
    if _rank() == 0:
        torch.save({"format": FORMAT, "layout": _layout(), "student": engine.student_cfg.to_dict(),
                    "padded_vocab_rows": engine.student_cfg.padded_vocab_size(state.tp_size()),
                    "scheduler": engine.scheduler.state_dict(), "engine_step": engine.step,
                    "skipped_steps": engine.skipped_steps, "extra": common or {}}, os.path.join(tmp, COMMON_FILE))
    _barrier()
    if _rank() == 0:
        old = f"{path}.old-{tag}"  # a kill between the two renames: repair_interrupted_saves completes the swap
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()


def load_training_checkpoint(engine, path: str) -> Dict[str, Any]:
    """Restore a checkpoint of :func:`save_training_checkpoint` into ``engine`` (all ranks call it).

    Returns the ``common`` extras saved with it. Raises :class:`CheckpointLayoutError` for
    another architecture or an unreshardable vocabulary padding.
    """
    from megatron.core import dist_checkpointing

    if not is_training_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a nemo_kd training checkpoint (no {COMMON_FILE} + {WEIGHTS_DIR}/)")
    common = torch.load(os.path.join(path, COMMON_FILE), map_location="cpu", weights_only=True)
    if common.get("format") != FORMAT:
        raise CheckpointLayoutError(f"{path}: unknown checkpoint format {common.get('format')!r}")
    # the architecture must agree; training-only settings (activation recompute) may change at a resume
    saved = {k: v for k, v in common["student"].items() if k not in TRAINING_ONLY_KEYS}
    if saved != engine.student_cfg.architecture_dict():
        diff = sorted(k for k in set(saved) | set(engine.student_cfg.architecture_dict())
                      if saved.get(k) != engine.student_cfg.architecture_dict().get(k))
        raise CheckpointLayoutError(f"{path}: saved for another student architecture (differs in {diff})")
    rows = engine.student_cfg.padded_vocab_size(state.tp_size())
    if common["padded_vocab_rows"] != rows:
        raise CheckpointLayoutError(
            f"{path}: saved at TP={common['layout']['tp']} with {common['padded_vocab_rows']} padded vocabulary rows; "
            f"TP={state.tp_size()} pads to {rows}, and the optimizer state of padded rows cannot be resharded. "
            f"Resume at a TP that pads alike, or set vocab_size to a multiple of 128*TP.")
    _materialise_distributed_optimizer_state(engine.optimizer)
    loaded = dist_checkpointing.load(_sharded(engine, is_loading=True), os.path.join(path, WEIGHTS_DIR))
    from nemo_kd.convert.hf_weights import unwrap_model

    chunks = _chunks(engine)
    if len(chunks) == 1:
        unwrap_model(chunks[0]).load_state_dict(loaded["model"], strict=True)
    else:
        for i, chunk in enumerate(chunks):
            unwrap_model(chunk).load_state_dict(loaded["model"][f"model{i}"], strict=True)
    # bf16/fp16: this also restores the fp32 main params (and fp16's loss scale) from the checkpoint.
    # No reload_model_params() after it (Megatron-LM calls that only when the optimizer is not
    # loaded): it copies the model's bf16/fp16 params over the fp32 main params, rounding them.
    engine.optimizer.load_state_dict(loaded["optimizer"])
    engine.scheduler.load_state_dict(common["scheduler"])
    engine.step = int(common["engine_step"])
    engine.skipped_steps = int(common.get("skipped_steps", 0))  # fp16 overflow count (absent before it was kept)
    rng_file = os.path.join(path, RNG_DIR, f"rank{_rank()}.pt")
    if common["layout"] == _layout() and os.path.isfile(rng_file):
        _set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True)["rng"])
    elif _rank() == 0:
        log.warning("%s was saved with layout %s, this run is %s: RNG states are not restored", path,
                    common["layout"], _layout())
    _barrier()
    return common["extra"]
