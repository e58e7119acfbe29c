"""The stored per-token teacher tail statistic (``teacher_log_tail``, issue 14).

``log_tail = log Σ_{v ∉ top-k} p_v`` is summed directly over the full vocabulary at extraction
(:func:`nemo_kd.losses.token_stats.vocab_parallel_log_tail`), kept per token by the store's
``teacher_log_tail`` extension, collated as ``teacher_log_tail`` and read by ``exact_tail`` instead
of ``1 − Σ_k exp(z_i − LSE)``. References are float64 over the full logits.
"""

import json
import os

import numpy as np
import pytest
import torch

from dist_utils import run_distributed
from test_extract import assets  # noqa: F401  (the fixture, by name: its teacher and TP=1 store)
from nemo_kd.losses.kd import KDSettings, topk_kd_loss
from nemo_kd.losses.token_stats import teacher_token_stats, vocab_parallel_log_tail, vocab_parallel_topk
from nemo_kd.teacher.store import (
    LOG_TAIL_EXTENSION,
    StoreCorruptError,
    StoreManifest,
    StoreReader,
    StoreWriter,
    log_tail_extension,
)

K = 32


def _peaked(peak, n=64, v=4096, seed=0):
    """Teacher logits of spread 0.3·peak (×20: tails 3e-5 … 1e-2 beyond the top 32; ×40: down to 1e-17)
    and a student near it, fp32, as ``tests/test_loss_paper_checks.py``'s peaked case."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * 0.3 * peak
    s = t + torch.randn(n, v, generator=g, dtype=torch.float64) * 0.05 * peak
    return t.float(), s.float()


def _reference_log_tail(t, ids, vocab_size=None):
    """float64 ``log Σ_{v ∉ ids} softmax(t)_v`` over the real vocabulary."""
    t = t.double()[:, :vocab_size] if vocab_size is not None else t.double()
    lp = torch.log_softmax(t, -1)
    return torch.logsumexp(lp.scatter(1, ids, float("-inf")), -1)


def _tail_rel_err(log_tail, ref):
    return (log_tail.double().exp() / ref.exp() - 1).abs()


# ----------------------------------------------------------------------------- the statistic


@pytest.mark.parametrize("peak,bound", [(20, 1e-6), (40, 2e-6)])
def test_stored_log_tail_equals_float64_reference(peak, bound):
    t, _ = _peaked(peak)
    values, ids = vocab_parallel_topk(t, K)
    ref = _reference_log_tail(t, ids)
    err = _tail_rel_err(vocab_parallel_log_tail(t, values, ids), ref)
    # what remains is the fp32 rounding of the stored log: half an ulp of |log_tail| (≤ 9.5e-7 below 16,
    # ≤ 1.9e-6 below 32 nats: ×40's tails reach 1e-17)
    assert err.max() <= bound, err.max()
    if peak == 20:
        assert ref.exp().min() < 1e-3  # the peaked regime is reached
    # the old path: 1 − Σ_k exp(z − LSE) with the fp32 LSE the store keeps
    lse32 = torch.logsumexp(t.double(), -1).float().double()
    old = torch.log((1 - torch.exp(values.double() - lse32[:, None]).sum(-1)).clamp(min=1e-300))
    assert _tail_rel_err(old, ref).max() > 20 * err.max()


def test_log_tail_skips_padded_columns_chunks_and_bf16():
    t, _ = _peaked(20, n=40, v=1000)
    vocab = 937  # Megatron pads the vocabulary: columns 937.. are not tokens
    t[:, vocab:] = 50.0  # they would dominate every sum if they were read
    values, ids = vocab_parallel_topk(t, K, vocab_size=vocab)
    ref = _reference_log_tail(t, ids, vocab)
    for chunk in (None, 3 * 1000):  # 3 rows a chunk: the chunk loop
        err = _tail_rel_err(vocab_parallel_log_tail(t, values, ids, vocab_size=vocab, chunk_elements=chunk), ref)
        assert err.max() < 1e-6
    tb = t.bfloat16()
    vb, ib = vocab_parallel_topk(tb, K, vocab_size=vocab)
    err = _tail_rel_err(vocab_parallel_log_tail(tb, vb, ib, vocab_size=vocab), _reference_log_tail(tb.float(), ib, vocab))
    assert err.max() < 1e-6
    st = teacher_token_stats(t, K, vocab_size=vocab, with_log_tail=True)
    assert torch.equal(st.log_tail, vocab_parallel_log_tail(t, values, ids, vocab_size=vocab))
    assert teacher_token_stats(t, K, vocab_size=vocab).log_tail is None
    # all the mass in the top-k: -inf, not NaN
    full = vocab_parallel_log_tail(t[:, :8], *vocab_parallel_topk(t[:, :8], 8))
    assert torch.isneginf(full).all()


def _tp2_stats(rank, world, t, vocab):
    import torch.distributed as dist

    v_local = t.shape[1] // world
    shard = t[:, rank * v_local:(rank + 1) * v_local]
    st = teacher_token_stats(shard, K, group=dist.group.WORLD, vocab_size=vocab, with_log_tail=True)
    return st.log_tail, st.ids


@pytest.mark.distributed
def test_tp2_log_tail_equals_tp1():
    t, _ = _peaked(20, n=24, v=1024)
    vocab = 1000  # rank 1's shard ends in padding
    ref = teacher_token_stats(t, K, vocab_size=vocab, with_log_tail=True)
    for log_tail, ids in run_distributed(_tp2_stats, 2, t, vocab):
        assert torch.equal(ids, ref.ids)
        # float64 partial sums added in another order, then rounded to fp32: equal to an ulp
        torch.testing.assert_close(log_tail, ref.log_tail, rtol=2e-7, atol=0)
    assert _tail_rel_err(ref.log_tail, _reference_log_tail(t, ref.ids, vocab)).max() < 1e-6


# ----------------------------------------------------------------------------- the loss


def _ref_exact_tail_kd(s, t, ids, loss_type, **kw):
    """float64 KD over k+1 buckets from the *full* float64 teacher and student distributions."""
    from nemo_kd.losses.divergences import BucketSpace, divergence

    def buckets(logits):
        lp = torch.log_softmax(logits.double(), -1)
        return torch.cat([lp.gather(1, ids), torch.logsumexp(lp.scatter(1, ids, float("-inf")), -1)[:, None]], 1)

    return divergence(loss_type, buckets(t), buckets(s), BucketSpace.replicated(), **kw)


@pytest.mark.parametrize("loss_type,kw", [("forward_kl", {}), ("reverse_kl", {}), ("jsd", dict(jsd_beta=0.5)),
                                          ("akl", dict(akl_mu=0.5))])
def test_exact_tail_with_the_stored_tail_equals_float64_kd(loss_type, kw):
    t, s = _peaked(20)
    st = teacher_token_stats(t, K, with_log_tail=True)
    s64 = s.double().requires_grad_()  # float64 student: the teacher's stored statistics are the only inputs rounded
    g_out = torch.linspace(0.5, 1.5, s.shape[0], dtype=torch.float64)
    settings = KDSettings(loss_type=loss_type, topk_convention="exact_tail", **kw)
    new = topk_kd_loss(s64, st.values, st.ids, settings, teacher_lse=st.lse, teacher_log_tail=st.log_tail)
    (grad,) = torch.autograd.grad((new * g_out).sum(), s64)
    old = topk_kd_loss(s.double(), st.values, st.ids, settings, teacher_lse=st.lse)
    s_ref = s.double().requires_grad_()
    ref = _ref_exact_tail_kd(s_ref, t, st.ids, loss_type, **kw)
    (ref_grad,) = torch.autograd.grad((ref * g_out).sum(), s_ref)
    err_new = ((new - ref).abs() / ref).max()
    err_old = ((old - ref).abs() / ref).max()
    assert err_new <= 1e-6, err_new
    assert err_old > 10 * err_new and err_old > 1e-6, (err_old, err_new)  # the gain
    grad_err = ((grad - ref_grad).norm(dim=-1) / ref_grad.norm(dim=-1)).max()
    assert grad_err <= 1e-6, grad_err


def test_exact_tail_refuses_the_stored_tail_at_another_temperature():
    t, s = _peaked(5, n=4, v=100)
    st = teacher_token_stats(t, 8, with_log_tail=True)
    with pytest.raises(ValueError, match="temperature 1"):
        topk_kd_loss(s, st.values, st.ids, KDSettings(topk_convention="exact_tail", target_logits_scale=0.5),
                     teacher_lse=st.lse, teacher_log_tail=st.log_tail)
    # renormalized never reads a tail
    a = topk_kd_loss(s, st.values, st.ids, KDSettings(), teacher_lse=st.lse, teacher_log_tail=st.log_tail)
    assert torch.equal(a, topk_kd_loss(s, st.values, st.ids, KDSettings(), teacher_lse=st.lse))


# ----------------------------------------------------------------------------- the store

N_SAMPLES, MAX_LEN, SK = 7, 12, 4


def _sample(i):
    n = (3 * i) % 8
    rng = np.random.default_rng(i)
    values = -np.sort(-rng.normal(size=(n, SK)).astype(np.float32) * 3, axis=1)
    ids = rng.choice(50, size=(n, SK), replace=False) if n else np.zeros((0, SK), dtype=np.int64)
    lse = values[:, 0] + 1.0 if n else np.zeros(0, dtype=np.float32)
    log_tail = -rng.random(n).astype(np.float32) * 9 - 0.5
    return values, ids, lse, float(-i), log_tail


def _manifest(with_tail=True):
    m = StoreManifest(k=SK, values_dtype="float32", dataset_hash="d", tokenizer_hash="t", max_seq_length=MAX_LEN,
                      num_samples=N_SAMPLES, teacher_vocab_size=50)
    if with_tail:
        m.extensions = {LOG_TAIL_EXTENSION: log_tail_extension()}
    return m


def _write(path, with_tail=True, stop_after=None):
    w = StoreWriter(str(path), _manifest(with_tail))
    for i in w.remaining():
        v, ids, lse, slp, tail = _sample(i)
        w.append(i, v, ids, lse, slp, log_tail=tail if with_tail else None)
        w.commit()
        if stop_after is not None and i == stop_after:
            v, ids, lse, slp, tail = _sample(i + 1)
            w.append(i + 1, v, ids, lse, slp, log_tail=tail)  # appended, never committed
            w.close()
            return None
    return w.finalize()


def _files(path):
    return {name: open(os.path.join(path, name), "rb").read() for name in sorted(os.listdir(path))}


def test_store_round_trip_resume_and_old_format(tmp_path):
    _write(tmp_path / "a")
    with StoreReader(str(tmp_path / "a"), verify_checksums=True) as r:
        assert r.has_log_tail
        # an extension: the format versions stay what every older reader reads
        assert (r.manifest.format_version, r.manifest.min_reader_version) == (1, 1)
        for i in range(N_SAMPLES):
            item = r[i]
            np.testing.assert_array_equal(item.log_tail.numpy(), _sample(i)[4])
            assert item.log_tail.dtype == torch.float32 and item.log_tail.shape == (item.num_tokens,)
        r.verify_checksums(samples=True)
    # killed after committing sample 3 with sample 4 half-written: the resumed store is byte-identical
    _write(tmp_path / "b", stop_after=3)
    assert not os.path.exists(tmp_path / "b" / "manifest.json")
    _write(tmp_path / "b")
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert "shard-00000.log_tail.f4" in _files(tmp_path / "a")
    # without the extension: no files, log_tail None
    _write(tmp_path / "c", with_tail=False)
    assert not any("log_tail" in f for f in os.listdir(tmp_path / "c"))
    with StoreReader(str(tmp_path / "c")) as r:
        assert not r.has_log_tail and r[1].log_tail is None and r.read_log_tail(1) is None


def test_writer_refuses_a_missing_or_bad_tail(tmp_path):
    v, ids, lse, slp, tail = _sample(1)
    with StoreWriter(str(tmp_path / "a"), _manifest()) as w:
        with pytest.raises(ValueError, match="needs log_tail"):
            w.append(0, *_sample(0)[:4])
        w.append(0, *_sample(0)[:4], log_tail=_sample(0)[4])
        with pytest.raises(ValueError, match="token 1 is nan"):
            w.append(1, v, ids, lse, slp, log_tail=np.array([-1.0, np.nan, -2.0], dtype=np.float32))
        with pytest.raises(ValueError, match=r"log_tail must be \[3\]"):
            w.append(1, v, ids, lse, slp, log_tail=tail[:2])
    with StoreWriter(str(tmp_path / "b"), _manifest(with_tail=False)) as w:
        with pytest.raises(ValueError, match="without the teacher_log_tail extension"):
            w.append(0, *_sample(0)[:4], log_tail=_sample(0)[4])


def test_a_flipped_byte_in_the_tail_files_is_refused_naming_the_field(tmp_path):
    _write(tmp_path / "a")
    sizes = [len(_sample(i)[4]) for i in range(N_SAMPLES)]
    victim = 2
    offset = 4 * sum(sizes[:victim]) + 1
    file = tmp_path / "a" / "shard-00000.log_tail.f4"
    data = bytearray(file.read_bytes())
    data[offset] ^= 0x10
    file.write_bytes(bytes(data))
    with StoreReader(str(tmp_path / "a")) as r:
        r[victim - 1]  # its neighbours read
        with pytest.raises(StoreCorruptError, match=rf"sample {victim} .*log_tail fail their xxh3_64 checksum"):
            r[victim]
    with pytest.raises(StoreCorruptError, match="log_tail.f4: checksum"):
        StoreReader(str(tmp_path / "a"), verify_checksums=True)
    _write(tmp_path / "b")
    sums = tmp_path / "b" / "shard-00000.log_tail.xxh3.npy"
    data = bytearray(sums.read_bytes())
    data[-3] ^= 0x01
    sums.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptError, match="log_tail.xxh3.npy: checksum differs"):
        StoreReader(str(tmp_path / "b"))
    # the manifest's entry against the shard record
    _write(tmp_path / "c")
    mpath = tmp_path / "c" / "manifest.json"
    m = json.loads(mpath.read_text())
    m["extensions"][LOG_TAIL_EXTENSION]["shards"][0]["bytes"] += 4
    mpath.write_text(json.dumps(m))
    with pytest.raises(StoreCorruptError, match=f"extensions.{LOG_TAIL_EXTENSION}.shards"):
        StoreReader(str(tmp_path / "c"))


# ----------------------------------------------------------------------------- collate and train


def _dataset_samples(with_tail):
    from nemo_kd.data.kd_dataset import DistillationSample
    from nemo_kd.teacher.store import TeacherTopK

    g = torch.Generator().manual_seed(3)
    out = []
    for i, (p, n) in enumerate([(3, 4), (2, 5), (4, 2)]):
        t = torch.randn(n, 64, generator=g) * 6
        st = teacher_token_stats(t, SK, with_log_tail=True)
        ids = np.arange(10 * i, 10 * i + p + n, dtype=np.int64)
        mask = np.array([0] * p + [1] * n, dtype=np.int8)
        out.append(DistillationSample(i, ids, mask, TeacherTopK(i, st.values, st.ids, st.lse, -1.0,
                                                                log_tail=st.log_tail if with_tail else None)))
    return out


def test_collate_places_the_tail_with_its_sample_padded_and_packed():
    from nemo_kd.data.kd_dataset import collate
    from nemo_kd.data.packing import collate_packed

    samples = _dataset_samples(True)
    b = collate(samples, 12, pad_id=0)
    packed = collate_packed([samples], 20, pad_id=0)
    for batch in (b, packed):
        mask = batch["loss_mask"].bool()
        assert batch["teacher_log_tail"].shape == batch["teacher_lse"].shape
        assert torch.equal(batch["teacher_log_tail"][mask], torch.cat([s.teacher.log_tail for s in samples]))
        assert (batch["teacher_log_tail"][~mask] == 0).all()
    assert "teacher_log_tail" not in collate(_dataset_samples(False), 12, pad_id=0)


def test_objective_reads_the_stored_tail_and_trains_as_before_without_it():
    from nemo_kd.data.kd_dataset import collate
    from nemo_kd.losses.objective import (DistillationLossConfig, DistillationObjective, ObjectiveBatch,
                                          TopKTeacher, objective_normalisers)

    def loss_of(batch, logits, convention):
        obj = DistillationObjective(DistillationLossConfig(kd_loss_weight=1.0, sft_loss_weight=0.0,
                                                           topk_convention=convention, kd_loss_type="reverse_kl"))
        teacher = TopKTeacher(batch["teacher_values"], batch["teacher_ids"], batch["teacher_lse"],
                              batch.get("teacher_log_tail"))
        mb = ObjectiveBatch(batch["labels"], batch["loss_mask"], teacher)
        norms = objective_normalisers(obj.cfg, [mb])
        return obj(logits, mb, norms).loss

    with_tail, without = collate(_dataset_samples(True), 12, pad_id=0), collate(_dataset_samples(False), 12, pad_id=0)
    logits = torch.randn(3, 12, 64, generator=torch.Generator().manual_seed(1))
    for convention in ("renormalized", "exact_tail"):
        base = loss_of(without, logits, convention)
        # a store without the extension trains exactly as before: the tail is 1 − Σ_k p
        mask = without["loss_mask"].bool()
        ref = topk_kd_loss(logits[mask], without["teacher_values"][mask], without["teacher_ids"][mask],
                           KDSettings(topk_convention=convention, loss_type="reverse_kl"),
                           teacher_lse=without["teacher_lse"][mask])
        torch.testing.assert_close(base, ref.mean(), rtol=1e-6, atol=0)
        # with it, exact_tail reads it (and renormalized ignores it)
        got = loss_of(with_tail, logits, convention)
        want = topk_kd_loss(logits[mask], with_tail["teacher_values"][mask], with_tail["teacher_ids"][mask],
                            KDSettings(topk_convention=convention, loss_type="reverse_kl"),
                            teacher_lse=with_tail["teacher_lse"][mask],
                            teacher_log_tail=with_tail["teacher_log_tail"][mask]).mean()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        assert (got == base) == (convention == "renormalized")


# ----------------------------------------------------------------------------- extraction


@pytest.mark.distributed
def test_extraction_writes_the_tail_and_tp2_equals_tp1(assets, tmp_path):
    """compute_topk_logits with a Megatron teacher (TP=1, then TP=2 over gloo) stores the tail; equal stores."""
    from test_extract import _dist_extract, _extract_cfg

    from dist_utils import WorldOfOne
    from nemo_kd.teacher.extract import compute_topk_logits
    from nemo_kd.teacher.teachers import MegatronTeacher

    # test_extract's assets: its tokenizer, data, ×40-sharpened teacher and the TP=1 store (log_tail by default)
    data, tp1 = assets["data"], assets["store"]
    with WorldOfOne(seed=5):
        compute_topk_logits(_extract_cfg(str(tmp_path / "no_tail"), data, log_tail=False),
                            MegatronTeacher(assets["teacher_path"]), assets["tok"])
    # log_tail=false: the store as before the extension (the same payload bytes, no tail files)
    with StoreReader(str(tmp_path / "no_tail")) as r:
        assert not r.has_log_tail and LOG_TAIL_EXTENSION not in r.manifest.extensions
    for name in ("shard-00000.bin", "shard-00000.idx", "shard-00000.sum"):
        assert (tmp_path / "no_tail" / name).read_bytes() == open(os.path.join(tp1, name), "rb").read(), name
    assert not any("log_tail" in f for f in os.listdir(tmp_path / "no_tail"))
    run_distributed(_dist_extract, 2, 2, 1, assets["teacher_path"], str(assets["dir"] / "tok"), data,
                    str(tmp_path / "tp2"), None)
    with StoreReader(tp1, verify_checksums=True) as a, \
            StoreReader(str(tmp_path / "tp2"), verify_checksums=True) as b:
        assert a.has_log_tail and b.has_log_tail
        for i in range(len(a)):
            ta, tb = a.read_log_tail(i), b.read_log_tail(i)
            assert ta.shape == (a.num_tokens(i),) and (ta < 0).all()
            np.testing.assert_allclose(tb, ta, rtol=2e-5)  # the TP=2 logits differ in fp32 rounding
            # consistent with the stored top-k and LSE where 1 − Σ p is well-conditioned
            values, _, lse, _ = a.read_numpy(i)
            head = np.exp(values.astype(np.float64) - lse[:, None].astype(np.float64)).sum(-1)
            wide = 1 - head > 1e-2
            np.testing.assert_allclose(np.exp(ta[wide].astype(np.float64)), (1 - head)[wide], rtol=1e-4)


def test_deferred_projection_reads_the_stored_tail_as_the_materialised_logits():
    """kd.fuse_output_layer: the tail rows reach each chunk (ProjectedLogits) as the whole logits see them."""
    from nemo_kd.losses.objective import (DistillationLossConfig, DistillationObjective, ObjectiveBatch,
                                          TopKTeacher, objective_normalisers)
    from nemo_kd.losses.projection import ProjectedLogits

    g = torch.Generator().manual_seed(4)
    b, t_len, v, h = 2, 7, 96, 16
    t = torch.randn(b * t_len, v, generator=g) * 8
    st = teacher_token_stats(t, SK, with_log_tail=True)
    labels = torch.randint(0, v, (b, t_len), generator=g)
    mask = torch.ones(b, t_len)
    mask[:, 0] = 0
    hidden = torch.randn(b * t_len, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64)
    cfg = DistillationLossConfig(kd_loss_weight=1.0, sft_loss_weight=0.5, topk_convention="exact_tail",
                                 kd_loss_type="reverse_kl")
    out = {}
    for tail in (True, False):
        teacher = TopKTeacher(st.values.reshape(b, t_len, SK), st.ids.reshape(b, t_len, SK), st.lse.reshape(b, t_len),
                              st.log_tail.reshape(b, t_len) if tail else None)
        batch = ObjectiveBatch(labels, mask, teacher)
        norms = objective_normalisers(cfg, [batch])
        for projected in (True, False):
            hh, ww = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            logits = ProjectedLogits(hh, ww, 5) if projected else (hh @ ww.t()).reshape(b, t_len, v)
            loss = DistillationObjective(cfg)(logits, batch, norms).loss
            out[tail, projected] = (loss.detach(), *torch.autograd.grad(loss, (hh, ww)))
    for tail in (True, False):
        for a, c in zip(out[tail, True], out[tail, False]):
            torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)
    assert not torch.equal(out[True, False][0], out[False, False][0])  # the tail was read
