"""Let Megatron-core's training code paths run on CPU (gloo) unchanged.

Megatron's pipeline schedules, p2p communication, DDP grad buffers and optimizers
hard-code CUDA in a few places: ``torch.zeros(..., device="cuda")`` scratch tensors,
``device=torch.cuda.current_device()`` allocations, ``torch.cuda.synchronize()`` and
the CUDA RNG state behind ``get_cuda_rng_tracker().fork()``. On a CPU-only build each
of those raises, although the surrounding logic (schedules, bucketing, all-reduces over
gloo, the optimizer step) is device agnostic.

:func:`install_cpu_shim` therefore patches, and records in :data:`PATCHED`:

* the module-global ``torch`` of exactly the Megatron modules listed in
  ``_MODULES_WITH_CPU_TORCH``, replaced by a *module-local* view (``_CpuTorch``) in which
  "cuda" means "cpu": factory ``device=`` arguments, ``torch.cuda.current_device()``
  (returns ``"cpu"``), ``synchronize``/``empty_cache`` (no-ops);
* Megatron's two RNG-state helpers behind ``get_cuda_rng_tracker().fork()``, pointed at
  the CPU generator (:func:`nemo_kd.parallel.state.seed_model_parallel_rng` seeds the
  tracker with CPU generator states), plus a log filter for the warning that becomes
  meaningless when both generators are the same;
* ``clip_grad_by_total_norm_fp32`` as imported by the optimizer, routed through
  Megatron's own ``use_decoupled_grad`` branch (the default branch asserts a CUDA tensor type);
* ``LanguageModule.setup_embeddings_and_output_layer`` (tied embeddings with PP>1) and
  ``DynamicGradScaler.load_state_dict`` (resuming an fp16 run: ``scale.cuda(...)``) run
  with ``Tensor.cuda`` as the identity for the duration of the call;
* ``Float16OptimizerWithFloat16Params.__init__`` (bf16/fp16 students: fp32 main params)
  and ``DistributedOptimizer.__init__`` run with ``Tensor.type()`` naming a CPU tensor by
  its CUDA type for the duration of the call: they sort parameters by ``param.type() in
  ['torch.cuda.HalfTensor', 'torch.cuda.BFloat16Tensor']`` / ``== 'torch.cuda.FloatTensor'``
  and raise otherwise; ``DistributedOptimizer.get_parameter_state_dp_zero`` (its
  checkpoint gather) runs with ``Tensor.cuda`` as the identity, and its checkpoint load keeps
  the ``step`` of ``torch.optim.Adam`` (the optimizer without TE/apex) instead of asking the
  saved tensors for it, one tensor per parameter (Megatron shares one, which Adam's in-place
  increment then advances once per parameter: a resumed run's bias correction would drift);
* the backward of ``LinearWithGradAccumulationAndAsyncCommunication`` (every TP linear) runs with
  its module's ``torch`` as the CPU view for the duration of the call: under sequence parallelism
  it allocates the reduce-scatter buffer of the input gradient with
  ``device=torch.cuda.current_device()`` (the rest of ``tensor_parallel.layers``, weight
  initialisation included, keeps the real ``torch``). Gloo itself has every collective sequence
  parallelism calls (all-gather and reduce-scatter into a tensor, torch >= 2.6);
* ``get_pos_emb_on_this_cp_rank`` as the rotary modules import it (context parallelism: RoPE keeps
  this CP rank's chunks of the positions) runs with ``rope_utils``' ``torch`` as the CPU view (its
  index tensor asks for pinned memory, which the view's factories drop on CPU) and ``Tensor.cuda``
  as the identity.

Global ``torch`` is otherwise never modified, and the shim does nothing where CUDA is
available: GPU runs execute Megatron unpatched. What it does not cover (on purpose):
CUDA streams / overlapped communication (``overlap_grad_reduce``, ``overlap_p2p_comm``,
``overlap_param_gather``), CUDA graphs, fused kernels (TE, apex): configure CPU runs
without them.

The patch list is tied to megatron-core 0.16.1; set ``NEMO_KD_CPU_SHIM_ANY_MEGATRON=1``
to try it on another version at your own risk.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
from typing import List

import torch

SUPPORTED_MEGATRON_VERSION = "0.16.1"
OVERRIDE_ENV = "NEMO_KD_CPU_SHIM_ANY_MEGATRON"

# "module.symbol" of everything patched, in order (empty until installed / on GPU).
PATCHED: List[str] = []

# Megatron modules whose module-global ``torch`` becomes the CPU view, each with why.
_MODULES_WITH_CPU_TORCH = {
    # total_num_tokens = torch.zeros(..., device="cuda") in every schedule.
    "megatron.core.pipeline_parallel.schedules": "device='cuda' token counter",
    # shape-exchange / recv buffers on torch.cuda.current_device(); torch.cuda.synchronize().
    "megatron.core.pipeline_parallel.p2p_communication": "p2p recv buffers on current_device()",
    # grad/param buffers allocated on torch.cuda.current_device(); warm-up tensor on "cuda".
    "megatron.core.distributed.param_and_grad_buffer": "grad buffers on current_device()",
    # torch.cuda.synchronize()/empty_cache() around buffer (de)allocation.
    "megatron.core.distributed.distributed_data_parallel": "torch.cuda.synchronize in buffer helpers",
    # found_inf / grad scale tensors created with device='cuda'.
    "megatron.core.optimizer.optimizer": "found_inf and scale tensors on 'cuda'",
    # fp16 loss scaling: the scale, min scale, growth and backoff factors created with device='cuda'.
    "megatron.core.optimizer.grad_scaler": "loss-scale tensors on 'cuda'",
    # grad-norm accumulators created with device='cuda'.
    "megatron.core.optimizer.clip_grads": "grad-norm scratch on 'cuda'",
    # local_multi_tensor_l2_norm (the grad-norm fallback without apex/TE) returns on "cuda".
    "megatron.core.utils": "no-apex l2-norm fallback result on 'cuda'",
    # RoPE moves inv_freq to torch.cuda.current_device() on the first forward.
    "megatron.core.models.common.embeddings.rotary_pos_embedding": "inv_freq moved to current_device()",
    # YaRN RoPE moves its two inv_freq tensors to torch.cuda.current_device() on every embedding it builds.
    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding": "YaRN inv_freq moved to current_device()",
    # The inference KV cache (static batching) is allocated on torch.cuda.current_device().
    "megatron.core.transformer.attention": "KV-cache buffers on current_device()",
    # Gathers along the last dim (inference's runtime_gather_output under TP) allocate on current_device().
    "megatron.core.tensor_parallel.mappings": "TP gather buffers on current_device()",
    # The distributed optimizer's checkpoint gather (fully_reshardable) and state load on current_device().
    "megatron.core.optimizer.distrib_optimizer": "checkpoint gather/load buffers on current_device()",
    # MoE router: the expert-bias / token-count buffers on current_device(); gating moves a CPU gate there.
    "megatron.core.transformer.moe.router": "expert-bias buffers and gate weight on current_device()",
    # MoE all-to-all dispatcher: its device-to-host copies of the split sizes run on a torch.cuda.Stream.
    "megatron.core.transformer.moe.token_dispatcher": "device-to-host side stream (torch.cuda.Stream)",
}


def _cpu_device(device):
    """Map any CUDA device spec (str, int, torch.device) to CPU; leave others alone."""
    if device is None:
        return None
    if isinstance(device, int) or (isinstance(device, str) and device.startswith("cuda")):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return "cpu"
    return device


class _CpuEvent:
    """A recorded CUDA event on CPU: everything before it has already happened."""

    def synchronize(self):
        return None

    def wait(self, stream=None):
        return None


class _CpuStream:
    """``torch.cuda.Stream`` on CPU: work is synchronous, so waiting and recording are no-ops."""

    def wait_stream(self, stream):
        return None

    def wait_event(self, event):
        return None

    def record_event(self, event=None):
        return _CpuEvent()

    def synchronize(self):
        return None


_CPU_DEFAULT_STREAM = _CpuStream()


class _CpuCuda:
    """``torch.cuda`` as seen by the patched modules: the current device is the CPU."""

    Stream = _CpuStream
    Event = _CpuEvent

    @staticmethod
    def current_device():
        return "cpu"

    @staticmethod
    def current_stream(device=None):
        return _CPU_DEFAULT_STREAM

    @staticmethod
    def synchronize(device=None):
        return None  # CPU ops are synchronous

    @staticmethod
    def empty_cache():
        return None

    @staticmethod
    def stream(stream=None):
        return contextlib.nullcontext()

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _CpuTorch:
    """``torch`` as seen by the patched modules: factory ``device=`` args "cuda" -> "cpu"."""

    cuda = _CpuCuda()

    def __init__(self):
        for name in ("zeros", "ones", "empty", "full", "tensor", "arange", "zeros_like", "empty_like"):
            setattr(self, name, self._on_cpu(getattr(torch, name)))

    @staticmethod
    def _on_cpu(factory):
        @functools.wraps(factory)
        def wrapped(*args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _cpu_device(kwargs["device"])
            kwargs.pop("pin_memory", None)  # a staging buffer for host-to-GPU copies: nothing to stage on CPU
            return factory(*args, **kwargs)

        return wrapped

    def __getattr__(self, name):
        return getattr(torch, name)


def _cpu_get_rng_state(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _clip_grads_via_decoupled_path(original):
    """``clip_grad_by_total_norm_fp32`` without its ``grad.type() == 'torch.cuda.FloatTensor'`` assert.

    Megatron's ``use_decoupled_grad=True`` branch does the same collection and in-place
    scaling with a dtype-only check, so the grads are routed through it.
    """

    @functools.wraps(original)
    def clip(parameters, max_norm, total_norm, use_decoupled_grad=False):
        if use_decoupled_grad:
            return original(parameters, max_norm, total_norm, use_decoupled_grad=True)
        params = [p for p in parameters if p.grad is not None]
        for p in params:
            p.decoupled_grad = p.grad
        try:
            return original(params, max_norm, total_norm, use_decoupled_grad=True)
        finally:
            for p in params:
                del p.decoupled_grad

    return clip


def _splits_as_numpy_on_cpu(original):
    """``maybe_move_tensor_to_cpu`` as the MoE dispatcher imports it, giving a CPU tensor the form a GPU
    run's split sizes take (``as_numpy=True``: a numpy array, what ``all_to_all_single`` reads as sizes)."""

    @functools.wraps(original)
    def move(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and tensor.device.type == "cpu":
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    return move


def _with_tensor_cuda_as_identity(method):
    """Run ``method`` with ``Tensor.cuda`` returning the tensor itself, restored afterwards."""

    @functools.wraps(method)
    def wrapped(*args, **kwargs):
        original_cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda self, *a, **k: self
        try:
            return method(*args, **kwargs)
        finally:
            torch.Tensor.cuda = original_cuda

    return wrapped


def _with_cpu_tensors_typed_as_cuda(method):
    """Run ``method`` with ``Tensor.type()`` (no arguments) of a CPU tensor returning its CUDA
    type name (``torch.BFloat16Tensor`` -> ``torch.cuda.BFloat16Tensor``), restored afterwards.

    Only the name changes: the tensors, their dtypes and ``Tensor.type(dtype)`` conversions
    are untouched, so Megatron's dtype-based sorting runs exactly as on a GPU.
    """

    @functools.wraps(method)
    def wrapped(*args, **kwargs):
        original_type = torch.Tensor.type

        def cuda_named_type(self, *a, **k):
            name = original_type(self, *a, **k)
            if a or k or self.device.type != "cpu":
                return name
            return name.replace("torch.", "torch.cuda.", 1)

        torch.Tensor.type = cuda_named_type
        try:
            return method(*args, **kwargs)
        finally:
            torch.Tensor.type = original_type

    return wrapped


def _keeping_torch_adam_step(method):
    """``DistributedOptimizer._set_main_param_and_optimizer_states`` that leaves torch Adam's ``step``
    (absent from the saved tensors, restored by ``load_state_dict`` before) as it is, unshared."""

    @functools.wraps(method)
    def wrapped(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
            if "step" in state:
                # load_state_dict gave every parameter the *same* step tensor, which torch Adam then
                # increments in place once per parameter: give each its own.
                state["step"] = state["step"].clone()
                tensors = {**tensors, "step": state["step"]}  # copied onto itself
        return method(self, model_param, tensors)

    return wrapped


def _with_module_torch_as_cpu_view(module, cpu_torch):
    """Run the wrapped function with ``module.torch`` as ``cpu_torch``, restored afterwards."""

    def wrapper(method):
        @functools.wraps(method)
        def wrapped(*args, **kwargs):
            original = module.torch
            module.torch = cpu_torch
            try:
                return method(*args, **kwargs)
            finally:
                module.torch = original

        return wrapped

    return wrapper


class _DropCpuRngChangedWarning(logging.Filter):
    """On CPU the tracked generator *is* the CPU generator, so fork()'s
    "CPU RNG state changed within GPU RNG context" warning fires on every dropout."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _check_megatron_version() -> None:
    from megatron.core import package_info

    version = package_info.__version__
    if version != SUPPORTED_MEGATRON_VERSION and os.environ.get(OVERRIDE_ENV, "") not in ("1", "true", "True"):
        raise RuntimeError(
            f"nemo_kd's CPU shim patches megatron-core {SUPPORTED_MEGATRON_VERSION} internals, "
            f"found {version}. Re-check the patched symbols in nemo_kd/parallel/cpu_shim.py, or set "
            f"{OVERRIDE_ENV}=1 to try anyway."
        )


def _wrap_method(cls, name: str, wrapper) -> None:
    """``cls.name = wrapper(cls.name)``, recorded in :data:`PATCHED` as ``module.Class.name``."""
    setattr(cls, name, wrapper(getattr(cls, name)))
    PATCHED.append(f"{cls.__module__}.{cls.__qualname__}.{name}")


def install_cpu_shim() -> List[str]:
    """Install the CPU shim once; returns the patched ``module.symbol`` names.

    A no-op (returns ``[]``) when CUDA is available. Idempotent: later calls return the
    same list without patching again.
    """
    if torch.cuda.is_available() or PATCHED:
        return list(PATCHED)
    _check_megatron_version()
    cpu_torch = _CpuTorch()
    for module_name in _MODULES_WITH_CPU_TORCH:
        module = importlib.import_module(module_name)
        module.torch = cpu_torch
        PATCHED.append(f"{module_name}.torch")

    random = importlib.import_module("megatron.core.tensor_parallel.random")
    # get_cuda_rng_tracker().fork() saves/restores the CUDA generator: use the CPU one.
    random._get_cuda_rng_state = _cpu_get_rng_state
    # ...and restores it through this helper.
    random._set_cuda_rng_state = _cpu_set_rng_state
    PATCHED.extend([f"{random.__name__}._get_cuda_rng_state", f"{random.__name__}._set_cuda_rng_state"])
    # ...and then warns that the CPU generator moved, which on CPU is the point.
    logging.getLogger(random.__name__).addFilter(_DropCpuRngChangedWarning())
    PATCHED.append(f"logging:{random.__name__} (filter)")

    optimizer = importlib.import_module("megatron.core.optimizer.optimizer")
    # Grad clipping asserts grad.type() == 'torch.cuda.FloatTensor' (a CPU grad is 'torch.FloatTensor').
    optimizer.clip_grad_by_total_norm_fp32 = _clip_grads_via_decoupled_path(optimizer.clip_grad_by_total_norm_fp32)
    PATCHED.append(f"{optimizer.__name__}.clip_grad_by_total_norm_fp32")

    from megatron.core.models.common.language_module.language_module import LanguageModule

    # Tied embeddings over PP>1: the stage-sync does weight.data = weight.data.cuda() before its all-reduce.
    _wrap_method(LanguageModule, "setup_embeddings_and_output_layer", _with_tensor_cuda_as_identity)

    # bf16/fp16: the mixed-precision optimizer accepts only CUDA tensor type names for its
    # parameters ('torch.cuda.BFloat16Tensor' etc.; a CPU one is 'torch.BFloat16Tensor').
    _wrap_method(optimizer.Float16OptimizerWithFloat16Params, "__init__", _with_cpu_tensors_typed_as_cuda)
    distrib_optimizer = importlib.import_module("megatron.core.optimizer.distrib_optimizer")
    # Megatron's distributed optimizer sorts its parameters by the same CUDA type names...
    _wrap_method(distrib_optimizer.DistributedOptimizer, "__init__", _with_cpu_tensors_typed_as_cuda)
    # ...and its checkpoint gather moves each shard with send_tensor.cuda() before the collective.
    _wrap_method(distrib_optimizer.DistributedOptimizer, "get_parameter_state_dp_zero", _with_tensor_cuda_as_identity)
    # Without TE/apex (every CPU run) its inner optimizer is torch.optim.Adam, whose per-parameter state
    # also holds "step"; loading a fully_reshardable checkpoint copies every state key from the saved
    # tensors, which carry param/exp_avg/exp_avg_sq only (KeyError: 'step'). load_state_dict has already
    # set "step" from the saved param groups (one tensor shared by every parameter, which torch Adam
    # increments in place once per parameter per step): keep it, one copy per parameter.
    _wrap_method(distrib_optimizer.DistributedOptimizer, "_set_main_param_and_optimizer_states",
                 _keeping_torch_adam_step)
    grad_scaler = importlib.import_module("megatron.core.optimizer.grad_scaler")
    # fp16 resume: the loaded scale goes through state_dict['scale'].cuda(current_device()).
    _wrap_method(grad_scaler.DynamicGradScaler, "load_state_dict", _with_tensor_cuda_as_identity)
    layers = importlib.import_module("megatron.core.tensor_parallel.layers")
    # Sequence parallelism: the TP linear's backward reduce-scatters the input gradient into a buffer
    # made with torch.empty(..., device=torch.cuda.current_device()) (a staticmethod: wrapped as one).
    linear = layers.LinearWithGradAccumulationAndAsyncCommunication
    linear.backward = staticmethod(_with_module_torch_as_cpu_view(layers, cpu_torch)(linear.backward))
    PATCHED.append(f"{linear.__module__}.{linear.__qualname__}.backward")
    dispatcher = importlib.import_module("megatron.core.transformer.moe.token_dispatcher")
    # MoE all-to-all: the per-rank split sizes go through maybe_move_tensor_to_cpu(..., as_numpy=True), which
    # converts CUDA tensors only; on CPU they would stay tensors where a GPU run hands numpy sizes on.
    dispatcher.maybe_move_tensor_to_cpu = _splits_as_numpy_on_cpu(dispatcher.maybe_move_tensor_to_cpu)
    PATCHED.append(f"{dispatcher.__name__}.maybe_move_tensor_to_cpu")
    rope_utils = importlib.import_module("megatron.core.models.common.embeddings.rope_utils")
    # Context parallelism: RoPE keeps this CP rank's chunks of the positions through an index tensor made in
    # pinned memory and moved with .cuda(non_blocking=True) (get_pos_emb_on_this_cp_rank, which the rotary
    # modules import by name): the CPU view of torch for the one, Tensor.cuda as the identity for the other.
    cp_pos_emb = _with_module_torch_as_cpu_view(rope_utils, cpu_torch)(
        _with_tensor_cuda_as_identity(rope_utils.get_pos_emb_on_this_cp_rank))
    for name in ("rotary_pos_embedding", "yarn_rotary_pos_embedding"):
        module = importlib.import_module(f"megatron.core.models.common.embeddings.{name}")
        module.get_pos_emb_on_this_cp_rank = cp_pos_emb
        PATCHED.append(f"{module.__name__}.get_pos_emb_on_this_cp_rank")
    return list(PATCHED)


def is_installed() -> bool:
    return bool(PATCHED)
