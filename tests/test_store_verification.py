"""Verified reads of the teacher logits store: a flipped byte in any stored field, an edited manifest or a store
that lost a file is refused with the store, shard, sample and field named; never decoded into garbage.

Each fault is injected into a real store written by :class:`StoreWriter` (same-tokenizer and cross-tokenizer),
and the reader's answer is compared with what the fault must produce: the field's name, the sample index, the
file. The clean store's values are checked against the written arrays (independent reference: the writer's
input, rounded to bf16 by torch), so a verification that accepted everything or refused everything fails too.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from nemo_kd.align import ALIGNMENT_VERSION
from nemo_kd.teacher.store import (
    ALIGNMENT_EXTENSION,
    SAMPLE_CHECKSUMS_EXTENSION,
    StoreCorruptError,
    StoredAlignment,
    StoreManifest,
    StoreReader,
    StoreWriter,
)

K, MAX_LEN, N = 8, 24, 9


def _sample(i):
    n = 3 + (i * 5) % 11
    rng = np.random.default_rng(i)
    values = -np.sort(-rng.normal(size=(n, K)).astype(np.float32) * 3, axis=1)
    ids = rng.integers(0, 1000, size=(n, K))
    lse = values[:, 0] + 1.0 + rng.random(n).astype(np.float32)
    return values, ids, lse, -0.5 * i


def _alignment(i, n_teacher):
    """A valid alignment: groups pairing teacher token t with student token t (n_student = n_teacher)."""
    g = np.array([[t, t + 1, t, t + 1, t, t + 1] for t in range(n_teacher)], dtype=np.int32).reshape(-1, 6)
    packed = np.concatenate([np.array([[n_teacher, n_teacher, n_teacher, n_teacher, ALIGNMENT_VERSION, 0]], np.int32),
                             g])
    rng = np.random.default_rng(100 + i)
    return StoredAlignment.from_groups(packed, rng.integers(0, 1000, n_teacher), -rng.random(n_teacher))


def _write(path, cross_tokenizer=False, values_dtype="bfloat16", world=1):
    m = StoreManifest(k=K, values_dtype=values_dtype, dataset_hash="sha256:d", tokenizer_hash="sha256:t",
                      max_seq_length=MAX_LEN, num_samples=N, teacher_vocab_size=1000)
    if values_dtype != "float32":
        m.values_encoding, m.format_version, m.min_reader_version = "logprobs", 3, 3
    vocab_map = None
    if cross_tokenizer:
        from nemo_kd.align.vocab_map import VocabMap
        from nemo_kd.teacher.store import cross_tokenizer_extension

        vocab_map = VocabMap(np.arange(1000), 1000, 1000, 1000, 1000, is_identity=True)
        ext, vocab_map = cross_tokenizer_extension(vocab_map, "sha256:s", "sha256:t", MAX_LEN)
        m.extensions = {ALIGNMENT_EXTENSION: ext}
        m.format_version = m.min_reader_version = max(2, m.format_version)
    for rank in range(world):
        w = StoreWriter(path, m, rank, world)
        if vocab_map is not None:
            w.write_vocab_map(vocab_map)
        for i in w.remaining():
            v, ids, lse, seq = _sample(i)
            w.append(i, v, ids, lse, seq, _alignment(i, len(v)) if cross_tokenizer else None)
        w.finalize()
    return json.loads((path / "manifest.json").read_text())


def _flip(file, offset):
    data = bytearray(file.read_bytes())
    data[offset] ^= 0x10
    file.write_bytes(bytes(data))


def test_clean_store_reads_back_what_was_written(tmp_path):
    _write(tmp_path)
    reader = StoreReader(tmp_path)
    assert reader.has_sample_checksums
    for i in range(N):
        values, ids, lse, seq = _sample(i)
        t = reader[i]
        # bf16 log-probs + fp32 LSE: the reference is torch's bf16 rounding of z - LSE, plus LSE
        ref = (torch.from_numpy(values - lse[:, None]).bfloat16().float() + torch.from_numpy(lse)[:, None])
        torch.testing.assert_close(t.values, ref, rtol=0, atol=0)
        assert torch.equal(t.ids, torch.from_numpy(ids)) and t.seq_logprob == seq


@pytest.mark.parametrize("field", ["ids", "lse", "values"])
def test_a_flipped_byte_in_each_payload_field_is_refused_naming_sample_and_field(tmp_path, field):
    manifest = _write(tmp_path)
    reader = StoreReader(tmp_path)
    sample = 4
    shard = manifest["shards"][0]
    offset, n = int(reader._indices[0][sample]["offset"]), reader.num_tokens(sample)
    start = {"ids": offset, "lse": offset + 4 * n * K, "values": offset + 4 * n * K + 4 * n}[field]
    reader.close()
    _flip(tmp_path / shard["payload_file"], start + 5)
    reader = StoreReader(tmp_path)  # the payload is not hashed at open: it is checked where it is read
    for i in range(N):
        if i != sample:
            reader[i]  # every other sample still reads
    with pytest.raises(StoreCorruptError, match=rf"sample {sample} \(shard-00000\.bin, bytes \d+\.\.\d+\): its {field} "
                                                "fail their xxh3_64 checksum"):
        reader[sample]
    with pytest.raises(StoreCorruptError, match="checksum"):
        StoreReader(tmp_path, verify_checksums=True)  # and the whole-file check finds it at open


@pytest.mark.parametrize("field", ["alignment groups", "teacher_ids", "teacher_logprobs"])
def test_a_flipped_byte_in_each_alignment_field_is_refused(tmp_path, field):
    manifest = _write(tmp_path, cross_tokenizer=True)
    reader = StoreReader(tmp_path)
    sample = 2
    row = reader._align_indices[0][sample]
    g, n = int(row["num_groups"]), int(row["num_teacher_tokens"])
    start = int(row["offset"]) + {"alignment groups": 24 + 4, "teacher_ids": 24 * (g + 1),
                                  "teacher_logprobs": 24 * (g + 1) + 4 * n}[field]
    reader.close()
    _flip(tmp_path / manifest["extensions"][ALIGNMENT_EXTENSION]["shards"][0]["payload_file"], start + 1)
    reader = StoreReader(tmp_path)
    reader[sample - 1]
    with pytest.raises(StoreCorruptError, match=rf"sample {sample} \(shard-00000\.align\.bin.*its {field} fail"):
        reader[sample]


@pytest.mark.parametrize("name", ["shard-00000.idx", "shard-00000.sum", "shard-00000.align.idx"])
def test_a_flipped_byte_in_an_index_or_checksum_file_is_refused_at_open(tmp_path, name):
    _write(tmp_path, cross_tokenizer=True)
    file = tmp_path / name
    _flip(file, os.path.getsize(file) - 3)
    with pytest.raises(StoreCorruptError, match=rf"{name}: checksum differs from the manifest's"):
        StoreReader(tmp_path)


def _edit_manifest(path, edit):
    m = json.loads((path / "manifest.json").read_text())
    edit(m)
    (path / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("edit, named", [
    (lambda m: m.update(k=4), "k: manifest 4, record 8"),
    (lambda m: m.update(k=16), "k: manifest 16, record 8"),
    (lambda m: m.update(values_dtype="float16"), "values_dtype: manifest 'float16', record 'bfloat16'"),
    (lambda m: m.update(values_encoding="logits"), "values_encoding: manifest 'logits', record 'logprobs'"),
    (lambda m: m["shards"][0].update(payload_sha256="sha256:" + "0" * 64), r"shards\[0\]\.payload_sha256: manifest"),
    (lambda m: m["shards"][0].update(num_tokens=m["shards"][0]["num_tokens"] - 1), r"shards\[0\]\.num_tokens"),
    (lambda m: m["extensions"].pop(SAMPLE_CHECKSUMS_EXTENSION), "extensions.sample_checksums: manifest None"),
])
def test_an_edited_manifest_is_refused_naming_the_field(tmp_path, edit, named):
    _write(tmp_path)
    _edit_manifest(tmp_path, edit)
    with pytest.raises(StoreCorruptError, match=rf"(?s)disagrees with the shard record .*shard-00000\.json.*{named}"):
        StoreReader(tmp_path)


def _edit_everywhere(path, edit):
    """Edit the manifest and the shard records alike: the cross-check cannot see it, the sizes and checksums must."""
    _edit_manifest(path, edit)
    for record in path.glob("shard-[0-9][0-9][0-9][0-9][0-9].json"):
        r = json.loads(record.read_text())
        edit(r["settings"])
        record.write_text(json.dumps(r))


def test_decoding_settings_edited_in_manifest_and_records_are_still_refused(tmp_path):
    _write(tmp_path)
    _edit_everywhere(tmp_path, lambda m: m.update(k=4))
    with pytest.raises(StoreCorruptError, match=r"take \d+ bytes at k=4, values_dtype=bfloat16 .* the manifest's k / "
                                                "values_dtype do not describe this payload"):
        StoreReader(tmp_path)
    shutil.rmtree(tmp_path)
    _write(tmp_path)
    _edit_everywhere(tmp_path, lambda m: m.update(values_dtype="float16"))  # same size: only the checksums see it
    reader = StoreReader(tmp_path)
    with pytest.raises(StoreCorruptError, match="sample 0 .*its ids fail their xxh3_64 checksum"):
        reader[0]


def test_a_missing_shard_record_or_file_is_refused(tmp_path):
    _write(tmp_path, world=2)
    os.remove(tmp_path / "shard-00001.json")
    with pytest.raises(StoreCorruptError, match=r"shard-00001\.json: missing"):
        StoreReader(tmp_path)
    shutil.rmtree(tmp_path)
    _write(tmp_path, world=2)
    os.remove(tmp_path / "shard-00001.sum")
    with pytest.raises(StoreCorruptError, match=r"shard-00001\.sum: None bytes"):
        StoreReader(tmp_path)


def _as_old_store(path):
    """What a writer before per-sample checksums wrote: no extension, no .sum files."""
    def drop(m):
        m["extensions"].pop(SAMPLE_CHECKSUMS_EXTENSION, None)

    _edit_manifest(path, drop)
    for record in path.glob("shard-[0-9][0-9][0-9][0-9][0-9].json"):
        r = json.loads(record.read_text())
        drop(r["settings"])
        r.pop("checksum_shard")
        record.write_text(json.dumps(r))
    for f in path.glob("*.sum"):
        os.remove(f)


def test_an_old_store_without_sample_checksums_is_read_after_a_whole_file_check(tmp_path, caplog):
    _write(tmp_path)
    _as_old_store(tmp_path)
    reader = StoreReader(tmp_path)
    assert not reader.has_sample_checksums and "written before per-sample checksums" in caplog.text
    torch.testing.assert_close(reader[3].ids, torch.from_numpy(_sample(3)[1]))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    _flip(tmp_path / manifest["shards"][0]["payload_file"], 40)
    with pytest.raises(StoreCorruptError, match=r"shard-00000\.bin: checksum sha256:.* != manifest"):
        StoreReader(tmp_path)  # verified whole at open, since nothing else can catch it


def test_verify_store_console_script(tmp_path):
    good, bad = tmp_path / "good", tmp_path / "bad"
    _write(good, cross_tokenizer=True)
    _write(bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    _flip(bad / manifest["shards"][0]["payload_file"], 100)
    cmd = [sys.executable, "-m", "nemo_kd.teacher.verify_store", "--no-progress"]
    ok = subprocess.run(cmd + [str(good)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert f"OK {good}: {N} samples" in ok.stdout and "every sample's fields" in ok.stdout
    ko = subprocess.run(cmd + [str(good), str(bad)], capture_output=True, text=True)
    assert ko.returncode == 1 and f"CORRUPT {bad}: {bad}/shard-00000.bin: checksum" in ko.stderr
    assert f"OK {good}" in ko.stdout
