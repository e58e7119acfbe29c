"""MXFP4 weights (OCP Microscaling, as gpt-oss checkpoints ship their experts) to dense tensors.

Format (OCP MX v1.0, the layout transformers' ``integrations/mxfp4.py`` reads): a weight ``W`` of
shape ``[*prefix, rows, cols]`` is stored as two uint8 tensors,

* ``<name>_blocks`` ``[*prefix, rows, cols / 32, 16]``: each group of 32 consecutive elements of a row
  packed two per byte, element ``2j`` in the byte's low nibble and ``2j + 1`` in its high nibble; a
  nibble is an FP4 E2M1 code: bit 3 the sign, bits 2..1 the exponent (bias 1), bit 0 the mantissa,
  i.e. the values ``0, 0.5, 1, 1.5, 2, 3, 4, 6`` and their negatives;
* ``<name>_scales`` ``[*prefix, rows, cols / 32]``: one E8M0 scale per group, ``2^(s - 127)``
  (``s = 255`` is NaN in the spec and refused here).

Element ``k`` of a group is ``e2m1(code_k) * 2^(s - 127)``. gpt-oss stores each expert's projection
output-rows-first (``gate_up_proj`` as ``[E, 2I, H]``, ``down_proj`` as ``[E, H, I]``): the transpose of
the HF parameters ``[E, H, 2I]`` / ``[E, I, H]``, which :func:`dequantize_mxfp4` does not undo (the
caller does, see :mod:`nemo_kd.convert.hf_weights`).

Every dequantised value has at most two significant bits, so it is exact in fp32 and bf16 (within
their exponent range): dequantising here in fp32 and casting gives the same bits as transformers
dequantising straight into bf16.
"""

from __future__ import annotations

import torch

__all__ = ["E2M1_VALUES", "MXFP4_GROUP", "E8M0_BIAS", "dequantize_mxfp4"]

# FP4 E2M1 value of each 4-bit code (index = code).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MXFP4_GROUP = 32  # elements sharing one scale
E8M0_BIAS = 127
_E8M0_NAN = 255


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32,
                     name: str = "tensor") -> torch.Tensor:
    """The dense ``[*prefix, rows, groups * 32]`` tensor of MXFP4 ``blocks`` / ``scales`` (see the module
    docstring), in ``dtype``. ``name`` (the checkpoint's tensor name) words the errors.

    Raises:
        ValueError: wrong dtypes, shapes that do not pair up, or a NaN (255) scale.
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 {name}: {name}_blocks and {name}_scales must be uint8, got "
                         f"{blocks.dtype} and {scales.dtype}")
    if blocks.dim() < 2 or blocks.shape[-1] != MXFP4_GROUP // 2 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(f"MXFP4 {name}: {name}_blocks {tuple(blocks.shape)} must be {name}_scales' shape "
                         f"{tuple(scales.shape)} + ({MXFP4_GROUP // 2},) (two 4-bit values per byte, "
                         f"{MXFP4_GROUP} per scale)")
    if bool((scales == _E8M0_NAN).any()):
        raise ValueError(f"MXFP4 {name}: {name}_scales holds 255, the E8M0 NaN encoding")
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    low, high = table[(blocks & 0x0F).long()], table[(blocks >> 4).long()]
    # [..., 16] bytes -> [..., 32] elements, low nibble first
    values = torch.stack((low, high), dim=-1).flatten(-2)
    exponents = scales.to(torch.int32) - E8M0_BIAS
    values = torch.ldexp(values, exponents.unsqueeze(-1).to(torch.float32))
    return values.flatten(-2).to(dtype)
