"""Coming from NeMo-Aligner: its KD YAML converted (nemo-kd-migrate-aligner-config) and its top-k JSONL
teacher logits imported into a verified store (nemo-kd-import-aligner-logits).

The inputs are built the way NeMo-Aligner builds them, independently of nemo_kd's own code paths:

* the YAML follows Aligner's published ``examples/nlp/gpt/conf/gpt_knowledge_distillation.yaml``
  (with the overrides its KD guide passes on the command line);
* each JSONL line is what ``examples/nlp/synthetic_data_gen/compute_topk_logits.py`` writes for one
  row of NeMo's SFT collate: ``tokens = input_ids[:-1]``, ``labels = input_ids[1:]``,
  ``loss_mask = mask[1:]``, right-padded with EOS to the batch's longest row rounded up to 8;
  ``topk_logits``/``topk_token_ids`` at every position from the teacher's logits minus their row
  maximum, ``log_sum_exp_logits`` over the whole vocabulary, ``index`` in the SFT file. The
  "teacher" is a float64 random logit table per sample, with the next token boosted at completion
  positions, so its top-1 at the position predicting completion token ``j`` is token ``j`` (an
  alignment check that does not use the importer's own indexing).
"""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K, MAX_LEN, ALIGNER_MAX, N, BATCH = 6, 40, 64, 10, 4
RNG_VOCAB_BOOST = 8.0  # over 300 N(0, 1) logits: the label is the top-1, the tail keeps ~10% of the mass


def _env():
    return dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")


def _run(module, *args, timeout=240):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          env=_env(), cwd=REPO, timeout=timeout)


# ----------------------------------------------------------------------------- 1. the config


ALIGNER_YAML = """\
name: megatron_gpt_knowledge_distillation

trainer:
  num_nodes: 1
  devices: 8
  accelerator: gpu
  precision: bf16
  knowledge_distillation:
    max_epochs: 1
    max_steps: 1200
    val_check_interval: 100
    save_interval: ${.val_check_interval}
    limit_train_batches: 1.0
    limit_val_batches: 5
    gradient_clip_val: 1.0
  logger: False
  enable_checkpointing: False
  use_distributed_sampler: False
  max_time: null
  max_epochs: ${.knowledge_distillation.max_epochs}
  max_steps: ${.knowledge_distillation.max_steps}

exp_manager:
  explicit_log_dir: /results/kd
  exp_dir: null
  name: ${name}
  create_wandb_logger: False
  resume_if_exists: True
  resume_ignore_no_checkpoint: True
  create_checkpoint_callback: True
  checkpoint_callback_params:
    monitor: val_loss
    save_top_k: 5
    mode: min
    save_nemo_on_train_end: False
    filename: 'megatron_gpt_sft--{${.monitor}:.3f}-{step}-{consumed_samples}-{epoch}'
    model_parallel_size: ${model.tensor_model_parallel_size}
    save_best_model: False

pretrained_checkpoint:
  restore_from_path: /ckpt/2b_student.nemo

model:
  mcore_gpt: True
  tensor_model_parallel_size: 2
  micro_batch_size: 1
  global_batch_size: 128
  megatron_amp_O2: True
  peft:
    peft_scheme: "none"
    restore_from_path: null
  optim:
    name: distributed_fused_adam
    lr: 3e-5
    weight_decay: 0.01
    betas:
    - 0.9
    - 0.98
    sched:
      name: CosineAnnealing
      warmup_steps: 10
      constant_steps: 200
      min_lr: 9e-7
  knowledge_distillation:
    target_logits_scale: 1.0
    logits_scale: 0.5
    kd_loss_weight: 1.0
    sft_loss_weight: 0.4
    kd_loss: bwd_kl
  data:
    data_impl: chunked_jsonl
    n_chunks: 2
    n_examples_per_chunk: 100
    splits_string: null
    seq_length: ${model.encoder_seq_length}
    skip_warmup: True
    num_workers: 0
    dataloader_type: single
    reset_position_ids: False
    reset_attention_mask: False
    eod_mask_loss: False
    index_mapping_dir: null
    data_prefix:
      train: [/data/train_with_logits_CHUNK_ID.jsonl]
      validation: [/data/val_with_logits_CHUNK_ID.jsonl]
      test: [/data/val_with_logits_CHUNK_ID.jsonl]
    top_k: 4
  overwrite_base_config:
    data:
      data_prefix: True
"""


def _get(cfg, dotted):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def test_aligner_config_migrates_and_passes_the_strict_check(tmp_path):
    src, out, report_path = tmp_path / "aligner_kd.yaml", tmp_path / "gpt_kd.yaml", tmp_path / "report.yaml"
    src.write_text(ALIGNER_YAML)
    proc = _run("nemo_kd.migrate.aligner_config", src, out, "--report", report_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = yaml.safe_load(out.read_text())
    report = yaml.safe_load(report_path.read_text())

    expected = {
        "model.kd.kd_loss_type": "reverse_kl",  # Aligner's bwd_kl: sum_k q_student (log q - log p_teacher)
        "model.kd.kd_loss_weight": 1.0,
        "model.kd.sft_loss_weight": 0.4,
        "model.kd.logits_scale": 0.5,
        "model.kd.target_logits_scale": 1.0,
        "model.kd.topk_convention": "renormalized",  # Aligner softmaxes its k stored logits
        "model.parallel.tensor_model_parallel_size": 2,
        "model.data.train_ds.micro_batch_size": 1,
        "model.data.train_ds.global_batch_size": 128,
        "model.data.train_ds.top_k": 4,
        "model.data.validation_ds.top_k": 4,
        "model.data.train_ds.logits_store": "/data/train_with_logits.nemo_kd_store",
        "model.data.validation_ds.logits_store": "/data/val_with_logits.nemo_kd_store",
        "model.student_init": "/ckpt/2b_student.nemo",
        "model.optim.lr": 3e-5,
        "model.optim.weight_decay": 0.01,
        "model.optim.use_distributed_optimizer": True,
        "model.optim.adam_beta1": 0.9,
        "model.optim.adam_beta2": 0.98,
        "model.optim.decay_style": "cosine",
        "model.optim.warmup_steps": 10,
        "model.optim.min_lr": 9e-7,
        "model.optim.decay_steps": 1200 - 200,  # NeMo's max_steps - constant_steps (Megatron counts from 0)
        "model.optim.clip_grad": 1.0,
        "trainer.max_steps": 1200,
        "trainer.max_epochs": 1,
        "trainer.val_check_interval": 100,
        "trainer.limit_val_batches": 5,
        "trainer.precision": "bf16-mixed",
        "trainer.devices": 8,
        "exp_manager.checkpoint_callback_params.every_n_train_steps": 100,  # ${.val_check_interval} resolved
        "exp_manager.checkpoint_callback_params.monitor": "val_loss",  # a validation set exists
        "exp_manager.checkpoint_callback_params.save_top_k": 5,
        "exp_manager.name": "megatron_gpt_knowledge_distillation",  # ${name} resolved
        "exp_manager.explicit_log_dir": "/results/kd",
    }
    for key, value in expected.items():
        assert _get(cfg, key) == value, key
    carried = {(c["aligner"], c["nemo_kd"]) for c in report["carried"]}
    assert ("model.knowledge_distillation.kd_loss", "model.kd.kd_loss_type") in carried
    assert ("trainer.knowledge_distillation.save_interval",
            "exp_manager.checkpoint_callback_params.every_n_train_steps") in carried

    # every leaf of the Aligner file is reported: carried over, dropped (with why) or an unresolved interpolation
    def leaves(node, prefix=""):
        if not isinstance(node, dict):
            return [prefix]
        return [k for key, v in node.items() for k in leaves(v, f"{prefix}.{key}" if prefix else key)]

    reported = {part for c in report["carried"] for part in c["aligner"].split(" + ")}
    reported |= {d["key"] for d in report["dropped"]} | {u["key"] for u in report["unresolved_interpolations"]}
    assert set(leaves(yaml.safe_load(ALIGNER_YAML))) == reported

    dropped = {d["key"]: d for d in report["dropped"]}
    for key in ("model.mcore_gpt", "model.megatron_amp_O2", "model.peft.peft_scheme", "model.data.data_impl",
                "model.data.n_chunks", "model.data.data_prefix.test", "model.overwrite_base_config.data.data_prefix",
                "exp_manager.checkpoint_callback_params.filename"):
        assert key in dropped, key
    assert dropped["model.megatron_amp_O2"]["value"] is True
    assert [u["key"] for u in report["unresolved_interpolations"]] == ["model.data.seq_length"]
    assert "${model.encoder_seq_length}" in report["unresolved_interpolations"][0]["text"]
    assert {n["key"] for n in report["needs_value"]} == {
        "model.data.train_ds.max_seq_length", "model.data.train_ds.file_path", "model.data.validation_ds.file_path",
        "model.data.train_ds.tokenizer"}
    for key in ("model.data.train_ds.max_seq_length", "model.data.train_ds.file_path", "model.data.train_ds.tokenizer"):
        assert _get(cfg, key) == "???"
    steps = report["next_steps"]
    assert steps[0] == ("nemo-kd-import-aligner-logits --aligner-jsonl /data/train_with_logits_0.jsonl --aligner-jsonl "
                        "/data/train_with_logits_1.jsonl --data <model.data.train_ds.file_path> --tokenizer <student "
                        "tokenizer dir> --output /data/train_with_logits.nemo_kd_store --max-seq-length "
                        "<model.data.train_ds.max_seq_length> --top-k 4")
    assert "nemo-kd-import-aligner-logits --aligner-jsonl /data/val_with_logits_0.jsonl" in steps[1]
    assert "model.knowledge_distillation" not in cfg["model"] and "pretrained_checkpoint" not in cfg

    # Filled in, the result passes nemo_kd's strict check of the whole run config: no unknown key.
    from omegaconf import OmegaConf

    from nemo_kd.training.run_config import prepare_run_config

    run = OmegaConf.load(str(out))
    for key, value in (("model.data.train_ds.file_path", "/data/train.jsonl"),
                       ("model.data.validation_ds.file_path", "/data/val.jsonl"),
                       ("model.data.train_ds.tokenizer", "/ckpt/tokenizer"),
                       ("model.data.train_ds.max_seq_length", 4096)):
        OmegaConf.update(run, key, value)
    settings = prepare_run_config(run, cuda_available=True, cuda_bf16=True)
    assert (settings.accelerator, settings.params_dtype, settings.validation) == ("gpu", "bf16", True)
    assert run.model.data.validation_ds.max_seq_length == 4096  # the base's interpolation, now resolved
    assert run.trainer.val_check_interval == 100


def test_aligner_config_nulls_ask_instead_of_defaulting(tmp_path):
    """Aligner's published defaults leave the student checkpoint null and run max_epochs (max_steps -1):
    nemo_kd must ask for them rather than train a random student or decay over an unknown length."""
    from nemo_kd.migrate.aligner_config import migrate_aligner_config

    raw = yaml.safe_load(ALIGNER_YAML)
    raw["pretrained_checkpoint"]["restore_from_path"] = None
    raw["trainer"]["knowledge_distillation"]["max_steps"] = -1
    raw["model"]["optim"]["sched"]["constant_steps"] = 1000
    result = migrate_aligner_config(raw)
    needs = {n["key"]: n["why"] for n in result.needs_value}
    assert result.config["model"]["student_init"] == "???" and "restore_from_path" in needs["model.student_init"]
    assert result.config["model"]["optim"]["decay_steps"] == "???"
    assert "constant_steps=1000" in needs["model.optim.decay_steps"]
    assert result.config["trainer"]["max_steps"] == "???" and "trainer.max_steps" in needs
    assert {"trainer.knowledge_distillation.max_steps", "trainer.max_steps"} <= set(result.dropped_keys())

    # constant_steps longer than the run: NeMo warms up and holds min_lr; decay_steps = warmup + 1 says so
    raw["trainer"]["knowledge_distillation"]["max_steps"] = 100
    result = migrate_aligner_config(raw)
    assert result.config["model"]["optim"]["decay_steps"] == 11
    assert any("constant_steps=1000 leaves no decay phase" in s for s in result.next_steps)


# ----------------------------------------------------------------------------- 2. the logits


def _texts():
    return [f"question {i}: what is {i} plus {i * 3}? answer: {i + i * 3}, because adding numbers works." for i in range(40)]


def _write_records(path, edit=None):
    rows = []
    for i in range(N):
        response = f"{i + i * 3} because adding" + " numbers" * (i % 4)
        if i == 6:
            response = " ".join(f"plus {j}" for j in range(12))  # longer than MAX_LEN: nemo_kd truncates it
        rows.append({"id": i, "prompt": f"what is {i} plus {i * 3}?", "response": response})
    if edit:
        edit(rows)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return rows


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from transformers import AutoTokenizer

    from nemo_kd.data.tokenizer_builder import train_byte_level_bpe

    d = tmp_path_factory.mktemp("aligner")
    train_byte_level_bpe(_texts(), vocab_size=300, save_dir=str(d / "tok"))
    tok = AutoTokenizer.from_pretrained(str(d / "tok"))
    data = str(d / "data.jsonl")
    rows = _write_records(data)
    return dict(dir=d, tok=tok, tok_path=str(d / "tok"), data=data, rows=rows)


def _aligner_ids(tok, row, template="chat"):
    """NeMo SFT's input_ids and answer mask for a prompt/response row (what Aligner's dataset feeds it)."""
    msgs = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
    if template == "chat":
        prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
        completion = tok.apply_chat_template(msgs, tokenize=False)[len(prompt):]
    else:  # another prompt template (what a user with a different template would have run Aligner with)
        prompt, completion = f"User: {row['prompt']}\nAssistant: ", row["response"] + tok.eos_token
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"]
    ids = (p + c)[:ALIGNER_MAX + 1]
    return ids, ([0] * len(p) + [1] * len(c))[:ALIGNER_MAX + 1], len(p)


def _teacher_logits(index, vocab):
    """A deterministic float64 logit table per sample ([ALIGNER_MAX, V]): a position's logits do not depend on the
    batch's padding, like a causal teacher's."""
    return np.random.default_rng(1000 + index).normal(scale=1.0, size=(ALIGNER_MAX, vocab))


def _aligner_batch(tok, rows, indices, template=None, with_lse=True):
    """The JSON lines compute_topk_logits.py writes for one batch (NeMo's collate_fn + the teacher's top-k)."""
    template = template or {}
    vocab, eos = len(tok), tok.eos_token_id
    items = [_aligner_ids(tok, rows[i], template.get(i, "chat")) for i in indices]
    tokens = [ids[:-1] for ids, _, _ in items]
    longest = max(len(t) for t in tokens)
    width = min(ALIGNER_MAX, -(-longest // 8) * 8)
    lines = []
    for i, (ids, mask, p) in zip(indices, items):
        s = len(ids) - 1
        tok_row = ids[:-1] + [eos] * (width - s)
        labels = ids[1:] + [eos] * (width - s)
        loss_mask = mask[1:] + [0] * (width - s)
        z = _teacher_logits(i, vocab)[:width].copy()
        for t in range(width):
            if loss_mask[t]:
                z[t, labels[t]] += RNG_VOCAB_BOOST  # the teacher predicts the reference token
        z -= z.max(axis=1, keepdims=True)  # Aligner stores logits minus their row maximum
        order = np.argsort(-z, axis=1, kind="stable")[:, :K]
        top = np.take_along_axis(z, order, axis=1).astype(np.float32)  # .tolist() of a float32 tensor
        lse = np.log(np.exp(z).sum(axis=1)).astype(np.float32)
        obj = {"tokens": tok_row, "labels": labels, "loss_mask": loss_mask, "context_lengths": p,
               "contexts": ids[:p], "answers": ids[p:] + [eos] * (width - len(ids) + p),
               "metadata": {"id": rows[i]["id"]}, "topk_logits": top.tolist(), "topk_token_ids": order.tolist()}
        if with_lse:
            obj["log_sum_exp_logits"] = lse.tolist()
        obj["index"] = i
        lines.append(obj)
    return lines


def _write_chunks(assets, out_dir, with_lse=True, template=None, mutate=None):
    """Two chunk files (indices 0..5 and 6..9), batches of BATCH, lines shuffled, plus one resumed duplicate
    (index 2 recomputed alone: other padding, same completion logits). ``mutate(lines_by_file)`` edits them."""
    tok, rows = assets["tok"], assets["rows"]
    os.makedirs(out_dir, exist_ok=True)
    chunks = {0: list(range(0, 6)), 1: list(range(6, N))}
    by_file = {}
    rnd = random.Random(7)
    for c, idx in chunks.items():
        lines = []
        for b in range(0, len(idx), BATCH):
            lines += _aligner_batch(tok, rows, idx[b:b + BATCH], template, with_lse)
        rnd.shuffle(lines)
        by_file[os.path.join(out_dir, f"train_with_logits_{c}.jsonl")] = lines
    by_file[os.path.join(out_dir, "train_with_logits_1.jsonl")] += _aligner_batch(tok, rows, [2], template, with_lse)
    if mutate:
        mutate(by_file)
    for path, lines in by_file.items():
        with open(path, "w") as f:
            for obj in lines:
                f.write((obj if isinstance(obj, str) else json.dumps(obj)) + "\n")
    return sorted(by_file), by_file


def _reference(assets):
    """Per sample: the rows the store must hold, straight from the Aligner lines' arrays (positions P-1..L-2)."""
    tok, rows = assets["tok"], assets["rows"]
    ref = {}
    for i in range(N):
        (line,) = _aligner_batch(tok, rows, [i])
        ids, _, p = _aligner_ids(tok, rows[i])
        length = min(len(ids), MAX_LEN)  # nemo_kd truncates the completion at max_seq_length
        sl = slice(p - 1, length - 1)
        ref[i] = dict(values=np.asarray(line["topk_logits"], np.float64)[sl],
                      ids=np.asarray(line["topk_token_ids"])[sl],
                      lse=np.asarray(line["log_sum_exp_logits"], np.float64)[sl],
                      completion=np.asarray(ids[p:length]), prompt=p, length=length)
    return ref


def _import(assets, files, out, **kw):
    from nemo_kd.migrate.aligner_logits import import_aligner_logits

    kw.setdefault("values_dtype", "fp32")
    return import_aligner_logits(files, assets["data"], assets["tok"], out, MAX_LEN, progress=False, **kw)


def _ctok(assets):
    from nemo_kd.data.tokenization import ConversationTokenizer

    return ConversationTokenizer(assets["tok"], "chat", MAX_LEN)


def test_import_matches_aligner_arrays_and_trains_like_an_extracted_store(assets, tmp_path):
    from nemo_kd.data.kd_dataset import DistillationDataset, collate
    from nemo_kd.data.records import read_records
    from nemo_kd.teacher.store import StoreReader

    files, by_file = _write_chunks(assets, tmp_path / "aligner")
    assert sum(len(v) for v in by_file.values()) == N + 1
    out = tmp_path / "train.nemo_kd_store"
    proc = _run("nemo_kd.migrate.aligner_logits", *[a for f in files for a in ("--aligner-jsonl", f)],
                "--data", assets["data"], "--tokenizer", assets["tok_path"], "--output", out,
                "--max-seq-length", MAX_LEN, "--values-dtype", "fp32", "--workers", 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = _reference(assets)
    n_tokens = sum(r["length"] - r["prompt"] for r in ref.values())
    summary = proc.stdout.strip().splitlines()[-1]
    assert f"{N} samples, {n_tokens} completion tokens, k={K}" in summary
    assert "2 file(s) (11 lines, 1 identical duplicate(s) skipped)" in summary and "1 truncated" in summary
    assert "exact_tail available" in summary
    assert "writing the store" in proc.stderr  # the progress bars
    assert sorted(os.listdir(tmp_path)) == ["aligner", "train.nemo_kd_store"]  # no work directory left behind

    records, ctok = read_records(assets["data"]), _ctok(assets)
    reader = StoreReader(str(out), verify_checksums=True)
    m = reader.manifest
    assert (m.k, m.max_seq_length, m.num_samples, m.num_tokens) == (K, MAX_LEN, N, n_tokens)
    assert (m.dataset_hash, m.tokenizer_hash) == (records.content_hash, ctok.hash)
    assert m.unavailable_statistics == ["seq_logprob"] and m.exact_tail_available
    assert m.teacher_vocab_size == len(assets["tok"])
    for i, r in ref.items():
        values, ids, lse, seq_lp = reader.read_numpy(i)
        np.testing.assert_array_equal(values, r["values"].astype(np.float32))  # fp32: exact
        np.testing.assert_array_equal(ids, r["ids"])
        np.testing.assert_array_equal(lse, r["lse"].astype(np.float32))
        assert seq_lp == 0.0
        # independent of the index arithmetic: the teacher's top-1 at each stored row is that completion token
        np.testing.assert_array_equal(ids[:, 0], r["completion"])
    assert ref[6]["length"] == MAX_LEN and ref[6]["prompt"] + len(ref[6]["completion"]) == MAX_LEN

    # Training joins it exactly like an extracted store: exact_tail accepted (full-vocabulary LSE), teacher rows at
    # the label positions t = P-1+r of the collated batch.
    ds = DistillationDataset(records, ctok, store=reader, k=K, topk_convention="exact_tail")
    batch = collate([ds[3], ds[6]], seq_length=MAX_LEN, pad_id=0)
    for row, i in enumerate((3, 6)):
        r = ref[i]
        pos = np.arange(r["prompt"] - 1, r["length"] - 1)
        np.testing.assert_array_equal(batch["teacher_values"][row, pos].numpy(), r["values"].astype(np.float32))
        np.testing.assert_array_equal(batch["teacher_ids"][row, pos].numpy(), r["ids"])
        np.testing.assert_array_equal(batch["teacher_lse"][row, pos].numpy(), r["lse"].astype(np.float32))
        np.testing.assert_array_equal(batch["labels"][row, pos].numpy(), r["completion"])
        assert batch["loss_mask"][row].sum().item() == len(pos)
    reader.close()

    # one process parsing (the CLI ran two workers): the same bytes
    s1 = _import(assets, files, tmp_path / "one_worker_store", workers=1)
    assert [(sh["payload_sha256"], sh["index_sha256"]) for sh in s1.manifest["shards"]] == \
        [(sh.payload_sha256, sh.index_sha256) for sh in m.shards]

    # bf16 (stored as log-probs, format 3, as compute_topk_logits stores 16-bit values)
    s16 = _import(assets, files, tmp_path / "bf16_store", values_dtype="bf16")
    assert s16.manifest["values_encoding"] == "logprobs" and s16.manifest["format_version"] == 3
    with StoreReader(str(tmp_path / "bf16_store")) as r16:
        for i, r in ref.items():
            values, ids, lse, _ = r16.read_numpy(i)
            np.testing.assert_array_equal(ids, r["ids"])
            logp = r["values"] - r["lse"][:, None]
            assert np.all(np.abs((values - lse[:, None]) - logp) <= np.abs(logp) * 2.0 ** -8 + 1e-6)


def test_import_without_log_sum_exp_refuses_exact_tail(assets, tmp_path):
    from nemo_kd.data.kd_dataset import DistillationDataset, collate
    from nemo_kd.data.records import read_records
    from nemo_kd.teacher.store import StoreMismatchError, StoreReader

    files, _ = _write_chunks(assets, tmp_path / "aligner", with_lse=False)  # older Aligner: no log_sum_exp_logits
    out = str(tmp_path / "store")
    summary = _import(assets, files, out)
    assert not summary.exact_tail_available and summary.lines_without_lse == N + 1
    assert "exact_tail unavailable" in summary.format()
    ref = _reference(assets)
    reader = StoreReader(out)
    assert reader.manifest.unavailable_statistics == ["full_vocabulary_lse", "seq_logprob"]
    assert not reader.manifest.exact_tail_available
    for i, r in ref.items():
        values, ids, lse, _ = reader.read_numpy(i)
        np.testing.assert_array_equal(values, r["values"].astype(np.float32))
        np.testing.assert_array_equal(ids, r["ids"])
        lse_k = np.log(np.exp(r["values"]).sum(axis=1))  # the k stored logits only (they are <= 0: no overflow)
        np.testing.assert_allclose(lse, lse_k, rtol=1e-6, atol=1e-6)
        assert np.all(lse < r["lse"] - 1e-3)  # really not the full-vocabulary one

    records, ctok = read_records(assets["data"]), _ctok(assets)
    with pytest.raises(StoreMismatchError) as e:
        DistillationDataset(records, ctok, store=reader, k=K, topk_convention="exact_tail")
    msg = str(e.value)
    assert out in msg and "exact_tail" in msg and "full_vocabulary_lse" in msg and "renormalized" in msg
    ds = DistillationDataset(records, ctok, store=reader, k=K, topk_convention="renormalized")
    b = collate([ds[0], ds[9]], seq_length=MAX_LEN, pad_id=0)
    for row, i in enumerate((0, 9)):
        pos = np.arange(ref[i]["prompt"] - 1, ref[i]["length"] - 1)
        np.testing.assert_array_equal(b["teacher_values"][row, pos].numpy(), ref[i]["values"].astype(np.float32))
        np.testing.assert_array_equal(b["teacher_ids"][row, pos].numpy(), ref[i]["ids"])
    reader.close()


# ----------------------------------------------------------------------------- 3. refusals


def _line_of(by_file, index, nth=0):
    """(file, 1-based line) of the nth line holding ``index``."""
    hits = [(f, n + 1) for f, lines in sorted(by_file.items()) for n, o in enumerate(lines)
            if not isinstance(o, str) and o["index"] == index]
    return hits[nth]


def _first_diff(a, b):
    return next(j for j in range(min(len(a), len(b)) + 1) if j == min(len(a), len(b)) or a[j] != b[j])


def _refused(assets, tmp_path, **kw):
    from nemo_kd.migrate.aligner_logits import AlignerImportError

    files, by_file = _write_chunks(assets, tmp_path / "aligner", **kw)
    out = tmp_path / "store"
    with pytest.raises(AlignerImportError) as e:
        _import(assets, files, out)
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["aligner"]  # atomic: nothing half-written
    return str(e.value), by_file


@pytest.mark.parametrize("case", ["other_template", "edited_response"])
def test_refuses_logits_of_other_tokens(assets, tmp_path, case):
    tok, rows = assets["tok"], assets["rows"]
    if case == "other_template":
        msg, by_file = _refused(assets, tmp_path, template={3: "plain"})
        theirs = _aligner_ids(tok, rows[3], "plain")[0]
    else:  # Aligner read a data file whose sample 3 differs
        edited = [dict(r) for r in rows]
        edited[3]["response"] = rows[3]["response"].replace("because", "since")
        mine = dict(assets, rows=edited)
        msg, by_file = _refused(mine, tmp_path)
        theirs = _aligner_ids(tok, edited[3])[0]
    position = _first_diff(theirs, _aligner_ids(tok, rows[3])[0])
    assert case == "other_template" and position == 0 or case == "edited_response" and position > 10
    f, line = _line_of(by_file, 3)
    assert msg.startswith(f"{f}:{line}: index 3 ({assets['data']}:4): Aligner's tokens differ")  # its record's line
    assert f"differ from nemo_kd's tokenisation at token position {position}:" in msg
    assert "another tokenizer, chat template or length limit" in msg


def test_refuses_missing_samples(assets, tmp_path):
    def drop(by_file):
        for lines in by_file.values():
            lines[:] = [o for o in lines if o["index"] not in (2, 7)]

    msg, _ = _refused(assets, tmp_path, mutate=drop)
    assert f"2 of the {N} samples of {assets['data']} have no line in the Aligner file(s)" in msg
    assert "indices 2, 7." in msg


def test_refuses_conflicting_duplicate(assets, tmp_path):
    p = _aligner_ids(assets["tok"], assets["rows"][4])[2]

    def conflict(by_file):
        second = os.path.join(os.path.dirname(next(iter(by_file))), "train_with_logits_1.jsonl")
        (dup,) = _aligner_batch(assets["tok"], assets["rows"], [4])
        dup["topk_logits"][p][K - 1] -= 0.5  # another teacher run: a completion position's k-th logit differs
        by_file[second].append(dup)

    msg, by_file = _refused(assets, tmp_path, mutate=conflict)
    first, second = _line_of(by_file, 4, 0), _line_of(by_file, 4, 1)
    assert msg.startswith(f"{second[0]}:{second[1]}: index 4 appeared before at {first[0]}:{first[1]} with different "
                          "topk_logits at its completion positions")


def test_refuses_non_finite_logit(assets, tmp_path):
    p = _aligner_ids(assets["tok"], assets["rows"][5])[2]

    def nan(by_file):
        for lines in by_file.values():
            for o in lines:
                if o["index"] == 5:
                    o["topk_logits"][p + 1][2] = float("nan")  # json.dumps writes NaN, as Python's json does

    msg, by_file = _refused(assets, tmp_path, mutate=nan)
    f, line = _line_of(by_file, 5)
    expected = (f"{f}:{line}: index 5: field 'topk_logits' at position {p + 1} (it predicts completion token 2, "
                "0-based, of sample 5): non-finite value nan (entry 2): the teacher produced NaN/Inf logits")
    assert msg == expected
    # the CLI, parsing in two worker processes: exit status 2, the same message, nothing written
    proc = _run("nemo_kd.migrate.aligner_logits", *[a for f in sorted(by_file) for a in ("--aligner-jsonl", f)],
                "--data", assets["data"], "--tokenizer", assets["tok_path"], "--output", tmp_path / "store",
                "--max-seq-length", MAX_LEN, "--workers", 2, "--no-progress")
    assert proc.returncode == 2 and proc.stderr.strip() == f"nemo-kd-import-aligner-logits: error: {expected}"
    assert sorted(os.listdir(tmp_path)) == ["aligner"]


_MALFORMED = {
    "malformed": (lambda o: json.dumps(o)[:-20], "malformed JSON"),
    "missing_ids": (lambda o: {k: v for k, v in o.items() if k != "topk_token_ids"},
                    "missing field(s) ['topk_token_ids']"),
    "missing_logits_and_index": (lambda o: {k: v for k, v in o.items() if k not in ("topk_logits", "index")},
                                 "missing field(s) ['index', 'topk_logits']"),
    "ragged": (lambda o: dict(o, topk_logits=o["topk_logits"][:3] + [o["topk_logits"][3][:-1]] + o["topk_logits"][4:]),
               f"field 'topk_logits' is ragged: position 0 has k={K} entries, position 3 has {K - 1}"),
    "vocab": (lambda o: dict(o, topk_token_ids=[[r[0] + 10_000] + r[1:] for r in o["topk_token_ids"]]),
              "is outside the vocabulary [0, 300)"),
    "index": (lambda o: dict(o, index=N + 5), f"field 'index' = {N + 5} is outside --data"),
}


@pytest.mark.parametrize("case", sorted(_MALFORMED))
def test_refuses_malformed_lines(assets, tmp_path, case):
    edit, expected = _MALFORMED[case]
    where = {}

    def mutate(by_file):
        f = sorted(by_file)[0]
        n = next(n for n, o in enumerate(by_file[f]) if o["index"] == 1)
        by_file[f][n] = edit(by_file[f][n])
        where.update(file=f, line=n + 1)

    msg, _ = _refused(assets, tmp_path, mutate=mutate)
    assert msg.startswith(f"{where['file']}:{where['line']}: ") and expected in msg, msg


# ----------------------------------------------------------------------------- 4. --help stays light

_PROBE = r"""
import importlib, json, sys
module = sys.argv[1]
try:
    importlib.import_module(module).main(["--help"])
except SystemExit as e:
    code = e.code
print(json.dumps(dict(code=code, heavy=sorted({m.split(".")[0] for m in sys.modules} & {"torch", "megatron",
      "transformers", "nemo", "lightning", "omegaconf"}))))
"""


@pytest.mark.parametrize("module", ["nemo_kd.migrate.aligner_config", "nemo_kd.migrate.aligner_logits"])
def test_help_imports_no_torch_or_megatron(module):
    proc = subprocess.run([sys.executable, "-c", _PROBE, module], capture_output=True, text=True, env=_env(),
                          cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    *text, last = proc.stdout.strip().splitlines()
    report = json.loads(last)
    assert report == {"code": 0, "heavy": []}, report
    usage = "\n".join(text)
    assert "usage:" in usage and ("--aligner-jsonl" in usage) == module.endswith("aligner_logits")


def test_migrated_config_trains_on_the_imported_logits(assets, tmp_path):
    """The whole way over, as a user takes it: the Aligner YAML migrated, its top-k JSONL imported where the
    migrated config says, the `???` the report lists given on the command line, and examples/train_gpt_kd.py
    trains on it (Aligner's bf16 and distributed_fused_adam: Megatron's bf16 path and distributed optimizer)."""
    import torch

    files, _ = _write_chunks(assets, tmp_path / "aligner")
    chunk = os.path.join(str(tmp_path / "aligner"), "train_with_logits_CHUNK_ID.jsonl")
    src, out = tmp_path / "aligner_kd.yaml", tmp_path / "migrated.yaml"
    src.write_text(yaml.safe_dump({
        "name": "megatron_gpt_knowledge_distillation",
        "trainer": {"num_nodes": 1, "devices": 1, "accelerator": "auto", "precision": "bf16",
                    "knowledge_distillation": {"max_steps": 3, "save_interval": 2, "limit_val_batches": 1.0},
                    "max_steps": "${.knowledge_distillation.max_steps}"},
        "exp_manager": {"explicit_log_dir": str(tmp_path / "run"), "create_checkpoint_callback": True},
        "pretrained_checkpoint": {"restore_from_path": None},
        "model": {"micro_batch_size": 2, "global_batch_size": 4, "tensor_model_parallel_size": 1, "seed": 3,
                  "megatron_amp_O2": True,
                  "knowledge_distillation": {"kd_loss": "fwd_kl", "kd_loss_weight": 1.0, "sft_loss_weight": 0.5,
                                             "logits_scale": 1.0, "target_logits_scale": 1.0},
                  "data": {"data_impl": "jsonl", "n_chunks": 2, "seq_length": MAX_LEN, "top_k": K,
                           "data_prefix": {"train": [chunk]}},
                  "optim": {"name": "distributed_fused_adam", "lr": 1e-3, "weight_decay": 0.01, "betas": [0.9, 0.98],
                            "sched": {"name": "CosineAnnealing", "warmup_steps": 1, "constant_steps": 0,
                                      "min_lr": 1e-4, "max_steps": 3}}},
    }))
    proc = _run("nemo_kd.migrate.aligner_config", src, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    migrated = yaml.safe_load(out.read_text())
    store = _get(migrated, "model.data.train_ds.logits_store")
    assert store == os.path.join(str(tmp_path / "aligner"), "train_with_logits.nemo_kd_store")
    assert _get(migrated, "trainer.precision") == "bf16-mixed"
    assert _get(migrated, "model.optim.use_distributed_optimizer") is True
    # the report's next step, run as printed but for the placeholders it asks the user to fill
    (step,) = [line.strip()[2:] for line in proc.stdout.splitlines()
               if line.strip().startswith("- nemo-kd-import-aligner-logits")]
    for placeholder, value in (("<model.data.train_ds.file_path>", assets["data"]),
                               ("<student tokenizer dir>", assets["tok_path"])):
        assert placeholder in step, step
        step = step.replace(placeholder, value)
    args = step.split()[1:]
    assert args[args.index("--max-seq-length") + 1] == str(MAX_LEN) and args[args.index("--top-k") + 1] == str(K)
    assert [args[i + 1] for i, a in enumerate(args) if a == "--aligner-jsonl"] == files  # both chunks
    proc = _run("nemo_kd.migrate.aligner_logits", *args, "--values-dtype", "fp32", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]

    vocab = len(assets["tok"])
    arch = dict(num_layers=1, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, vocab_size=vocab,
                max_position_embeddings=64)
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "examples", "train_gpt_kd.py"), "--config-path", str(tmp_path),
         "--config-name", "migrated", f"model.data.train_ds.file_path={assets['data']}",
         f"model.data.train_ds.tokenizer={assets['tok_path']}", "model.student_init=null",
         *[f"model.student.{k}={v}" for k, v in arch.items()], "trainer.enable_progress_bar=false",
         "exp_manager.create_tensorboard_logger=false"],
        capture_output=True, text=True, env=_env(),
        cwd=str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ckpts = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    assert ckpts == ["megatron_gpt_knowledge_distillation--step=2.ckpt",
                     "megatron_gpt_knowledge_distillation--step=3-last.ckpt"], ckpts
    common = torch.load(str(tmp_path / "run" / "checkpoints" / ckpts[-1] / "common.pt"), weights_only=True)
    assert common["engine_step"] == 3
    assert (tmp_path / "run" / "student.nemo").is_file()
    assert "student dtype: bf16" in proc.stdout + proc.stderr
