"""Issue 14: every divergence gives the same value and gradient on every path, against float64.

One set of inputs per dtype, every loss type of ``LOSS_TYPES``, and each way nemo_kd computes a
token-level divergence of a student's logits from a teacher's:

* full vocabulary: the chunked torch path (default chunks, and 5-row chunks so rows straddle
  chunk edges), the old autograd path (``reference_full_kd_loss``), the fused Triton kernel
  (``TRITON_INTERPRET=1`` on CPU; with and without the in-place gradient);
* top-k over the whole vocabulary (k = V, ids in a per-row shuffled order), which is the
  full-vocabulary divergence: ``renormalized`` (softmax over all V ids) and ``exact_tail``
  (the teacher's float64 log-sum-exp; both tails are at the floor), through the torch log-prob
  primitive (with and without the in-place gradient) and the fused one.

All are asserted against a float64 evaluation of the definitions (``test_divergences.ref_divergence``)
on the same (upcast) inputs, to fp32 rounding; bf16 logits too on the torch paths (their gradient is bf16).
"""

import dataclasses
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from nemo_kd.losses.divergences import LOSS_TYPES  # noqa: E402
from nemo_kd.losses.full_vocab import chunked_full_kd_loss, reference_full_kd_loss  # noqa: E402
from nemo_kd.losses.kd import KDSettings, full_kd_loss, topk_kd_loss  # noqa: E402
from test_divergences import ref_akl_head, ref_divergence  # noqa: E402

try:
    from nemo_kd.kernels import full_kd_triton as fk
    from nemo_kd.kernels import logprobs_triton as lt
except ImportError:  # the torch paths are still checked
    fk = lt = None

pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|divide by zero) encountered:RuntimeWarning")

PARAMS = dict(jsd_beta=0.3, skew_alpha=0.2, akl_mu=0.5)
REF_PARAMS = dict(beta=0.3, alpha=0.2, mu=0.5)
N, V = 8, 64


def _inputs(dtype):
    g = torch.Generator().manual_seed(14)
    teacher = torch.randn(N, V, generator=g, dtype=torch.float64) * 2.5
    student = 0.6 * teacher + torch.randn(N, V, generator=g, dtype=torch.float64) * 1.5
    return student.to(dtype), teacher.to(dtype)


def _value_and_grad(fn, x, g_out, inplace=False):
    leaf = x.clone().requires_grad_(True)
    out = fn(leaf.clone() if inplace else leaf)  # in place: the loss writes over a non-leaf copy
    (out.double() * g_out).sum().backward()
    return out.detach().double(), leaf.grad.double()


def _paths(loss_type, student, teacher, fused=True):
    """{path: fn(student logits) -> [N]} for every way nemo_kd computes this divergence."""
    settings = KDSettings(loss_type=loss_type, **PARAMS)
    exact_tail = dataclasses.replace(settings, topk_convention="exact_tail")
    g = torch.Generator().manual_seed(3)
    ids = torch.stack([torch.randperm(V, generator=g) for _ in range(N)])
    vals = teacher.gather(-1, ids)
    lse = torch.logsumexp(teacher.double(), dim=-1)  # float64: the tail is then exactly at the floor
    paths = {
        "full/torch": lambda x: full_kd_loss(x, teacher, settings, impl="torch"),
        "full/torch 5-row chunks": lambda x: chunked_full_kd_loss(x, teacher, settings, chunk_tokens=5),
        "full/autograd (old torch path)": lambda x: reference_full_kd_loss(x, teacher, settings),
    }
    for inplace in (False, True):
        tag = ", in place" if inplace else ""
        paths[f"topk k=V renormalized/torch{tag}"] = (lambda ip: lambda x: topk_kd_loss(
            x, vals, ids, settings, inplace_backward=ip))(inplace)
        paths[f"topk k=V exact_tail/torch{tag}"] = (lambda ip: lambda x: topk_kd_loss(
            x, vals, ids, exact_tail, teacher_lse=lse, inplace_backward=ip))(inplace)
    if fk is not None and fused:  # the interpreter is slow: each fused kernel once, the in-place variants once each
        paths["topk k=V renormalized/fused"] = lambda x: topk_kd_loss(x, vals, ids, settings, impl="fused")
        paths["topk k=V exact_tail/fused, in place"] = lambda x: topk_kd_loss(
            x, vals, ids, exact_tail, teacher_lse=lse, impl="fused", inplace_backward=True)
        paths["full/fused"] = lambda x: full_kd_loss(x, teacher, settings, impl="fused")
        paths["full/fused, in place"] = lambda x: full_kd_loss(x, teacher, settings, impl="fused",
                                                               inplace_backward=True)
    return paths


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_path_matches_the_float64_definition(small_blocks, loss_type, dtype):
    student, teacher = _inputs(dtype)
    log_p = torch.log_softmax(teacher.double(), -1)
    if loss_type == "akl":  # no head decision within fp32 rounding of μ (that would test rounding, not paths)
        p = log_p.exp()
        at_or_above = torch.where(p[:, None, :] >= p[:, :, None], p[:, None, :], 0 * p[:, None, :]).sum(-1)
        assert (at_or_above - PARAMS["akl_mu"]).abs().min() > 1e-5
        assert ref_akl_head(p, PARAMS["akl_mu"]).sum(-1).float().mean() >= 2  # heads of several tokens
    g_out = torch.linspace(0.5, 1.5, N, dtype=torch.float64)
    ref = _value_and_grad(lambda x: ref_divergence(loss_type, log_p, torch.log_softmax(x, -1), **REF_PARAMS),
                          student.double(), g_out)
    assert ref[0].min() > 1e-2  # non-trivial values
    grad_tol = dict(atol=2e-6, rtol=2e-5) if dtype == torch.float32 else dict(atol=1e-4, rtol=1e-2)
    fused = fk is not None and dtype == torch.float32  # bf16: the torch paths (the interpreter is slow)
    paths = _paths(loss_type, student, teacher, fused)
    assert len(paths) == (11 if fused else 7)
    for name, fn in paths.items():
        value, grad = _value_and_grad(fn, student, g_out, inplace="in place" in name)
        torch.testing.assert_close(value, ref[0], atol=2e-6, rtol=2e-5, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(grad, ref[1], **grad_tol, msg=lambda m: f"{name} grad: {m}")
