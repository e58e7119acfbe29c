"""Logits store format version 2 (cross-tokenizer): extraction, round trip, refusal, resume, v1 compatibility.

A tiny Megatron teacher with a byte-level BPE + ChatML tokenizer (Qwen style) and a
SentencePiece unigram + Llama-2 ``[INST]`` student tokenizer (Llama-2 / Mistral style),
both trained on the fly. The teacher is extracted twice over the same data: the
same-tokenizer path (format 1) and ``align_teacher_template: true`` (format 2).
"""

import json
import os

import numpy as np
import pytest
import torch

from dist_utils import WorldOfOne

K, MAX_LEN = 6, 96

CORPUS = [
    "What is 12 plus 30? The answer is 42. Then the answer is the number.",
    "Reverse the word cat: tac. Unicode: café, naïve, 日本語, emoji 🙂.",
    "def f(x):\n    return x * 2\n\nclass A:\n    pass\n",
    "The quick brown fox jumps over the lazy dog.  Two  spaces, tabs\tand newlines\n\nhere.",
] * 30

RESPONSES = [
    "The answer is 42.",
    "emoji 🙂🚀 and café",
    "def f(x):\n    return x * 2",
    "  leading spaces, digits 3.14159",
    "日本語 text\n\nnew lines",
    " ".join(f"word{j}" for j in range(60)),  # over-long: truncated on both sides
]


def write_data(path, n=len(RESPONSES)):
    with open(path, "w") as f:
        for i in range(n):
            msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"question {i}?"},
                    {"role": "assistant", "content": RESPONSES[i % len(RESPONSES)]}]
            f.write(json.dumps({"id": i, "messages": msgs}) + "\n")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from transformers import AutoTokenizer

    from nemo_kd.data.sentencepiece_builder import train_sentencepiece_unigram
    from nemo_kd.data.tokenizer_builder import train_byte_level_bpe
    from nemo_kd.models import GPTModelConfig, build_gpt_model
    from nemo_kd.teacher.extract import ExtractConfig, compute_topk_logits
    from nemo_kd.teacher.teachers import MegatronTeacher, save_full_checkpoint

    d = tmp_path_factory.mktemp("xstore")
    train_byte_level_bpe(CORPUS, vocab_size=400, template="chatml", save_dir=str(d / "t_tok"))
    train_sentencepiece_unigram(CORPUS, vocab_size=400, save_dir=str(d / "s_tok"))
    t_tok, s_tok = AutoTokenizer.from_pretrained(str(d / "t_tok")), AutoTokenizer.from_pretrained(str(d / "s_tok"))
    data = str(d / "data.jsonl")
    write_data(data)
    cfg = GPTModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                         vocab_size=len(t_tok), max_position_embeddings=128)
    out = {}
    with WorldOfOne():
        full = {k: v for k, v in build_gpt_model(cfg).state_dict().items() if torch.is_tensor(v)}
        full["output_layer.weight"] = full["output_layer.weight"] * 30
        save_full_checkpoint(str(d / "teacher"), full, cfg)
        teacher = MegatronTeacher(str(d / "teacher"))
        base = dict(data_path=data, top_k=K, max_seq_length=MAX_LEN, values_dtype="float32", batch_size=4,
                    progress=False)
        out["v1"] = compute_topk_logits(ExtractConfig(output_path=str(d / "v1"), **base), teacher, t_tok)
        out["v2"] = compute_topk_logits(ExtractConfig(output_path=str(d / "v2"), align_teacher_template=True, **base),
                                        teacher, t_tok, student_tokenizer=s_tok)
        # independent reference: the teacher's log-softmax at its own tokens, one sample at a time
        from nemo_kd.data import read_records
        from nemo_kd.data.tokenization import ConversationTokenizer

        ref_lp = []
        for rec in read_records(data):
            smp = ConversationTokenizer(t_tok, "chat", MAX_LEN)(list(rec.messages))
            got = {}
            teacher.run(torch.tensor([smp.input_ids]), lambda first, logits, group: got.setdefault("z", logits))
            lp = torch.log_softmax(got["z"][0, :, :len(t_tok)].double(), -1)
            pos = torch.arange(smp.num_prompt_tokens - 1, len(smp.input_ids) - 1)
            ref_lp.append(lp[pos, torch.tensor(smp.input_ids)[pos + 1]].numpy())
    return dict(dir=d, t_tok=t_tok, s_tok=s_tok, data=data, v1=str(d / "v1"), v2=str(d / "v2"), summaries=out,
                ref_lp=ref_lp)


def _cts(assets, student_len=MAX_LEN):
    from nemo_kd.data.tokenization import ConversationTokenizer

    return (ConversationTokenizer(assets["s_tok"], "chat", student_len),
            ConversationTokenizer(assets["t_tok"], "chat", MAX_LEN))


def test_v2_round_trip_matches_independent_alignment_and_teacher_rendering(assets):
    from nemo_kd.align import align_conversation, build_vocab_map
    from nemo_kd.data import read_records
    from nemo_kd.teacher.store import StoreReader

    records = read_records(assets["data"])
    s_ct, t_ct = _cts(assets)
    v1, v2 = StoreReader(assets["v1"]), StoreReader(assets["v2"], verify_checksums=True)
    m = v2.manifest
    assert (m.format_version, m.min_reader_version) == (2, 2) and v2.cross_tokenizer and not v1.cross_tokenizer
    info = v2.alignment_info
    assert info["student_tokenizer_hash"] == s_ct.hash and info["teacher_tokenizer_hash"] == t_ct.hash == m.tokenizer_hash
    from nemo_kd.align import ALIGNMENT_VERSION

    assert info["alignment_version"] == ALIGNMENT_VERSION == 2 and info["student_max_seq_length"] == MAX_LEN
    vm = v2.vocab_map()
    ref_vm = build_vocab_map(assets["s_tok"], assets["t_tok"], teacher_vocab_size=m.teacher_vocab_size)
    assert np.array_equal(vm.teacher_to_student, ref_vm.teacher_to_student) and vm.is_identity is False
    summary = assets["summaries"]["v2"]
    assert 0 < summary.one_to_one_fraction < 1
    truncated = 0
    for i, rec in enumerate(records):
        s, t, g = align_conversation(list(rec.messages), s_ct, t_ct)
        truncated += s.truncated or t.truncated
        al = v2.alignment(i)
        assert np.array_equal(al.groups().array, g.array) and al.num_student_tokens == g.num_student_tokens
        # the teacher rows are the teacher's own chat-template rendering, tokenised by its tokenizer
        ids = assets["t_tok"].apply_chat_template(list(rec.messages), tokenize=True)
        ids = list(ids["input_ids"] if not isinstance(ids, list) else ids)
        assert t.input_ids == ids[:len(t.input_ids)]
        assert al.teacher_ids.tolist() == t.input_ids[t.num_prompt_tokens:]
        # the top-k payload is exactly the same-tokenizer extraction's (same teacher input)
        for a, b in zip(v1.read_numpy(i), v2.read_numpy(i)):
            assert np.array_equal(a, b)
        values, topk_ids, lse, seq_lp = v2.read_numpy(i)
        assert abs(float(al.teacher_logprobs.astype(np.float64).sum()) - seq_lp) < 1e-3
        np.testing.assert_allclose(al.teacher_logprobs, assets["ref_lp"][i], atol=1e-4)
        sample = v2[i]
        assert sample.alignment is not None and sample.num_tokens == al.num_teacher_tokens
    assert truncated >= 1


def test_same_tokenizer_path_is_format_1_without_alignment_files(assets):
    from nemo_kd.teacher.store import StoreReader

    files = sorted(os.listdir(assets["v1"]))
    assert files == ["manifest.json", "shard-00000.bin", "shard-00000.idx", "shard-00000.json",
                     "shard-00000.log_tail.f4", "shard-00000.log_tail.xxh3.npy", "shard-00000.sum"]
    m = json.loads(open(os.path.join(assets["v1"], "manifest.json")).read())
    # only the per-sample checksums and the teacher's log tail mass, extensions every v1 reader ignores
    assert (m["format_version"], m["min_reader_version"], sorted(m["extensions"])) == \
        (1, 1, ["sample_checksums", "teacher_log_tail"])
    assert m["extensions"]["sample_checksums"]["fields"] == ["payload", "ids", "lse", "values"]
    shard = json.loads(open(os.path.join(assets["v1"], "shard-00000.json")).read())
    assert set(shard) == {"rank", "settings", "shard", "checksum_shard", "log_tail_shard"}
    assert StoreReader(assets["v1"])[0].alignment is None
    # a cross-tokenizer store keeps no log tail (its loss reads the teacher's own tokens)
    assert sorted(os.listdir(assets["v2"])) == files[:1] + ["shard-00000.align.bin", "shard-00000.align.idx",
                                                            "shard-00000.bin", "shard-00000.idx",
                                                            "shard-00000.json", "shard-00000.sum", "vocab_map.npy"]
    m2 = json.loads(open(os.path.join(assets["v2"], "manifest.json")).read())
    assert m2["extensions"]["sample_checksums"]["fields"] == ["payload", "ids", "lse", "values", "alignment",
                                                              "alignment_groups",
                                                              "teacher_ids", "teacher_logprobs"]


def test_reader_refuses_mismatched_student_tokenizer_dataset_or_length(assets, tmp_path):
    from nemo_kd.data import read_records
    from nemo_kd.data.kd_dataset import DistillationDataset
    from nemo_kd.data.tokenization import ConversationTokenizer
    from nemo_kd.teacher.store import StoreMismatchError, StoreReader

    records = read_records(assets["data"])
    s_ct, t_ct = _cts(assets)
    v2 = StoreReader(assets["v2"])
    ds = DistillationDataset(records, s_ct, store=v2, k=K)  # the matching student: accepted
    assert ds.cross_tokenizer and ds[0].xtok is not None
    # the teacher's tokenizer as the student: refused, naming the store and the field
    with pytest.raises(StoreMismatchError, match=r"(?s)store .*v2 does not match.*student tokenizer hash"):
        DistillationDataset(records, t_ct, store=v2, k=K)
    with pytest.raises(StoreMismatchError, match="student max_seq_length: store has 96, expected 64"):
        DistillationDataset(records, ConversationTokenizer(assets["s_tok"], "chat", 64), store=v2, k=K)
    with pytest.raises(StoreMismatchError, match="k: store has 6, expected 4"):
        DistillationDataset(records, s_ct, store=v2, k=4)
    other = tmp_path / "other.jsonl"
    write_data(other, n=len(RESPONSES) - 1)
    with pytest.raises(StoreMismatchError, match="dataset hash"):
        DistillationDataset(read_records(str(other)), s_ct, store=v2, k=K)
    # a same-tokenizer (v1) store asked for a student alignment
    with pytest.raises(StoreMismatchError, match="cross-tokenizer alignment: the store has none"):
        StoreReader(assets["v1"]).check_compatible(student_tokenizer_hash=s_ct.hash)
    # per-sample student token counts are checked too
    with pytest.raises(StoreMismatchError, match="sample 0: store has .* student completion tokens"):
        v2.check_compatible(num_completion_tokens_fn=lambda i: 10_000)


def test_older_alignment_version_trains_with_a_warning_and_a_newer_one_is_refused(assets, tmp_path, monkeypatch,
                                                                                  caplog):
    """Groups an older alignment version computed are not corrupt: read as they were computed, with
    a warning naming the store and what they lack; a version newer than this reader is refused, and
    a sample whose packed header disagrees with the manifest's version is corrupt."""
    import logging
    import shutil

    import nemo_kd.align.groups as groups
    from nemo_kd.data import read_records
    from nemo_kd.data.kd_dataset import DistillationDataset
    from nemo_kd.teacher.extract import ExtractConfig, compute_topk_logits
    from nemo_kd.teacher.store import StoreCorruptError, StoreReader
    from nemo_kd.teacher.teachers import MegatronTeacher

    with WorldOfOne():
        teacher = MegatronTeacher(str(assets["dir"] / "teacher"))
        monkeypatch.setattr(groups, "ALIGNMENT_VERSION", 1)
        compute_topk_logits(ExtractConfig(output_path=str(tmp_path / "old"), align_teacher_template=True,
                                          data_path=assets["data"], top_k=K, max_seq_length=MAX_LEN,
                                          values_dtype="float32", batch_size=4, progress=False),
                            teacher, assets["t_tok"], student_tokenizer=assets["s_tok"])
        monkeypatch.undo()
    old, current = StoreReader(str(tmp_path / "old"), verify_checksums=True), StoreReader(assets["v2"])
    assert old.alignment_info["alignment_version"] == 1 and groups.ALIGNMENT_VERSION == 2
    assert all(int(old.alignment(i).packed[0, 4]) == 1 for i in range(old.manifest.num_samples))
    records, (s_ct, _) = read_records(assets["data"]), _cts(assets)
    with caplog.at_level(logging.WARNING, logger="nemo_kd.data.kd_dataset"):
        ds_current = DistillationDataset(records, s_ct, store=current, k=K)
        assert "alignment version" not in caplog.text
        ds = DistillationDataset(records, s_ct, store=old, k=K)
    assert f"{old.path}: cross-tokenizer alignment version 1 (this version is 2)" in caplog.text
    assert "one-symbol answer" in caplog.text and "Re-extract" in caplog.text
    # the old groups are read as they were computed (here the same as version 2's: nothing on this data
    # exercises what changed)
    for i in range(old.manifest.num_samples):
        assert np.array_equal(old.alignment(i).groups().array, current.alignment(i).groups().array)
    assert len(ds) == len(ds_current) == len(records)

    newer = tmp_path / "newer"
    shutil.copytree(assets["v2"], newer)
    for f in [newer / "manifest.json", *newer.glob("shard-*.json")]:  # a consistent edit: manifest and records
        text = f.read_text()
        assert text.count('"alignment_version": 2') == 1, f
        f.write_text(text.replace('"alignment_version": 2', '"alignment_version": 3'))
    with pytest.raises(ValueError, match=rf"{newer}: alignment version 3 is not supported \(this reader: 1 to 2\)"):
        DistillationDataset(records, s_ct, store=StoreReader(str(newer)), k=K)
    with pytest.raises(StoreCorruptError, match=r"sample 0: alignment version 2 in .*, the manifest says 3"):
        StoreReader(str(newer)).alignment(0)


def test_old_reader_refuses_v2_and_corruption_is_detected(assets, tmp_path, monkeypatch):
    import shutil

    from nemo_kd.teacher import store as store_mod
    from nemo_kd.teacher.store import StoreCorruptError, StoreError, StoreReader

    monkeypatch.setattr(store_mod, "READER_VERSION", 1)  # a v1 reader
    with pytest.raises(StoreError, match="needs reader version >= 2.*cross-tokenizer"):
        StoreReader(assets["v2"])
    assert len(StoreReader(assets["v1"])) == len(RESPONSES)  # v1 stores: still readable
    monkeypatch.undo()
    bad = tmp_path / "bad"
    shutil.copytree(assets["v2"], bad)
    with open(bad / "shard-00000.align.bin", "r+b") as f:
        f.seek(30)
        b = f.read(1)
        f.seek(30)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(StoreCorruptError, match="align.bin: checksum"):
        StoreReader(str(bad), verify_checksums=True)
    np.save(bad / "vocab_map.npy", np.zeros(3, dtype=np.int32))
    with pytest.raises(StoreCorruptError, match="vocab_map.npy: checksum"):
        StoreReader(str(bad)).vocab_map()


def _synthetic_alignment(rng, n_s, n_t):
    from nemo_kd.align import AlignmentGroups
    from nemo_kd.teacher.store import StoredAlignment

    g = min(n_s, n_t)
    arr = np.array([[i, i + 1, i, i + 1, i, i + 1] for i in range(g)], dtype=np.int32).reshape(-1, 6)
    return StoredAlignment.from_groups(AlignmentGroups(arr, n_s, n_t, g), rng.integers(0, 50, n_t),
                                       -rng.random(n_t).astype(np.float32))


def _v2_manifest(n):
    from nemo_kd.align.vocab_map import VocabMap
    from nemo_kd.teacher.store import ALIGNMENT_EXTENSION, StoreManifest, cross_tokenizer_extension

    vm = VocabMap(np.arange(50) % 40 - 1, 40, 50, 40, 50)
    ext, data = cross_tokenizer_extension(vm, "student", "teacher", 32)
    return StoreManifest(k=3, values_dtype="float32", max_seq_length=32, num_samples=n, teacher_vocab_size=50,
                         format_version=2, min_reader_version=2, extensions={ALIGNMENT_EXTENSION: ext}), data


def _write_samples(w, rng_seed, indices):
    rng = np.random.default_rng(rng_seed)
    for i in indices:
        r = np.random.default_rng(1000 + i)
        n = int(r.integers(0, 6))
        w.append(i, r.standard_normal((n, 3)), r.integers(0, 50, (n, 3)), r.standard_normal(n), -1.0 * n,
                 alignment=_synthetic_alignment(r, n + 1, n))


def test_v2_writer_resumes_byte_identically(tmp_path):
    from nemo_kd.teacher.store import StoreMismatchError, StoreReader, StoreWriter

    manifest, vm_bytes = _v2_manifest(9)
    for rank in range(2):  # uninterrupted, 2 DP ranks
        w = StoreWriter(tmp_path / "a", manifest, rank, 2)
        w.write_vocab_map(vm_bytes)
        _write_samples(w, 0, w.remaining())
        w.finalize()
    # interrupted: rank 0 commits 2 samples, appends 1 more uncommitted, "dies"; rank 1 finishes first
    w = StoreWriter(tmp_path / "b", manifest, 0, 2)
    w.write_vocab_map(vm_bytes)
    _write_samples(w, 0, range(0, 2))
    w.commit()
    _write_samples(w, 0, range(2, 3))
    w.close()
    w1 = StoreWriter(tmp_path / "b", manifest, 1, 2)
    w1.write_vocab_map(vm_bytes)
    _write_samples(w1, 0, w1.remaining())
    w1.finalize()
    w = StoreWriter(tmp_path / "b", manifest, 0, 2)
    assert w.next_sample_index == 2
    _write_samples(w, 0, w.remaining())
    w.finalize()
    for name in sorted(os.listdir(tmp_path / "a")):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    r = StoreReader(tmp_path / "b", verify_checksums=True)
    for i in range(9):
        al = r.alignment(i)
        ref = _synthetic_alignment(np.random.default_rng(1000 + i), 0, 0)  # shapes only
        assert al.num_teacher_tokens == r.num_tokens(i) and al.num_student_tokens == r.num_tokens(i) + 1
        assert ref.packed.shape[1] == 6
    assert r.vocab_map(student_vocab_size=64).student_vocab_size == 64
    # another alignment setting (e.g. another student tokenizer) against the partial store: refused
    other, _ = _v2_manifest(9)
    other.extensions["cross_tokenizer_alignment"]["student_tokenizer_hash"] = "another"
    with pytest.raises(StoreMismatchError, match="extensions"):
        StoreWriter(tmp_path / "b", other, 0, 2)


def test_writer_requires_alignment_exactly_for_v2(tmp_path):
    from nemo_kd.teacher.store import StoreManifest, StoreWriter

    manifest, _ = _v2_manifest(2)
    w = StoreWriter(tmp_path / "x", manifest, 0, 1)
    with pytest.raises(ValueError, match="sample 0: a cross-tokenizer store needs the sample's alignment"):
        w.append(0, np.zeros((1, 3)), np.zeros((1, 3)), np.zeros(1), 0.0)
    with pytest.raises(ValueError, match="sample 0: the alignment counts 2 teacher completion tokens"):
        w.append(0, np.zeros((1, 3)), np.zeros((1, 3)), np.zeros(1), 0.0,
                 alignment=_synthetic_alignment(np.random.default_rng(0), 2, 2))
    v1 = StoreWriter(tmp_path / "y", StoreManifest(k=3, max_seq_length=8, num_samples=1), 0, 1)
    with pytest.raises(ValueError, match="alignment given to a same-tokenizer"):
        v1.append(0, np.zeros((1, 3)), np.zeros((1, 3)), np.zeros(1), 0.0,
                  alignment=_synthetic_alignment(np.random.default_rng(0), 1, 1))
    with pytest.raises(ValueError, match="format_version 2 without"):
        StoreManifest(k=3, max_seq_length=8, num_samples=1, format_version=2).validate()
