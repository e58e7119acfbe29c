"""The teacher logits store: round trip, size budget, checksums, compatibility, kill-and-resume.

The kill-and-resume tests run the writer in child processes (this file doubles as
the child's script, see ``_child_main``) and SIGKILL them at chosen points: mid
append, inside commit before/after its fsyncs and its atomic rename, between every
step of finalize, and at random times. The restarted writer must then produce a
store byte-identical to an uninterrupted run.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from nemo_kd.teacher.store import (
    INDEX_DTYPE,
    StoreCorruptError,
    StoreError,
    StoreIncompleteError,
    StoreManifest,
    StoreMismatchError,
    StoreReader,
    StoreWriter,
    bytes_per_sample,
    finalize_manifest,
    shard_for_sample,
    shard_sample_range,
)

K = 5
MAX_LEN = 16


def _sample(i, k=K):
    """Deterministic synthetic teacher output of sample ``i`` (0..MAX_LEN-? tokens)."""
    n = (i * 7) % 13 if i % 9 else 0 if i % 18 == 0 else 3  # some empty completions
    rng = np.random.default_rng(1000 + i)
    values = -np.sort(-rng.normal(size=(n, k)).astype(np.float32) * 4, axis=1)
    ids = rng.integers(0, 50_000, size=(n, k))
    lse = values[:, 0] + rng.random(n).astype(np.float32)
    seq_logprob = -0.37 * i - 1e-9 * i * i
    return values, ids, lse, seq_logprob


def _manifest(num_samples, values_dtype="bfloat16", **kw):
    fields = dict(
        k=K,
        values_dtype=values_dtype,
        dataset_hash="sha256:data",
        tokenizer_hash="sha256:tok",
        teacher_name="teacher-7b",
        teacher_hash="sha256:teacher",
        max_seq_length=MAX_LEN,
        num_samples=num_samples,
    )
    fields.update(kw)
    return StoreManifest(**fields)


def _write(path, num_samples, rank=0, world=1, commit_every=4, values_dtype="bfloat16", sample_fn=_sample):
    w = StoreWriter(path, _manifest(num_samples, values_dtype), rank, world)
    for i in w.remaining():
        w.append(i, *sample_fn(i))
        if (i + 1) % commit_every == 0:
            w.commit()
    return w.finalize()


def _files(path):
    out = {}
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as f:
            out[name] = f.read()
    return out


# ----------------------------------------------------------------------------- basic behaviour


@pytest.mark.parametrize("values_dtype", ["float32", "bfloat16", "float16"])
def test_round_trip(tmp_path, values_dtype):
    import torch

    n_samples = 23
    data = {}
    w = StoreWriter(tmp_path, _manifest(n_samples, values_dtype), 0, 1)
    for i in w.remaining():
        values, ids, lse, seq = _sample(i)
        data[i] = (torch.from_numpy(values), torch.from_numpy(ids), torch.from_numpy(lse), seq)
        w.append(i, *data[i])  # torch inputs; numpy works too
    w.finalize()
    reader = StoreReader(tmp_path, verify_checksums=True)
    assert len(reader) == n_samples and reader.manifest.values_dtype == values_dtype
    to_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[values_dtype]
    for i, (values, ids, lse, seq) in data.items():
        got = reader[i]
        assert got.values.dtype == torch.float32 and got.ids.dtype == torch.int64 and got.lse.dtype == torch.float32
        assert torch.equal(got.values, values.to(to_dtype).float())  # same rounding as torch
        assert torch.equal(got.ids, ids) and torch.equal(got.lse, lse)
        assert got.seq_logprob == seq and got.num_tokens == reader.num_tokens(i) == values.shape[0]


def test_bf16_bytes_per_token_budget(tmp_path):
    # Realistic lengths (>= 6 tokens): payload + index + per-sample checksums within 6k + 16 bytes per token.
    def sample(i):
        n = 6 + i % 11  # <= MAX_LEN
        return np.full((n, K), 1.5, np.float32), np.ones((n, K), np.int64), np.zeros(n, np.float32), -1.0

    info = _write(tmp_path, 64, sample_fn=sample)
    assert info.payload_bytes == sum(bytes_per_sample(sample(i)[0].shape[0], K, "bfloat16") for i in range(64))
    per_token = (info.payload_bytes + info.num_samples * (INDEX_DTYPE.itemsize + 32)) / info.num_tokens
    assert per_token <= 6 * K + 16, per_token
    sums = os.path.getsize(tmp_path / "shard-00000.sum")  # incl. its .npy header, as the index's
    whole_files = (info.payload_bytes + info.index_bytes + sums) / info.num_tokens
    assert whole_files <= 6 * K + 16, whole_files


def test_random_access_is_order_independent(tmp_path):
    _write(tmp_path, 40, world=1)
    reader = StoreReader(tmp_path)
    sequential = {i: reader.read_numpy(i) for i in range(len(reader))}
    order = list(range(len(reader)))
    random.Random(3).shuffle(order)
    fresh = StoreReader(tmp_path)
    for i in order:
        v, ids, lse, seq = fresh.read_numpy(i)
        sv, sids, slse, sseq = sequential[i]
        assert np.array_equal(v, sv) and np.array_equal(ids, sids) and np.array_equal(lse, slse) and seq == sseq
    with pytest.raises(IndexError):
        reader[40]


def test_checksum_detects_flipped_byte(tmp_path):
    _write(tmp_path, 12)
    StoreReader(tmp_path).verify_checksums()
    for name in ("shard-00000.bin", "shard-00000.idx"):
        p = tmp_path / name
        original = p.read_bytes()
        flipped = bytearray(original)
        flipped[len(flipped) - 7] ^= 0x10
        p.write_bytes(bytes(flipped))
        with pytest.raises(StoreCorruptError, match=name):
            StoreReader(tmp_path).verify_checksums()
        p.write_bytes(original)
    truncated = tmp_path / "shard-00000.bin"
    truncated.write_bytes(truncated.read_bytes()[:-4])
    with pytest.raises(StoreCorruptError, match="bytes, manifest says"):  # caught at open, no hashing
        StoreReader(tmp_path)


def test_manifest_names_files_inside_the_store_and_reads_or_says_where(tmp_path):
    """An edited manifest cannot make the reader open a file outside the store, and one that is not valid
    JSON (or not a manifest) is refused naming its path, not with a bare JSONDecodeError."""
    store = tmp_path / "store"
    _write(store, 6)
    manifest = store / "manifest.json"
    good = json.loads(manifest.read_text())
    outside = tmp_path / "outside.bin"
    outside.write_bytes((store / good["shards"][0]["payload_file"]).read_bytes())  # same size: only the name is wrong
    for field, name in (("payload_file", "../outside.bin"), ("payload_file", str(outside)), ("index_file", ".."),
                        ("index_file", "")):
        edited = json.loads(json.dumps(good))
        edited["shards"][0][field] = name
        manifest.write_text(json.dumps(edited))
        with pytest.raises(StoreCorruptError, match=rf"manifest\.json: shards\[0\]\.{field}=.* is not a file name "
                                                    "inside the store"):
            StoreReader(store)
    for text in ('{"format": "nemo_kd.teacher_logits_store", "k": 8,', "[1, 2]", '{"shards": [{"x": 1}]}'):
        manifest.write_text(text)
        with pytest.raises(StoreCorruptError, match=rf"{store}/manifest\.json: unreadable manifest"):
            StoreReader(store)
    manifest.write_text(json.dumps(good))
    assert len(StoreReader(store, verify_checksums=True)) == 6


def test_check_compatible_names_what_differs(tmp_path):
    _write(tmp_path, 10)
    reader = StoreReader(tmp_path)
    ok = dict(dataset_hash="sha256:data", tokenizer_hash="sha256:tok", k=K, max_seq_length=MAX_LEN)
    lengths = {i: _sample(i)[0].shape[0] for i in range(10)}
    reader.check_compatible(**ok, num_completion_tokens_fn=lengths.__getitem__, num_samples=10)
    for key, bad, message in (
        ("dataset_hash", "sha256:other", "dataset hash: store has 'sha256:data', expected 'sha256:other'"),
        ("tokenizer_hash", "sha256:x", "tokenizer hash"),
        ("k", K + 1, f"k: store has {K}, expected {K + 1}"),
        ("max_seq_length", 2 * MAX_LEN, "max_seq_length"),
    ):
        with pytest.raises(StoreMismatchError, match=message.replace("(", r"\(")) as err:
            reader.check_compatible(**dict(ok, **{key: bad}))
        assert len(err.value.differences) == 1
    wrong = dict(lengths)
    wrong[7] += 1
    with pytest.raises(StoreMismatchError, match=f"sample 7: store has {lengths[7]} completion tokens, the dataset gives {lengths[7] + 1}"):
        reader.check_compatible(**ok, num_completion_tokens_fn=wrong.__getitem__)


def test_writer_validation_errors(tmp_path):
    w = StoreWriter(tmp_path, _manifest(4), 0, 1)
    values, ids, lse, seq = _sample(1)
    with pytest.raises(ValueError, match="expected sample 0"):
        w.append(1, values, ids, lse, seq)
    bad = values.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="sample 0: non-finite"):
        w.append(0, bad, ids, lse, seq)
    with pytest.raises(ValueError, match="exceed max_seq_length"):
        w.append(0, np.zeros((MAX_LEN + 1, K)), np.zeros((MAX_LEN + 1, K)), np.zeros(MAX_LEN + 1), 0.0)
    w.append(0, values, ids, lse, seq)
    with pytest.raises(StoreIncompleteError, match="samples 1..3 were not appended"):
        w.finalize()
    w.commit()
    w.close()
    with pytest.raises(StoreIncompleteError, match="no manifest.json"):
        StoreReader(tmp_path)
    # Reopening with other settings must refuse rather than mix or truncate committed data.
    with pytest.raises(StoreMismatchError, match="k: .* has 5, this writer has 6"):
        StoreWriter(tmp_path, _manifest(4, k=6), 0, 1)
    resumed = StoreWriter(tmp_path, _manifest(4), 0, 1)
    assert resumed.next_sample_index == 1 and resumed.resumed_from == 1
    with pytest.raises(ValueError, match="overflow float16"):
        StoreWriter(tmp_path / "h", _manifest(1, "float16"), 0, 1).append(0, np.full((1, K), 1e6), np.zeros((1, K)), np.zeros(1), 0.0)


def _as_newer_writer(path, edit):
    """Apply ``edit(settings)`` to the manifest and every shard record alike: what a newer writer writes."""
    manifest_path = path / "manifest.json"
    m = json.loads(manifest_path.read_text())
    edit(m)
    manifest_path.write_text(json.dumps(m))
    for record_path in path.glob("shard-*[0-9].json"):
        record = json.loads(record_path.read_text())
        edit(record["settings"])
        for ext in record["settings"].get("extensions", {}).values():
            ext.pop("shards", None)
        record_path.write_text(json.dumps(record))


def test_format_versioning(tmp_path):
    _write(tmp_path, 3)

    def newer(m):  # a newer writer's additive keys and extensions are ignored by this reader ...
        m["extensions"]["something_new"] = {"x": 1}
        m["future_key"] = 3
        m["format_version"] = 2

    _as_newer_writer(tmp_path, newer)
    assert StoreReader(tmp_path)[1].num_tokens == _sample(1)[0].shape[0]

    def needs_newer_reader(m):  # ... but a store that needs a newer reader (e.g. cross-tokenizer ids) is refused.
        m["min_reader_version"] = 2
        m["extensions"]["cross_tokenizer_alignment"] = {}

    _as_newer_writer(tmp_path, needs_newer_reader)
    with pytest.raises(StoreError, match="needs reader version >= 2.*cross-tokenizer"):
        StoreReader(tmp_path)


def test_sample_assignment():
    for n in (0, 1, 5, 17, 64):
        for world in (1, 2, 3, 8):
            ranges = [shard_sample_range(n, r, world) for r in range(world)]
            assert [i for rg in ranges for i in rg] == list(range(n))  # contiguous, complete, no overlap
            assert max(map(len, ranges)) - min(map(len, ranges)) <= 1
            for i in range(n):
                assert i in ranges[shard_for_sample(i, n, world)]


# ----------------------------------------------------------------------------- kill and resume

_THIS_FILE = os.path.abspath(__file__)
_REPO = os.path.dirname(os.path.dirname(_THIS_FILE))


def _child_main(argv):
    """Child process: write (or resume) one rank's shard; SIGKILL itself at a chosen point.

    argv: path rank world num_samples commit_every kill_spec. kill_spec is ``none``,
    ``append:N`` (after N appends, leave garbage half-written then die), or
    ``[fin-]fsync:N`` / ``[fin-]replace:N`` / ``[fin-]after_replace:N`` (die before
    the Nth ``os.fsync``/``os.replace``, or right after the Nth replace; ``fin-``
    counts only inside finalize). ``sleep`` in argv[6] slows appends (timer kills).
    """
    path, rank, world, num_samples, commit_every, spec = argv[:6]
    rank, world, num_samples, commit_every = int(rank), int(world), int(num_samples), int(commit_every)
    delay = float(argv[6]) if len(argv) > 6 else 0.0
    state = {"phase": "write", "count": 0}
    kind, _, n = spec.partition(":")
    only_finalize = kind.startswith("fin-")
    kind = kind[4:] if only_finalize else kind

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def tick():
        if only_finalize and state["phase"] != "finalize":
            return False
        state["count"] += 1
        return state["count"] == int(n)

    if kind == "fsync":
        real_fsync = os.fsync

        def fsync(fd):
            if tick():
                die()
            real_fsync(fd)

        os.fsync = fsync
    elif kind in ("replace", "after_replace"):
        real_replace = os.replace

        def replace(src, dst):
            hit = tick()
            if hit and kind == "replace":
                die()
            real_replace(src, dst)
            if hit:
                die()

        os.replace = replace

    w = StoreWriter(path, _manifest(num_samples), rank, world)
    appended = 0
    for i in w.remaining():
        w.append(i, *_sample(i))
        appended += 1
        if kind == "append" and appended == int(n):
            # A torn write: bytes of a never-committed sample hit the files, then death.
            for f in (w._payload, w._index):
                f.write(b"\xde\xad" * 37)
                f.flush()
            die()
        if (i + 1) % commit_every == 0:
            w.commit()
        if delay:
            time.sleep(delay)
    state["phase"] = "finalize"
    w.finalize()


def _run_child(path, rank, world, num_samples, spec, commit_every=4, sleep=None, kill_after=None):
    cmd = [sys.executable, _THIS_FILE, str(path), str(rank), str(world), str(num_samples), str(commit_every), spec]
    if sleep is not None:
        cmd.append(str(sleep))
    env = dict(os.environ, PYTHONPATH=_REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    if kill_after is not None:
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (0, -signal.SIGKILL), err.decode()
    return proc.returncode


def _assert_store_content(path, num_samples):
    reader = StoreReader(path, verify_checksums=True)
    assert len(reader) == num_samples and reader.manifest.num_samples == num_samples
    seen = []
    for shard in reader.manifest.shards:
        idx = np.load(os.path.join(path, shard.index_file))
        seen += idx["sample_index"].tolist()
    assert seen == list(range(num_samples))  # none missing, none duplicated
    for i in range(num_samples):
        values, ids, lse, seq = reader.read_numpy(i)
        ref_v, ref_ids, ref_lse, ref_seq = _sample(i)
        assert np.array_equal(ids, ref_ids) and np.array_equal(lse, ref_lse) and seq == ref_seq
        assert values.shape == ref_v.shape


@pytest.mark.slow
def test_kill_and_resume_single_rank_is_byte_identical(tmp_path):
    n = 30
    ref = tmp_path / "ref"
    _write(ref, n)
    reference = _files(ref)
    assert sorted(reference) == ["manifest.json", "shard-00000.bin", "shard-00000.idx", "shard-00000.json",
                                 "shard-00000.sum"]

    out = tmp_path / "killed"
    specs = [
        "append:3",  # torn write before the first commit
        "fsync:1",  # inside the first commit, payload written but not synced
        "replace:1",  # first commit: everything synced, progress not yet replaced
        "after_replace:1",  # right after a commit point
        "append:6",  # torn write after committed samples
        "fsync:2",
        "replace:2",
        "after_replace:2",
        "fin-fsync:1",
    ]
    # Finalize replaces, in order: its commit's progress file, the .idx, the payload
    # rename, the shard record, the manifest. A restart redoes the unfinished steps, so
    # the ordinal of each step in the next run depends on the state left behind.
    specs += [
        "fin-replace:1", "fin-after_replace:1",  # the final commit
        "fin-replace:1", "fin-after_replace:1",  # .idx written
        "fin-replace:2", "fin-after_replace:2",  # payload renamed (restart renames it back)
        "fin-replace:3", "fin-after_replace:3",  # shard record written
        "fin-replace:1", "fin-after_replace:1",  # manifest written: store complete
    ]
    rcs = [_run_child(out, 0, 1, n, spec) for spec in specs]
    assert rcs == [-signal.SIGKILL] * len(specs), rcs  # every kill point was reached
    assert _run_child(out, 0, 1, n, "none") == 0
    assert _files(out) == reference
    _assert_store_content(out, n)


@pytest.mark.slow
def test_kill_and_resume_two_ranks_random_points(tmp_path):
    n, world = 27, 2
    ref = tmp_path / "ref"
    # Reference: both DP ranks write concurrently into one directory.
    procs = [subprocess.Popen([sys.executable, _THIS_FILE, str(ref), str(r), str(world), str(n), "3", "none"],
                              env=dict(os.environ, PYTHONPATH=_REPO)) for r in range(world)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    reference = _files(ref)
    assert "manifest.json" in reference and "shard-00001.bin" in reference
    _assert_store_content(ref, n)

    out = tmp_path / "killed"
    rng = random.Random(1234)
    kinds = ["append", "fsync", "replace", "after_replace", "fin-replace", "fin-after_replace"]
    for _ in range(5):  # rank 0 killed at random points, then finished
        _run_child(out, 0, world, n, f"{rng.choice(kinds)}:{rng.randint(1, 4)}", commit_every=3)
    assert _run_child(out, 0, world, n, "none", commit_every=3) == 0
    assert not (out / "manifest.json").exists()  # rank 1 has not finished: no manifest yet
    with pytest.raises(StoreIncompleteError, match=r"rank\(s\) \[1\]"):
        finalize_manifest(out)
    for _ in range(3):  # rank 1: killed by the parent at random times
        _run_child(out, 1, world, n, "none", commit_every=3, sleep=0.01, kill_after=rng.uniform(0.2, 0.6))
    for _ in range(3):
        _run_child(out, 1, world, n, f"{rng.choice(kinds)}:{rng.randint(1, 3)}", commit_every=3)
    assert _run_child(out, 1, world, n, "none", commit_every=3) == 0
    assert _files(out) == reference
    _assert_store_content(out, n)




@pytest.mark.parametrize("values_dtype", ["bfloat16", "float16"])
def test_logprob_encoding_keeps_a_confident_teachers_probabilities(tmp_path, values_dtype):
    """16-bit raw logits of 20-30 lose the top token's probability (bf16 step 0.125); stored as z − LSE
    (format 3) the reader's exp(z − LSE) matches the float64 truth to ~1e-4, and the tail 1 − Σp stays
    a probability. The raw-logit encoding of the same data is shown to be off by percents."""
    rng = np.random.default_rng(0)
    n, k = 12, K
    full = rng.normal(size=(n, 1000)) * 2.0
    full[:, 0] += 27.0  # a confident teacher: top-1 probability ~ 0.99+
    full[:, 1:k] += 18.0
    lse = np.log(np.exp(full - full.max(1, keepdims=True)).sum(1)) + full.max(1)
    order = np.argsort(-full, axis=1)[:, :k]
    z = np.take_along_axis(full, order, 1)
    truth = np.exp(z - lse[:, None])  # float64
    errors = {}
    for encoding in ("logits", "logprobs"):
        path = tmp_path / encoding
        version = 3 if encoding == "logprobs" else 1
        m = _manifest(1, values_dtype, max_seq_length=n, values_encoding=encoding, format_version=version,
                      min_reader_version=version)
        w = StoreWriter(path, m, 0, 1)
        w.append(0, z.astype(np.float32), order, lse.astype(np.float32), -1.0)
        w.finalize()
        got = StoreReader(path)[0]
        p = np.exp(got.values.double().numpy() - got.lse.double().numpy()[:, None])
        errors[encoding] = np.abs(p - truth).max()
        if encoding == "logprobs":
            assert (p.sum(1) <= 1 + 1e-3).all()  # the tail 1 − Σp is a probability up to ~1e-4 rounding
    assert errors["logprobs"] < 5e-4 and errors["logits"] > 20 * errors["logprobs"], errors
    with pytest.raises(ValueError, match="format_version >= 3"):
        StoreManifest(k=K, max_seq_length=8, num_samples=1, values_encoding="logprobs").validate()


def test_a_second_writer_is_refused_naming_the_first_which_completes_a_byte_identical_store(tmp_path, caplog):
    """Two runs into one store directory: the second is refused (holder's pid and host named) before it touches a
    file; the first ends with the same bytes as a run alone. A writer killed holding the lock is taken over."""
    from nemo_kd.output_lock import OutputLockedError

    n = 24
    ref = tmp_path / "ref"
    _write(ref, n)
    store = tmp_path / "store"
    cmd = [sys.executable, _THIS_FILE, str(store), "0", "1", str(n), "4", "none", "0.05"]  # ~1.2 s of appends
    env = dict(os.environ, PYTHONPATH=_REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    first = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    lock_file = store / ".shard-00000.writer.lock"
    deadline = time.monotonic() + 60
    while not (lock_file.exists() and lock_file.stat().st_size) and time.monotonic() < deadline:
        time.sleep(0.02)
    before = _files(store)
    with pytest.raises(OutputLockedError, match=rf"{store}: this teacher logits store \(the shard of rank 0\) is being "
                                                rf"written by another process \(host .*, pid {first.pid}"):
        StoreWriter(store, _manifest(n), 0, 1)
    with pytest.raises(OutputLockedError, match=f"pid {first.pid}"):  # other data, same directory: refused alike
        StoreWriter(store, _manifest(n + 5, k=K + 1), 0, 1)
    assert set(_files(store)) >= set(before) - {".shard-00000.writer.lock"}  # the refused writers removed nothing
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err.decode()
    assert _files(store) == _files(ref)  # byte-identical, no lock file, no stray progress file

    # killed while holding the lock: the next writer takes over (logging whose it was) and completes the store
    killed = tmp_path / "killed"
    assert _run_child(killed, 0, 1, n, "append:7") == -signal.SIGKILL
    record = json.loads((killed / ".shard-00000.writer.lock").read_text())
    with caplog.at_level("WARNING", logger="nemo_kd.output_lock"):
        w = StoreWriter(killed, _manifest(n), 0, 1)
    assert w._lock.took_over["pid"] == record["pid"] and f"pid {record['pid']}" in caplog.text
    for i in w.remaining():
        w.append(i, *_sample(i))
    w.finalize()
    assert _files(killed) == _files(ref)


if __name__ == "__main__":
    _child_main(sys.argv[1:])
