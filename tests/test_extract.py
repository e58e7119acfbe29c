"""compute_topk_logits: TP/PP equivalence, HF teacher vs hand computation, kill-and-resume,
mismatch / malformed-input / NaN errors, and the store -> topk_kd_loss round trip.

One tiny Megatron teacher (2 layers, hidden 32, GQA, vocab 300 padded to 384/512) and a
byte-level BPE trained on the fly; the output layer is scaled up so the logits are peaked
(no near-ties in the top-k that fp32 noise between layouts could reorder).
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from dist_utils import WorldOfOne, run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K, MAX_LEN, BATCH = 8, 48, 4
N_SAMPLES = 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _texts():
    return [f"question {i}: what is {i} plus {i * 3}? answer: {i + i * 3}, because adding numbers works." for i in range(40)]


def _write_data(path):
    with open(path, "w") as f:
        for i in range(N_SAMPLES):
            response = f"{i + i * 3} because adding" + " numbers" * (i % 4)
            if i == 7:
                response = " ".join(f"plus {j}" for j in range(40))  # over-long: truncated
            f.write(json.dumps({"id": i, "prompt": f"what is {i} plus {i * 3}?", "response": response}) + "\n")


def _extract_cfg(out, data, **kw):
    from nemo_kd.teacher.extract import ExtractConfig

    base = dict(data_path=data, output_path=out, top_k=K, max_seq_length=MAX_LEN, values_dtype="float32",
                batch_size=BATCH, progress=False)
    base.update(kw)
    return ExtractConfig(**base)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from nemo_kd.data.tokenizer_builder import train_byte_level_bpe
    from nemo_kd.models import GPTModelConfig, build_gpt_model
    from nemo_kd.teacher.extract import compute_topk_logits
    from nemo_kd.teacher.teachers import MegatronTeacher, save_full_checkpoint

    d = tmp_path_factory.mktemp("extract")
    tok = train_byte_level_bpe(_texts(), vocab_size=300, save_dir=str(d / "tok"))
    data = str(d / "data.jsonl")
    _write_data(data)
    cfg = GPTModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                         vocab_size=len(tok), max_position_embeddings=64)
    with WorldOfOne(seed=5):
        full = {k: v for k, v in build_gpt_model(cfg).state_dict().items() if torch.is_tensor(v)}
        full["output_layer.weight"] = full["output_layer.weight"] * 40
        save_full_checkpoint(str(d / "teacher"), full, cfg)
        teacher = MegatronTeacher(str(d / "teacher"))
        summary = compute_topk_logits(_extract_cfg(str(d / "store_tp1"), data), teacher, tok)
    return dict(dir=d, tok=tok, data=data, cfg=cfg, full=full, teacher_path=str(d / "teacher"),
                store=str(d / "store_tp1"), summary=summary)


def _store_arrays(path):
    from nemo_kd.teacher.store import StoreReader

    with StoreReader(path, verify_checksums=True) as r:
        return r.manifest, [r.read_numpy(i) for i in range(len(r))]


def _sample_tokens(assets, i):
    from nemo_kd.data import read_records
    from nemo_kd.data.tokenization import ConversationTokenizer

    ctok = ConversationTokenizer(assets["tok"], "chat", MAX_LEN, "truncate")
    return ctok(read_records(assets["data"])[i].messages)


# ----------------------------------------------------------------------------- TP=1 reference


def test_reference_store_and_summary(assets):
    s = assets["summary"]
    m, arrays = _store_arrays(assets["store"])
    assert s.num_samples == N_SAMPLES == m.num_samples and s.samples_processed == N_SAMPLES
    assert s.truncated == 1 and s.dropped == 0 and s.skipped == 0
    assert m.k == K and m.values_dtype == "float32" and m.max_seq_length == MAX_LEN
    assert m.teacher_vocab_size == 300 and not m.logits_scale_applied
    assert m.teacher_hash.startswith("sha256:") and m.dataset_hash.startswith("sha256:")
    for i, (values, ids, lse, seq_lp) in enumerate(arrays):
        ts = _sample_tokens(assets, i)
        assert values.shape == (ts.num_completion_tokens, K)
        assert (ids < 300).all() and (values[:, :-1] >= values[:, 1:]).all()
        assert (lse >= values[:, 0]).all() and seq_lp < 0
    assert s.num_tokens == sum(a[0].shape[0] for a in arrays) == s.tokens_processed
    assert s.bytes_per_token <= 8 * K + 16  # float32 values here; 6k+16 at bf16 (benchmark)


# ----------------------------------------------------------------------------- TP=2 / PP=2


def _dist_extract(rank, world, tp, pp, teacher_path, tok_dir, data, out, mbs, fuse=False, pack=False):
    from transformers import AutoTokenizer

    from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel
    from nemo_kd.teacher.extract import compute_topk_logits
    from nemo_kd.teacher.teachers import MegatronTeacher

    initialize_parallel(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, seed=5))
    try:
        teacher = MegatronTeacher(teacher_path)
        summary = compute_topk_logits(_extract_cfg(out, data, micro_batch_size=mbs, fuse_output_layer=fuse,
                                                   output_layer_chunk_tokens=5, pack_sequences=pack,
                                                   pack_length=64 if pack else None), teacher,
                                      AutoTokenizer.from_pretrained(tok_dir))
        return summary.num_tokens
    finally:
        destroy_parallel()


def _assert_same_store(path, ref_path):
    m, arrays = _store_arrays(path)
    rm, ref = _store_arrays(ref_path)
    for key in ("k", "dataset_hash", "tokenizer_hash", "teacher_hash", "num_samples", "num_tokens", "max_seq_length"):
        assert getattr(m, key) == getattr(rm, key), key
    for i, ((v, ids, lse, slp), (rv, rids, rlse, rslp)) in enumerate(zip(arrays, ref)):
        assert (ids == rids).all(), f"sample {i}: ids differ"
        torch.testing.assert_close(torch.from_numpy(v), torch.from_numpy(rv), atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(torch.from_numpy(lse), torch.from_numpy(rlse), atol=2e-5, rtol=2e-5)
        assert abs(slp - rslp) < 1e-4 * max(1.0, abs(rslp)), (i, slp, rslp)


def test_deferred_projection_extraction_equals_reference(assets):
    """fuse_output_layer: only completion rows projected, 5 at a time — the same store."""
    from nemo_kd.teacher.extract import compute_topk_logits
    from nemo_kd.teacher.teachers import MegatronTeacher

    out = str(assets["dir"] / "store_deferred")
    with WorldOfOne(seed=5):
        teacher = MegatronTeacher(assets["teacher_path"])
        widths = []
        teacher.model.register_forward_hook(lambda mod, inp, o: widths.append(o.shape[-1]))
        summary = compute_topk_logits(_extract_cfg(out, assets["data"], fuse_output_layer=True,
                                                   output_layer_chunk_tokens=5), teacher, assets["tok"])
    assert set(widths) == {assets["cfg"].hidden_size}  # the model returned hidden states, never logits
    assert summary.num_tokens == assets["summary"].num_tokens
    _assert_same_store(out, assets["store"])


# Two-process layouts: (TP, PP, DP, micro-batch size, deferred output projection).
PARALLEL_LAYOUTS = {"tp2": (2, 1, 1, None, False), "pp2": (1, 2, 1, 2, False), "dp2": (1, 1, 2, None, False),
                    "tp2_deferred": (2, 1, 1, None, True), "pp2_deferred": (1, 2, 1, 2, True)}


def _dist_extract_layouts(rank, world, teacher_path, tok_dir, data, out_dir):
    """Every layout's extraction, one after the other in one 2-process launch (each sets up and tears down
    its own parallel state): {layout: this rank's token count}."""
    return {name: _dist_extract(rank, world, tp, pp, teacher_path, tok_dir, data, os.path.join(out_dir, name), mbs,
                                fuse) for name, (tp, pp, dp, mbs, fuse) in PARALLEL_LAYOUTS.items()}


@pytest.fixture(scope="module")
def parallel_stores(assets):
    out_dir = str(assets["dir"] / "parallel_stores")
    per_rank = run_distributed(_dist_extract_layouts, 2, assets["teacher_path"], str(assets["dir"] / "tok"),
                               assets["data"], out_dir)
    return {name: (os.path.join(out_dir, name), [r[name] for r in per_rank]) for name in PARALLEL_LAYOUTS}


@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(PARALLEL_LAYOUTS))
def test_parallel_extraction_equals_tp1(assets, parallel_stores, layout):
    """TP=2 and PP=2 (2 micro-batches per batch) give the TP=1 store; DP=2 writes 2 shards with the same
    content; with the deferred output projection too."""
    tp, pp, dp, _, _ = PARALLEL_LAYOUTS[layout]
    assert tp * pp * dp == 2
    out, tokens = parallel_stores[layout]
    assert tokens == [assets["summary"].num_tokens] * (tp * pp * dp)
    _assert_same_store(out, assets["store"])
    shards = sorted(f for f in os.listdir(out) if f.endswith(".bin"))
    assert len(shards) == dp


# ----------------------------------------------------------------------------- round trip with the losses


def test_store_round_trip_equals_live_teacher_loss(assets):
    from nemo_kd.losses.kd import KDSettings, topk_kd_loss
    from nemo_kd.models import build_gpt_model, shard_state_dict
    from nemo_kd.teacher.store import StoreReader

    cfg = assets["cfg"]
    with WorldOfOne(seed=5):
        model = build_gpt_model(cfg)
        model.load_state_dict(shard_state_dict(assets["full"], cfg), strict=False)
        model.eval()
        reader = StoreReader(assets["store"])
        g = torch.Generator().manual_seed(0)
        for i in (0, 5, 7):
            ts = _sample_tokens(assets, i)
            tokens = torch.tensor([ts.input_ids])
            with torch.no_grad():
                logits = model(tokens, torch.arange(tokens.shape[1])[None], None)[0, :, : cfg.vocab_size]
            p, length = ts.num_prompt_tokens, len(ts.input_ids)
            rows = logits[p - 1 : length - 1].float()
            live_v, live_ids = rows.topk(K, dim=-1)
            live_lse = rows.logsumexp(-1)
            live_seq = torch.log_softmax(rows.double(), -1).gather(1, tokens[0, p:length, None]).sum().item()
            stored = reader[i]
            assert torch.equal(stored.ids, live_ids)
            assert abs(stored.seq_logprob - live_seq) < 1e-4 * abs(live_seq)
            student = torch.randn(rows.shape[0], cfg.vocab_size, generator=g) * 3
            for conv in ("renormalized", "exact_tail"):
                for loss_type in ("forward_kl", "reverse_kl"):
                    a = topk_kd_loss(student, stored.values, stored.ids,
                                     KDSettings(loss_type=loss_type, topk_convention=conv), teacher_lse=stored.lse)
                    b = topk_kd_loss(student, live_v, live_ids, KDSettings(loss_type=loss_type, topk_convention=conv),
                                     teacher_lse=live_lse)
                    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- mismatch / malformed / NaN


def test_mismatch_errors(assets, tmp_path):
    from nemo_kd.data import read_records
    from nemo_kd.data.tokenization import ConversationTokenizer
    from nemo_kd.data.tokenizer_builder import train_byte_level_bpe
    from nemo_kd.teacher.extract import compute_topk_logits
    from nemo_kd.teacher.store import StoreMismatchError, StoreReader
    from nemo_kd.teacher.teachers import MegatronTeacher

    records = read_records(assets["data"])
    ctok = ConversationTokenizer(assets["tok"], "chat", MAX_LEN)
    reader = StoreReader(assets["store"])

    def n_tokens(i):
        ts = ctok(records[i].messages)
        return ts.num_completion_tokens if ts is not None else 0

    reader.check_compatible(dataset_hash=records.content_hash, tokenizer_hash=ctok.hash, k=K, max_seq_length=MAX_LEN,
                            num_completion_tokens_fn=n_tokens, num_samples=len(records))
    other_data = tmp_path / "other.jsonl"
    other_data.write_text(open(assets["data"]).read().replace("because", "since"))
    with pytest.raises(StoreMismatchError, match="dataset hash"):
        reader.check_compatible(dataset_hash=read_records(other_data).content_hash)
    other_tok = train_byte_level_bpe(_texts()[:20], vocab_size=280)
    with pytest.raises(StoreMismatchError, match="tokenizer hash"):
        reader.check_compatible(tokenizer_hash=ConversationTokenizer(other_tok, "chat", MAX_LEN).hash)
    with pytest.raises(StoreMismatchError, match="k: store has 8, expected 16"):
        reader.check_compatible(k=16)
    # Re-running into the finished store with another k is refused (never mixed or overwritten).
    with WorldOfOne(seed=5):
        teacher = MegatronTeacher(assets["teacher_path"])
        with pytest.raises(StoreMismatchError, match="k: "):
            compute_topk_logits(_extract_cfg(assets["store"], assets["data"], top_k=16), teacher, assets["tok"])
        # Same settings: nothing to do, same summary totals.
        again = compute_topk_logits(_extract_cfg(assets["store"], assets["data"]), teacher, assets["tok"])
        assert again.samples_processed == 0 and again.resumed_samples == N_SAMPLES
        assert again.num_tokens == assets["summary"].num_tokens


def test_malformed_input_and_skip(assets, tmp_path, caplog):
    from nemo_kd.data import DataError
    from nemo_kd.teacher.extract import compute_topk_logits
    from nemo_kd.teacher.teachers import MegatronTeacher

    bad = tmp_path / "bad.jsonl"
    lines = open(assets["data"]).read().splitlines()
    lines[2] = '{"prompt": "hi", "response": 3}'
    lines[4] = '{"prompt": "unterminated'
    bad.write_text("\n".join(lines) + "\n")
    with WorldOfOne(seed=5):
        teacher = MegatronTeacher(assets["teacher_path"])
        with pytest.raises(DataError, match=re.escape(f"{bad}:3: wrong type for field 'response'")):
            compute_topk_logits(_extract_cfg(str(tmp_path / "s1"), str(bad)), teacher, assets["tok"])
        s = compute_topk_logits(_extract_cfg(str(tmp_path / "s2"), str(bad), skip_bad_samples=True, overlong="drop"),
                                teacher, assets["tok"])
    assert s.skipped == 2 and s.num_samples == N_SAMPLES - 2 and s.dropped == 1 and s.truncated == 0
    # the over-long sample is named with its reason (dataset sample 5, file line 8)
    assert re.search(rf"sample 5 \({re.escape(str(bad))}:8\): not extracted, \d+ tokens > max_seq_length=\d+ "
                     r"\(overlong=drop\)", caplog.text), caplog.text
    assert f"{bad}:3:" in s.skipped_report and f"{bad}:5: bad JSON" in s.skipped_report
    assert "skipped bad input  2" in s.format()
    from nemo_kd.teacher.store import StoreReader

    r = StoreReader(str(tmp_path / "s2"))
    assert r.num_tokens(5) == 0  # dataset sample 5 is file line 8 (sample 7): dropped, stored with 0 tokens
    assert r[5].seq_logprob == 0.0

    # no sample at all (an empty file, or only bad lines skipped): refused, nothing written
    empty, only_bad = tmp_path / "empty.jsonl", tmp_path / "only_bad.jsonl"
    empty.write_text("")
    only_bad.write_text('{"prompt": "hi", "response": 3}\n')
    with WorldOfOne(seed=5):
        with pytest.raises(ValueError, match=re.escape(f"{empty}: no samples to extract")):
            compute_topk_logits(_extract_cfg(str(tmp_path / "s3"), str(empty)), teacher, assets["tok"])
        with pytest.raises(ValueError, match=re.escape(f"{only_bad}: no samples to extract (every line was bad: "
                                                       f"skipped 1 bad sample(s):\n  {only_bad}:1: wrong type")):
            compute_topk_logits(_extract_cfg(str(tmp_path / "s4"), str(only_bad), skip_bad_samples=True),
                                teacher, assets["tok"])
    assert not (tmp_path / "s3").exists() and not (tmp_path / "s4").exists()


def _nan_teacher(assets, path):
    """A teacher checkpoint with NaN in the embedding of a token first seen as late as possible; its sample."""
    from nemo_kd.data import read_records
    from nemo_kd.teacher.teachers import save_full_checkpoint

    # NaN the embedding of a token first seen (before its sample's last position) as late as possible.
    first_seen = {}
    for i in range(len(read_records(assets["data"]))):
        ids = _sample_tokens(assets, i).input_ids
        for pos, t in enumerate(ids[:-1]):
            first_seen.setdefault(t, i)
    token, sample = max(first_seen.items(), key=lambda kv: kv[1])
    assert sample > 0
    full = dict(assets["full"])
    emb = full["embedding.word_embeddings.weight"].clone()
    emb[token] = float("nan")
    full["embedding.word_embeddings.weight"] = emb
    save_full_checkpoint(path, full, assets["cfg"])
    return sample


def test_nan_teacher_names_the_sample(assets, tmp_path):
    from nemo_kd.losses.token_stats import NonFiniteLogitsError
    from nemo_kd.teacher.extract import compute_topk_logits
    from nemo_kd.teacher.teachers import MegatronTeacher

    sample = _nan_teacher(assets, str(tmp_path / "nan_teacher"))
    with WorldOfOne(seed=5):
        teacher = MegatronTeacher(str(tmp_path / "nan_teacher"))
        with pytest.raises(NonFiniteLogitsError, match=rf"sample {sample} \(row"):
            compute_topk_logits(_extract_cfg(str(tmp_path / "s"), assets["data"]), teacher, assets["tok"])


@pytest.mark.distributed
def test_nan_teacher_pp2_fails_on_every_stage_without_hanging(assets, tmp_path):
    sample = _nan_teacher(assets, str(tmp_path / "nan_teacher"))
    with pytest.raises(AssertionError) as err:
        run_distributed(_dist_extract, 2, 1, 2, str(tmp_path / "nan_teacher"), str(assets["dir"] / "tok"),
                        assets["data"], str(tmp_path / "s"), 2, timeout=120)
    msg = str(err.value)
    # Whichever stage reports first: the last names the sample, the first points at the last stage.
    assert f"NonFiniteLogitsError: non-finite (NaN/Inf) teacher logits in sample {sample} (row" in msg \
        or "the teacher failed on the last pipeline stage in samples" in msg, msg[-2000:]


# ----------------------------------------------------------------------------- HF teacher


def test_hf_teacher_matches_hand_computation(assets, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from nemo_kd.teacher.extract import compute_topk_logits
    from nemo_kd.teacher.store import StoreReader
    from nemo_kd.teacher.teachers import HFTeacher

    torch.manual_seed(0)
    hf_cfg = LlamaConfig(vocab_size=len(assets["tok"]), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(hf_cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(60)  # peaked logits
    path = str(tmp_path / "hf")
    model.save_pretrained(path)
    assets["tok"].save_pretrained(path)
    teacher = HFTeacher(path)  # no torch.distributed: a world of one
    assert teacher.hash.startswith("sha256:") and teacher.vocab_size == len(assets["tok"])
    results = {}
    for dtype in ("float32", "bfloat16"):
        out = str(tmp_path / f"store_{dtype}")
        compute_topk_logits(_extract_cfg(out, assets["data"], values_dtype=dtype), teacher, assets["tok"])
        results[dtype] = StoreReader(out)
    model.eval()
    for i in range(N_SAMPLES):
        ts = _sample_tokens(assets, i)
        tokens = torch.tensor([ts.input_ids])
        with torch.no_grad():
            logits = model(input_ids=tokens).logits[0].float()
        p, length = ts.num_prompt_tokens, len(ts.input_ids)
        rows = logits[p - 1 : length - 1]
        v, ids = rows.topk(K, dim=-1)
        seq = torch.log_softmax(rows.double(), -1).gather(1, tokens[0, p:length, None]).sum().item()
        for dtype, reader in results.items():
            got = reader[i]
            assert torch.equal(got.ids, ids), (dtype, i)
            tol = 1e-5 if dtype == "float32" else 1e-2
            torch.testing.assert_close(got.values, v, atol=tol, rtol=tol)
            torch.testing.assert_close(got.lse, rows.logsumexp(-1), atol=1e-5, rtol=1e-5)
            assert abs(got.seq_logprob - seq) < 1e-4 * max(1.0, abs(seq))
    assert results["bfloat16"].manifest.values_dtype == "bfloat16"

    # The same HF directory as a Megatron teacher (streamed into Megatron by nemo_kd.convert):
    # the store must agree with the HF teacher's.
    from nemo_kd.teacher.teachers import MegatronTeacher

    out = str(tmp_path / "store_megatron")
    with WorldOfOne(seed=1234):
        compute_topk_logits(_extract_cfg(out, assets["data"], values_dtype="float32"), MegatronTeacher(path), assets["tok"])
    megatron = StoreReader(out)
    for i in range(N_SAMPLES):
        got, ref = megatron[i], results["float32"][i]
        assert torch.equal(got.ids, ref.ids), i
        torch.testing.assert_close(got.values, ref.values, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got.lse, ref.lse, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- kill and resume (the script)


def _script_cmd(assets, out, entry):
    args = [f"data_path={assets['data']}", f"output_path={out}", f"teacher.path={assets['teacher_path']}",
            f"tokenizer_path={assets['dir'] / 'tok'}", f"top_k={K}", f"max_seq_length={MAX_LEN}",
            "values_dtype=float32", "batch_size=2", "commit_every=1", "progress=true"]
    head = [sys.executable, os.path.join(REPO, "examples", "compute_topk_logits.py")] if entry == "example" \
        else [sys.executable, "-m", "nemo_kd.teacher.extract"]
    return head + args


def _store_files(path):
    out = {}
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as f:
            out[name] = f.read()
    return out


@pytest.mark.slow
def test_kill_and_resume_is_byte_identical(assets, tmp_path):
    out = str(tmp_path / "store")
    # the subprocesses run with this process's thread count: the reference below is computed here, and a matmul's
    # reduction order (so its last bits) follows the thread count
    env = dict(os.environ, NEMO_KD_EXTRACT_BATCH_DELAY="0.4", MASTER_PORT=str(_free_port()), PYTHONPATH=REPO,
               NEMO_KD_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.Popen(_script_cmd(assets, out, "example"), env=env, cwd=str(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    progress = os.path.join(out, "shard-00000.progress.json")
    deadline = time.time() + 120
    committed = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            with open(progress) as f:
                committed = json.load(f)["committed_samples"]
        except (OSError, ValueError):
            committed = 0
        if committed >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    time.sleep(0.2)  # land mid-batch sometimes: appended-but-uncommitted bytes must be dropped
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    env.update(NEMO_KD_EXTRACT_BATCH_DELAY="0", MASTER_PORT=str(_free_port()))
    done = subprocess.run(_script_cmd(assets, out, "module"), env=env, cwd=str(tmp_path), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resumed)" in done.stdout and "completion tokens" in done.stdout
    resumed = int(done.stdout.split(" computed now, ")[1].split(" resumed")[0])
    assert 4 <= resumed < N_SAMPLES
    # Uninterrupted run with the same settings (batch_size=2) in this process.
    ref = str(tmp_path / "ref")
    from nemo_kd.teacher.extract import compute_topk_logits
    from nemo_kd.teacher.teachers import MegatronTeacher

    with WorldOfOne(seed=1234):
        compute_topk_logits(_extract_cfg(ref, assets["data"], batch_size=2), MegatronTeacher(assets["teacher_path"]),
                            assets["tok"])
    got, want = _store_files(out), _store_files(ref)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], f"{name} differs after kill-and-resume"


def test_hf_teacher_type_on_a_nemo_or_missing_path_says_so(tmp_path):
    """teacher.type=hf given a .nemo (or a file, or nothing) is refused naming the path and the fix, not with
    transformers' "not a valid JSON file"."""
    from nemo_kd.teacher.teachers import TeacherSpec, build_teacher

    nemo = tmp_path / "teacher.nemo"
    nemo.write_bytes(b"not read")
    with pytest.raises(ValueError, match=re.escape(f"teacher.path={nemo} is a .nemo file: use teacher.type=megatron")):
        build_teacher(TeacherSpec(type="hf", path=str(nemo)))
    with pytest.raises(ValueError, match=re.escape(f"teacher.path={tmp_path / 'gone'} is missing")):
        build_teacher(TeacherSpec(type="hf", path=str(tmp_path / "gone")))


@pytest.mark.distributed
def test_packed_extraction_equals_padded(assets, tmp_path):
    """pack_sequences: a batch's samples share rows (first-fit decreasing, block attention mask,
    positions restarting) — the same store as one padded row per sample (ids equal, values and
    LSE within fp32 rounding), at TP=1, and at PP=2 with the deferred projection."""
    from nemo_kd.teacher.extract import compute_topk_logits
    from nemo_kd.teacher.teachers import MegatronTeacher

    data = str(tmp_path / "short.jsonl")  # short samples (14 to 20 tokens): three or four share a row of 64
    with open(data, "w") as f:
        for i in range(N_SAMPLES):
            f.write(json.dumps({"id": i, "prompt": f"{i}?", "response": f"{i * 3}" + " plus" * (i % 5)}) + "\n")
    rows = []
    with WorldOfOne(seed=5):
        teacher = MegatronTeacher(assets["teacher_path"])
        compute_topk_logits(_extract_cfg(str(tmp_path / "padded"), data), teacher, assets["tok"])
        teacher.model.register_forward_hook(lambda mod, inp, o: rows.append(o.shape[0]))
        summary = compute_topk_logits(_extract_cfg(str(tmp_path / "packed"), data, pack_sequences=True,
                                                   pack_length=64), teacher, assets["tok"])
    assert summary.num_tokens > 0 and sum(rows) <= N_SAMPLES // 2  # packed: at most half the rows
    _assert_same_store(str(tmp_path / "packed"), str(tmp_path / "padded"))

    run_distributed(_dist_extract, 2, 1, 2, assets["teacher_path"], str(assets["dir"] / "tok"), data,
                    str(tmp_path / "packed_pp2"), 1, True, True)
    _assert_same_store(str(tmp_path / "packed_pp2"), str(tmp_path / "padded"))
