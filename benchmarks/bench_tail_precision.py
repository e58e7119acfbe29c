"""How precise the ``exact_tail`` teacher tail can be from a store: the stored fp32 log-sum-exp as the limit (issue 14).

The ``exact_tail`` convention's teacher bucket is ``1 − Σ_k exp(z_i − LSE)``: the mass outside the stored top-k.
nemo_kd forms it in float64 from the stored values, so the loss adds no error of its own
(``tests/test_loss_paper_checks.py``); what remains is the store's: the LSE is kept in fp32. On a peaked
teacher the tail is a small difference of numbers near 1, and an LSE off by half an fp32 ulp (~1e-6 nats at
|LSE| ~ 20) moves it by ~1e-6 absolute: a relative error of 1e-6 / tail. This prints, for teachers of growing
peak (logits ``N(0, (0.3·peak)²)``, V = 4096, top-32, as ``_peaked_case`` in that test), the tail's relative
error when the LSE is rounded to fp32, against float64 everywhere. No assertion (a measurement).

    .venv/bin/python benchmarks/bench_tail_precision.py
"""

from __future__ import annotations

import torch


def main() -> None:
    g = torch.Generator().manual_seed(0)
    print("| peak | tail min | tail median | median abs. LSE | tail rel. err. from the fp32 LSE: median | max |")
    print("|---:|---:|---:|---:|---:|---:|")
    for peak in (1, 5, 10, 20, 40):
        logits = (torch.randn(256, 4096, generator=g, dtype=torch.float64) * 0.3 * peak).float()
        values, _ = logits.topk(32, dim=-1)
        lse64 = torch.logsumexp(logits.double(), -1)
        tail = 1 - torch.exp(values.double() - lse64[:, None]).sum(-1)
        tail_from_fp32_lse = 1 - torch.exp(values.double() - lse64.float().double()[:, None]).sum(-1)
        rel = (tail_from_fp32_lse - tail).abs() / tail
        print(f"| ×{peak} | {tail.min():.1e} | {tail.median():.1e} | {lse64.abs().median():.1f} | "
              f"{rel.median():.1e} | {rel.max():.1e} |")


if __name__ == "__main__":
    main()
