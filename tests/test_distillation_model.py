"""GPTDistillationModel under Lightning on CPU: offline-KD fit (loss falls), .nemo round trip, resume from
a Lightning checkpoint, config errors, online teacher, and (distributed) TP=2 fit + .nemo re-sharding.

Data made here: a byte-level BPE, 16 jsonl samples and a teacher top-k store written by
``compute_topk_logits`` from a random tiny Megatron teacher (same tokenizer, peaked logits).
"""

import json
import math
import os
import socket

import pytest
import torch

MAX_LEN, K, N = 40, 8, 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _arch(vocab):
    return dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                vocab_size=vocab, max_position_embeddings=64)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A world of one for the whole module + the data assets."""
    from nemo_kd.data.tokenizer_builder import train_byte_level_bpe
    from nemo_kd.models import GPTModelConfig, build_gpt_model
    from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel
    from nemo_kd.teacher.extract import ExtractConfig, compute_topk_logits
    from nemo_kd.teacher.teachers import MegatronTeacher, save_full_checkpoint

    old = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    d = tmp_path_factory.mktemp("kdmodel")
    texts = [f"question {i}: what is {i} plus {i * 3}? answer: {i + i * 3}, because adding numbers works." for i in range(40)]
    tok = train_byte_level_bpe(texts, vocab_size=300, save_dir=str(d / "tok"))
    data = str(d / "train.jsonl")
    with open(data, "w") as f:
        for i in range(N):
            f.write(json.dumps({"id": i, "prompt": f"what is {i} plus {i * 3}?",
                                "response": f"{i + i * 3} because adding" + " numbers" * (i % 3)}) + "\n")
    initialize_parallel(ParallelConfig(seed=5))
    try:
        cfg = GPTModelConfig(**_arch(len(tok)))
        full = {k: v for k, v in build_gpt_model(cfg).state_dict().items() if torch.is_tensor(v)}
        full["output_layer.weight"] = full["output_layer.weight"] * 40
        save_full_checkpoint(str(d / "teacher"), full, cfg)
        compute_topk_logits(ExtractConfig(data_path=data, output_path=str(d / "store"), top_k=K,
                                          max_seq_length=MAX_LEN, values_dtype="float32", batch_size=4,
                                          progress=False), MegatronTeacher(str(d / "teacher")), tok)
        yield dict(dir=d, tok_dir=str(d / "tok"), vocab=len(tok), data=data, store=str(d / "store"),
                   teacher=str(d / "teacher"))
    finally:
        destroy_parallel()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _cfg(world, **over):
    from omegaconf import OmegaConf

    ds = dict(file_path=world["data"], logits_store=world["store"], tokenizer=world["tok_dir"], prompt_format="chat",
              max_seq_length=MAX_LEN, micro_batch_size=2, global_batch_size=4, seed=1)
    cfg = OmegaConf.create(dict(
        student=_arch(world["vocab"]), teacher=dict(mode="offline"),
        kd=dict(kd_loss_type="forward_kl", kd_loss_weight=1.0, sft_loss_weight=0.5, topk_convention="exact_tail"),
        optim=dict(lr=1e-2, warmup_steps=1), parallel=dict(seed=7),
        data=dict(train_ds=ds, validation_ds=dict(ds, shuffle=False)), max_steps=8,
    ))
    for key, value in over.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def _trainer(tmp, steps, callbacks=(), devices=1):
    import lightning.pytorch as pl

    from nemo_kd.parallel.strategy import MegatronStrategy

    class Record(pl.Callback):
        def __init__(self):
            self.rows = []

        def on_train_batch_end(self, trainer, *args):
            self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    rec = Record()
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=MegatronStrategy(), max_steps=steps,
                         use_distributed_sampler=False, logger=False, enable_checkpointing=bool(callbacks),
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=1, val_check_interval=steps, check_val_every_n_epoch=None,
                         callbacks=[rec, *callbacks], default_root_dir=str(tmp))
    return trainer, rec


@pytest.fixture(scope="module")
def offline_run(world, tmp_path_factory):
    from nemo_kd.models.distillation_model import GPTDistillationModel

    trainer, rec = _trainer(tmp_path_factory.mktemp("fit"), 8)
    model = GPTDistillationModel(_cfg(world), trainer=trainer)
    init = {k: v.detach().clone() for k, v in model.student.state_dict().items() if torch.is_tensor(v)}
    trainer.fit(model)
    return model, trainer, rec.rows, init


def test_offline_fit_loss_falls_then_nemo_round_trip(world, offline_run, tmp_path):
    from nemo_kd.models.distillation_model import GPTDistillationModel

    model, trainer, rows, _ = offline_run
    assert trainer.global_step == 8 and model.consumed_samples == 32
    assert len(rows) == 8
    for key in ("kd_loss", "sft_loss", "teacher_student_kd", "token_agreement", "lr", "grad_norm", "tokens/s"):
        assert key in rows[-1], key
    first = sum(r["loss"] for r in rows[:2]) / 2
    last = sum(r["loss"] for r in rows[-2:]) / 2
    assert last < 0.8 * first, [r["loss"] for r in rows]
    assert "val_loss" in trainer.callback_metrics

    # .nemo round trip: identical student logits
    path = str(tmp_path / "student.nemo")
    model.save_to(path)
    restored = GPTDistillationModel.restore_from(path, map_location=torch.device("cpu"))
    x = torch.randint(0, world["vocab"], (2, 16))
    model.eval(), restored.eval()
    with torch.no_grad():
        a, b = model(x), restored(x)
    assert torch.equal(a, b)
    assert restored.consumed_samples == 0 and restored._train_dl is None  # no data needed to restore


def test_bad_configs_fail_at_construction(world):
    from nemo_kd.models.distillation_model import GPTDistillationModel
    from nemo_kd.teacher.store import StoreMismatchError

    with pytest.raises(ValueError, match="kd_loss_type='nope'"):
        GPTDistillationModel(_cfg(world, **{"kd.kd_loss_type": "nope"}))
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) must be divisible by tensor_model_parallel_size \(3\)"):
        GPTDistillationModel(_cfg(world, **{"parallel.tensor_model_parallel_size": 3}))
    with pytest.raises(StoreMismatchError, match="max_seq_length"):  # the store was made with MAX_LEN
        GPTDistillationModel(_cfg(world, **{"data.train_ds.max_seq_length": MAX_LEN - 8}))
    with pytest.raises(ValueError, match="unknown model.teacher keys"):
        GPTDistillationModel(_cfg(world, **{"teacher.path": "x"}))


def test_online_teacher_fit(world, tmp_path):
    from nemo_kd.models.distillation_model import GPTDistillationModel

    cfg = _cfg(world, **{"teacher": {"mode": "online", "checkpoint": world["teacher"]},
                         "data.train_ds.logits_store": None, "data.validation_ds": None, "max_steps": 6})
    trainer, rec = _trainer(tmp_path, 6)
    model = GPTDistillationModel(cfg, trainer=trainer)
    assert model.engine.teacher is not None
    assert not any(k.startswith("engine") or "teacher" in k for k in model.state_dict())
    trainer.fit(model)
    losses = [r["kd_loss"] for r in rec.rows]
    assert trainer.global_step == 6 and losses[-1] < losses[0], losses
    # the teacher is frozen: its weights equal the checkpoint's
    full = torch.load(os.path.join(world["teacher"], "full_state_dict.pt"))
    sd = model.engine.teacher.state_dict()
    assert torch.equal(sd["output_layer.weight"], full["output_layer.weight"])


def _tp2_fit_save_restore(rank, world_size, world, tmp, x):
    from nemo_kd.models.distillation_model import GPTDistillationModel
    from nemo_kd.parallel import destroy_parallel, state

    import lightning.pytorch as pl
    from nemo_kd.parallel.strategy import MegatronStrategy

    try:
        trainer = pl.Trainer(accelerator="cpu", devices=world_size, strategy=MegatronStrategy(), max_steps=2,
                             use_distributed_sampler=False, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                             limit_val_batches=0, default_root_dir=tmp)
        model = GPTDistillationModel(_cfg(world, **{"parallel.tensor_model_parallel_size": 2,
                                                    "data.validation_ds": None}), trainer=trainer)
        trainer.fit(model)
        assert trainer.global_step == 2 and state.tp_size() == 2
        path = os.path.join(tmp, "tp2.nemo")
        model.save_to(path)
        restored = GPTDistillationModel.restore_from(path, map_location=torch.device("cpu"))
        model.eval(), restored.eval()
        with torch.no_grad():
            a, b = model(x), restored(x)
        assert torch.equal(a, b)
        return a  # this rank's vocab shard
    finally:
        destroy_parallel()


@pytest.mark.distributed
@pytest.mark.slow
def test_tp2_fit_and_nemo_restores_at_tp1(world, tmp_path):
    """TP=2 under torch.distributed (2 processes): fit, .nemo holds the full student, restores at TP=1 too."""
    from dist_utils import run_distributed

    from nemo_kd.models.distillation_model import GPTDistillationModel

    x = torch.randint(0, world["vocab"], (2, 16))
    shards = run_distributed(_tp2_fit_save_restore, 2, world, str(tmp_path), x)
    tp2 = torch.cat(shards, dim=-1)[..., : world["vocab"]]
    restored = GPTDistillationModel.restore_from(str(tmp_path / "tp2.nemo"), map_location=torch.device("cpu"))
    restored.eval()
    with torch.no_grad():
        tp1 = restored(x)[..., : world["vocab"]]
    torch.testing.assert_close(tp1, tp2, rtol=1e-4, atol=1e-4)


def test_resume_from_lightning_checkpoint_continues_exactly(world, offline_run, tmp_path):
    """4 steps + checkpoint, then resume to 8: weights, Megatron optimizer/scheduler and data position
    come back, so steps 5-8 repeat the uninterrupted run's losses."""
    import lightning.pytorch as pl

    from nemo_kd.models.distillation_model import GPTDistillationModel

    _, _, ref_rows, init = offline_run
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=4, save_top_k=-1)
    trainer, _ = _trainer(tmp_path, 4, callbacks=[ckpt])
    model = GPTDistillationModel(_cfg(world), trainer=trainer)
    model.student.load_state_dict(init, strict=False)  # the reference run's initial weights
    trainer.fit(model)
    path = [os.path.join(ckpt.dirpath, f) for f in os.listdir(ckpt.dirpath)][0]

    trainer2, rec2 = _trainer(tmp_path / "resumed", 8)
    model2 = GPTDistillationModel(_cfg(world), trainer=trainer2)
    trainer2.fit(model2, ckpt_path=path)
    assert trainer2.global_step == 8 and model2.consumed_samples == 32
    got = [r["loss"] for r in rec2.rows]
    want = [r["loss"] for r in ref_rows[4:]]
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6), (got, want)


def test_nemo_serves_as_teacher(world, offline_run, tmp_path):
    """A distilled student's .nemo loads as the next round's teacher (compute_topk_logits / online mode):
    MegatronTeacher's logits equal the model's own forward on the same tokens."""
    from nemo_kd.teacher.teachers import MegatronTeacher, teacher_hash

    model, _, _, _ = offline_run
    path = str(tmp_path / "round1.nemo")
    model.save_to(path)
    teacher = MegatronTeacher(path)
    assert teacher.vocab_size == world["vocab"] and teacher.hash == teacher_hash(path)
    x = torch.randint(0, world["vocab"], (3, 12), generator=torch.Generator().manual_seed(3))
    got = {}
    teacher.run(x, lambda row, logits, group: got.__setitem__(row, logits.clone()), micro_batch_size=3)
    model.eval()
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(got[0][..., : world["vocab"]], want[..., : world["vocab"]], rtol=1e-5, atol=1e-5)

    with pytest.raises(ValueError, match="not a nemo_kd .nemo"):
        import tarfile

        bad = tmp_path / "bad.nemo"
        with tarfile.open(bad, "w") as tar:
            tar.add(world["data"], arcname="model_config.yaml")
        MegatronTeacher(str(bad))


def test_sft_only_mode_needs_no_store(world, tmp_path):
    """teacher.mode=none: the SFT baseline trains from the dataset alone; a KD weight is refused."""
    from nemo_kd.models.distillation_model import GPTDistillationModel

    with pytest.raises(ValueError, match="kd_loss_weight=0"):
        GPTDistillationModel(_cfg(world, **{"teacher.mode": "none"}))
    cfg = _cfg(world, **{"teacher.mode": "none", "kd.kd_loss_weight": 0.0, "kd.sft_loss_weight": 1.0,
                         "data.train_ds.logits_store": None, "data.validation_ds": None, "max_steps": 6})
    trainer, rec = _trainer(tmp_path, 6)
    model = GPTDistillationModel(cfg, trainer=trainer)
    trainer.fit(model)
    losses = [r["sft_loss"] for r in rec.rows]
    assert trainer.global_step == 6 and losses[-1] < 0.9 * losses[0], losses
    assert "kd_loss" not in rec.rows[-1] or rec.rows[-1]["kd_loss"] == 0.0


def test_student_init_from_hf_keeps_rope_scaling_through_nemo(world, tmp_path):
    """student_init: an HF Llama with llama3 RoPE scaling starts the student; the .nemo records the
    architecture GPTModelConfig cannot express, so the restored model still reproduces HF's logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from nemo_kd.models.distillation_model import GPTDistillationModel

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=world["vocab"], hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8}))
    hf.save_pretrained(tmp_path / "hf")
    cfg = _cfg(world, **{"student_init": str(tmp_path / "hf"), "teacher.mode": "none", "kd.kd_loss_weight": 0.0,
                         "data.train_ds.logits_store": None, "data.validation_ds": None})
    model = GPTDistillationModel(cfg)
    assert model.cfg.student_hf_architecture.rope_scaling.rope_type == "llama3" and model.cfg.student_init is None
    x = torch.randint(0, world["vocab"], (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = hf(input_ids=x).logits
        model.eval()
        got = model(x)[..., : world["vocab"]]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    path = str(tmp_path / "init.nemo")
    model.save_to(path)
    restored = GPTDistillationModel.restore_from(path, map_location=torch.device("cpu"))
    restored.eval()
    with torch.no_grad():
        assert torch.equal(restored(x), model(x))
    # ... it exports back to Hugging Face (the distilled student shipped as one): tensors bit-identical
    from transformers import AutoModelForCausalLM

    from nemo_kd.convert.checkpoint_io import convert_megatron_to_hf

    convert_megatron_to_hf(path, str(tmp_path / "hf_out"), tokenizer_dir=world["tok_dir"], progress=False)
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf_out"))
    assert exported.config.rope_scaling["rope_type"] == "llama3"
    ref_sd = hf.state_dict()
    for k, v in exported.state_dict().items():
        assert torch.equal(v, ref_sd[k]), k
    assert os.path.exists(tmp_path / "hf_out" / "tokenizer.json")
    # ... and the .nemo starts the next round's student (student_init accepts .nemo too)
    again = GPTDistillationModel(_cfg(world, **{"student_init": path, "teacher.mode": "none", "kd.kd_loss_weight": 0.0,
                                                "data.train_ds.logits_store": None, "data.validation_ds": None}))
    again.eval()
    assert again.cfg.student_hf_architecture.rope_scaling.factor == 8.0
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def _tp2_fit_and_checkpoint(rank, world_size, world, ckpt_dir, init, over):
    import lightning.pytorch as pl

    from nemo_kd.models import GPTModelConfig, shard_state_dict
    from nemo_kd.models.distillation_model import GPTDistillationModel
    from nemo_kd.parallel import destroy_parallel, state
    from nemo_kd.parallel.strategy import MegatronStrategy

    try:
        ckpt = pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=4, save_top_k=-1)
        trainer = pl.Trainer(accelerator="cpu", devices=world_size, strategy=MegatronStrategy(), max_steps=4,
                             use_distributed_sampler=False, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                             callbacks=[ckpt], default_root_dir=ckpt_dir)
        model = GPTDistillationModel(_cfg(world, **over, **{"parallel.tensor_model_parallel_size": 2,
                                                            "data.validation_ds": None}), trainer=trainer)
        cfg = GPTModelConfig.from_dict(dict(model.cfg.student))
        model.student.load_state_dict(shard_state_dict(init, cfg, state.tp_rank(), 2, 0, 1), strict=False)
        trainer.fit(model)
        return trainer.global_step
    finally:
        destroy_parallel()


@pytest.mark.distributed
@pytest.mark.slow
def test_checkpoint_saved_at_tp2_resumes_at_tp1(world, tmp_path):
    """Kill-and-resume across layouts: 4 steps at TP=2 + dist checkpoint, resumed at TP=1 to step 8,
    repeats an uninterrupted TP=1 run (losses of steps 5-8 and final weights)."""
    from dist_utils import run_distributed

    from nemo_kd.models.checkpointing import CheckpointLayoutError
    from nemo_kd.models.distillation_model import GPTDistillationModel

    over = {"student.vocab_size": 512}  # pads to 512 rows at TP=1 and TP=2: optimizer state reshards
    trainer, ref = _trainer(tmp_path / "ref", 8)
    model = GPTDistillationModel(_cfg(world, **over), trainer=trainer)
    init = {k: v.detach().clone() for k, v in model.student.state_dict().items() if torch.is_tensor(v)}
    trainer.fit(model)
    final = {k: v.detach().clone() for k, v in model.student.state_dict().items() if torch.is_tensor(v)}

    ckpt_dir = str(tmp_path / "ckpt")
    assert run_distributed(_tp2_fit_and_checkpoint, 2, world, ckpt_dir, init, over) == [4, 4]
    (name,) = [f for f in os.listdir(ckpt_dir) if f.endswith(".ckpt")]
    path = os.path.join(ckpt_dir, name)
    assert os.path.isdir(os.path.join(path, "weights"))

    trainer2, rec2 = _trainer(tmp_path / "resumed", 8)
    model2 = GPTDistillationModel(_cfg(world, **over), trainer=trainer2)
    trainer2.fit(model2, ckpt_path=path)
    assert trainer2.global_step == 8 and model2.consumed_samples == 32
    got = [r["loss"] for r in rec2.rows]
    want = [r["loss"] for r in ref.rows[4:]]
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5), (got, want)
    for k, v in model2.student.state_dict().items():
        if torch.is_tensor(v):
            torch.testing.assert_close(v, final[k], rtol=1e-4, atol=1e-5, msg=k)

    # A layout whose vocabulary padding differs cannot take the optimizer state: refused, named.
    trainer3, _ = _trainer(tmp_path / "refused", 8)
    model3 = GPTDistillationModel(_cfg(world), trainer=trainer3)  # vocab ~300: 384 padded rows at TP=1
    with pytest.raises(CheckpointLayoutError, match="another student architecture"):
        trainer3.fit(model3, ckpt_path=path)


def test_exact_tail_teacher_temperature_refused_at_construction(world):
    from nemo_kd.models.distillation_model import GPTDistillationModel

    with pytest.raises(ValueError, match="temperature 1"):
        GPTDistillationModel(_cfg(world, **{"kd.target_logits_scale": 0.5}))  # _cfg uses exact_tail


def test_preference_pairs_offline_dpkd_matches_hand_computation(world, tmp_path):
    """A pair file (teacher-style chosen vs student-style rejected) → compute_topk_logits → the NeMo model:
    both sides of every pair share a microbatch, and the DPKD + L_pos + L_neg objective of a batch equals a
    float64 hand computation from the student's and the teacher's own forward passes."""
    import math

    from transformers import AutoTokenizer

    from nemo_kd.models.distillation_model import GPTDistillationModel
    from nemo_kd.teacher.extract import ExtractConfig, compute_topk_logits
    from nemo_kd.teacher.teachers import MegatronTeacher, load_megatron_teacher

    pairs = str(tmp_path / "pairs.jsonl")
    with open(pairs, "w") as f:
        for i in range(N // 2):
            f.write(json.dumps({"id": f"q{i}", "prompt": f"what is {i} plus {i * 3}?",
                                "chosen": f"{i + i * 3} because adding numbers",
                                "rejected": "numbers" + " adding" * (1 + i % 3)}) + "\n")
    tok = AutoTokenizer.from_pretrained(world["tok_dir"])
    store = str(tmp_path / "pair_store")
    compute_topk_logits(ExtractConfig(data_path=pairs, output_path=store, top_k=K, max_seq_length=MAX_LEN,
                                      values_dtype="float32", batch_size=4, progress=False),
                        MegatronTeacher(world["teacher"]), tok)
    beta, w_pos, w_neg = 0.5, 1.0, 0.25
    cfg = _cfg(world, **{"data.train_ds.file_path": pairs, "data.train_ds.logits_store": store,
                         "data.validation_ds": None, "kd.sft_loss_weight": 0.0, "kd.dpo_loss_weight": 1.0,
                         "kd.preference_loss_type": "dpkd", "kd.preference_beta": beta,
                         "kd.positive_kd_weight": w_pos, "kd.negative_kd_weight": w_neg, "max_steps": 2})
    model = GPTDistillationModel(cfg)
    steps = list(model._train_dl)
    assert len(steps) == N // 4  # 16 rows = 8 pairs, global batch of 4 rows
    for step in steps:
        for mb in step:  # every microbatch holds whole pairs, chosen (role 1) with rejected (role 2)
            ids, roles = mb["pair_ids"].tolist(), mb["roles"].tolist()
            assert sorted(roles) == [1, 2] and len(set(ids)) == 1
    seen = sorted(int(mb["pair_ids"][0]) for step in steps for mb in step)
    assert seen == list(range(N // 2))

    # Hand computation for the first step's batch: log-probs in float64 from both models' logits.
    batch = steps[0]
    teacher, _ = load_megatron_teacher(world["teacher"], 0, 1, 0, 1)
    model.eval()
    kd_sum, kd_tokens, pref_terms = 0.0, 0, []
    for mb in batch:
        with torch.no_grad():
            # Megatron's padded vocabulary rows are not tokens: neither the student's softmax (the
            # objective masks them) nor the teacher's stored distribution (compute_topk_logits) spans them
            s = model(mb["inputs"]).double()[..., :world["vocab"]]
            t = teacher(mb["inputs"], mb["position_ids"], None).double()[..., :world["vocab"]]
        ls, lt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
        mask = mb["loss_mask"].bool()
        seq = {}
        for row in range(mb["inputs"].shape[0]):
            m = mask[row]
            lab = mb["labels"][row][m]
            # exact_tail forward KL over the teacher's top-K + one tail bucket (the config's convention)
            top = torch.topk(lt[row][m], K, dim=-1)
            p, q = top.values.exp(), ls[row][m].gather(-1, top.indices).exp()
            p_tail, q_tail = (1 - p.sum(-1)).clamp(min=0), (1 - q.sum(-1)).clamp(min=1e-30)
            kl = (p * (p.log() - q.log())).sum(-1) + torch.where(p_tail > 0, p_tail * (p_tail.log() - q_tail.log()), 0)
            w = w_pos if int(mb["roles"][row]) == 1 else w_neg
            kd_sum += w * float(kl.sum())
            kd_tokens += int(m.sum())
            seq[int(mb["roles"][row])] = (float(ls[row][m].gather(-1, lab[:, None]).sum()),
                                          float(lt[row][m].gather(-1, lab[:, None]).sum()), int(m.sum()))
        (qw, pw, nw), (ql, pl, nl) = seq[1], seq[2]
        u = beta * (qw - pw) / nw - beta * (ql - pl) / nl
        pref_terms.append(-math.log(1 / (1 + math.exp(-u))))
    out = model.engine.eval_step(batch)
    assert out["kd_loss"] == pytest.approx(kd_sum / kd_tokens, rel=1e-4)
    assert out["preference_loss"] == pytest.approx(sum(pref_terms) / len(pref_terms), rel=1e-4)
    assert out["loss"] == pytest.approx(kd_sum / kd_tokens + sum(pref_terms) / len(pref_terms), rel=1e-4)


def test_on_policy_steps_train_on_the_students_own_samples(world, tmp_path):
    """GKD: with on_policy.fraction=1 every step's completions are the current student's samples
    (prompts kept, loss mask on the sample and its end token); the batch the engine trains on is
    exactly resample_step's, drawn reproducibly; a fit runs with the online teacher."""
    import types

    from nemo_kd.generation.on_policy import resample_step, use_student_samples, OnPolicyConfig
    from nemo_kd.generation.sampling import SamplingConfig, generate
    from nemo_kd.models.distillation_model import GPTDistillationModel

    over = {"teacher": {"mode": "online", "checkpoint": world["teacher"]}, "data.train_ds.logits_store": None,
            "data.validation_ds": None, "max_steps": 3, "kd.kd_loss_type": "jsd", "kd.sft_loss_weight": 0.0,
            "on_policy": {"fraction": 1.0, "temperature": 1.0, "max_new_tokens": 12, "seed": 3}}
    with pytest.raises(ValueError, match="needs teacher.mode=online"):
        GPTDistillationModel(_cfg(world, **{"on_policy": {"fraction": 0.5}}))
    model = GPTDistillationModel(_cfg(world, **over))
    batch = next(iter(model._train_dl))
    seen = []
    model.engine.train_step = lambda mbs: seen.append(mbs) or {"loss": 0.0}
    model.optimizers = lambda: types.SimpleNamespace(step=lambda: None)
    model.log = lambda *a, **k: None
    model.training_step(batch, 0)
    ids = model._sampling_ids
    want = resample_step(model.engine.module, batch, model._on_policy, step=0, global_batch_size=4, dp_rank=0, **ids)
    for got, exp, orig in zip(seen[0], want, batch):
        for key in ("inputs", "labels", "loss_mask", "position_ids"):
            assert torch.equal(got[key], exp[key]), key
        for r in range(orig["inputs"].shape[0]):
            tokens = torch.cat([orig["inputs"][r, :1], orig["labels"][r]])
            new = torch.cat([got["inputs"][r, :1], got["labels"][r]])
            p = int(torch.cat([torch.zeros(1), orig["loss_mask"][r]]).nonzero()[0])
            assert torch.equal(new[:p], tokens[:p])  # the prompt is kept
            completion = new[p:][torch.cat([torch.zeros(1), got["loss_mask"][r]])[p:] > 0].tolist()
            # the completion is the student's own sample for this prompt, drawn as global row r
            g = generate(model.engine.module, [tokens[:p].tolist()], SamplingConfig(temperature=1.0, seed=3,
                         max_new_tokens=12), eos_id=ids["eos_id"], pad_id=ids["pad_id"], vocab_size=ids["vocab_size"],
                         max_length=tokens.numel(), sample_offset=r + (2 if orig is batch[1] else 0))[0]
            assert completion == g.token_ids + ([ids["eos_id"]] if g.finished else [])
            assert len(completion) > 0
    assert "teacher_values" not in seen[0][0]
    half = OnPolicyConfig(fraction=0.3, seed=1)
    share = sum(use_student_samples(half, s) for s in range(2000)) / 2000
    assert abs(share - 0.3) < 0.04 and use_student_samples(half, 17) == use_student_samples(half, 17)

    trainer, rec = _trainer(tmp_path, 3)
    model = GPTDistillationModel(_cfg(world, **over), trainer=trainer)
    trainer.fit(model)
    assert [r["on_policy"] for r in rec.rows] == [1.0, 1.0, 1.0]
    assert all(math.isfinite(r["kd_loss"]) and r["kd_loss"] > 0 for r in rec.rows)


def test_throughput_counts_real_tokens_and_the_bar_shows_configured_terms(world, offline_run):
    from nemo_kd.data.kd_dataset import collate
    from nemo_kd.models.distillation_model import GPTDistillationModel, _global_token_counts, _global_tokens

    model, _, rows, _ = offline_run
    # the progress bar: the loss, the weighted terms (KD 1.0, SFT 0.5; no preference term) and the rate
    assert model._progress_bar == {"loss", "kd_loss", "sft_loss", "lr"}
    sft_only = GPTDistillationModel(_cfg(world, **{"teacher.mode": "none", "kd.kd_loss_weight": 0.0,
                                                   "kd.sft_loss_weight": 1.0}))
    assert sft_only._progress_bar == {"loss", "sft_loss", "lr"}
    # tokens/s counts the real tokens of the step; padded_tokens/s the whole [gbs, seq] grid
    ds = model._train_dl.dataset.dataset
    mbs = [collate([ds[i] for i in (0, 1)], MAX_LEN, 0), collate([ds[i] for i in (2, 3)], MAX_LEN, 0)]
    want = sum(min(len(ds[i].input_ids), MAX_LEN) for i in range(4))
    assert want < 4 * MAX_LEN and _global_tokens(mbs) == want
    # loss_tokens/s: the completion tokens the loss trains on, counted by hand from each sample's mask
    # (label t is token t+1: the mask from the second token on, within the row)
    want_loss = sum(int(ds[i].loss_mask[1:MAX_LEN + 1].sum()) for i in range(4))
    assert 0 < want_loss < want and _global_token_counts(mbs) == (want, want_loss)
    for row in rows:
        assert 0 < row["loss_tokens/s"] < row["tokens/s"] < row["padded_tokens/s"]
