"""Helpers shared by the Triton kernels of :mod:`nemo_kd.kernels` (one copy of each).

* :func:`store_out` – store fp32 values in the pointee dtype with round-to-nearest-even,
  also under the CPU interpreter (which truncates fp32 → bf16).
* :func:`is_interpreted` – whether Triton runs kernels through its CPU interpreter
  (decided once, when the kernels are decorated, from ``TRITON_INTERPRET``).
* :func:`check_fused_supported` – a clear error when the fused kernels cannot run on a tensor.

The TP group's size / rank and collectives are :mod:`nemo_kd.kernels.collectives` (no Triton there:
the losses use them too).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def store_out(ptrs, g, mask, EMULATE_RTNE_BF16: tl.constexpr):
    """Store fp32 ``g`` in the pointee dtype, rounding to nearest-even as the GPU does.

    Triton's CPU interpreter truncates fp32 → bf16; under it (and only there) round
    in integer arithmetic first so CPU tests see the same bits as the GPU kernel.
    """
    if EMULATE_RTNE_BF16:
        bits = g.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        g = bits.to(tl.float32, bitcast=True)
    tl.store(ptrs, g.to(ptrs.dtype.element_ty), mask=mask)


def is_interpreted() -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - very old/new triton layouts
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return isinstance(store_out, InterpretedFunction)


def check_fused_supported(t: torch.Tensor) -> None:
    """Raise a clear error when the fused kernels cannot run on ``t``'s device / dtype."""
    if t.device.type == "cpu" and not is_interpreted():
        raise RuntimeError(
            "impl='fused' got CPU logits but Triton is not in interpreter mode: set "
            "TRITON_INTERPRET=1 before nemo_kd.kernels is first imported, or move the logits to the GPU."
        )
    if t.device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"impl='fused' supports CUDA (or CPU under TRITON_INTERPRET=1), got {t.device}")
    if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"impl='fused' supports fp32/bf16/fp16 logits, got {t.dtype} (use impl='torch' for fp64)")

