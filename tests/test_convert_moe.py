"""Hugging Face <-> Megatron conversion of mixture-of-experts families (Mixtral, Qwen3-MoE).

Tiny random ``transformers`` models (4 experts, top-2, hidden 64, 2 layers; every parameter
randomised, the routers included, so a mis-mapped expert or router changes the logits):

* Mixtral: every layer sparse, top-k renormalised (Megatron's top-k-then-softmax router);
* Qwen3-MoE: qk-norm, ``mlp_only_layers=[0]`` (a dense first layer of ``intermediate_size``),
  ``norm_topk_prob=False`` (Megatron's ``moe_router_pre_softmax``) and YaRN RoPE scaling.

Checked: logits parity with transformers fp32 (<= 1e-4 max abs) at TP=1, TP=2 and EP=2 (two gloo
processes; EP=2 splits the experts, tokens travel through Megatron's all-to-all dispatcher), a
checkpoint saved at EP=2 loading at EP=1, HF -> Megatron -> HF bit-identical tensors and config
fields, and the refusals (an MoE model exported as a dense family, a Mixtral with dense layers).
"""

import json
import os
import warnings

import pytest
import torch

from dist_utils import run_distributed
from hf_models import (check_loads_at_ep1, check_logits_match_hf_tp1, check_parallel_results,
                       check_round_trip_bit_identical, max_diff, megatron_logits, parallel_conversion_worker,
                       random_hf_model)

import safetensors  # noqa: E402,F401  (requirements.txt installs both: missing, the module fails, never skips)
import transformers  # noqa: E402,F401

SEQ, BATCH = 12, 2
ATOL = 1e-4


def _hf_configs():
    from transformers import MixtralConfig, Qwen3MoeConfig

    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, num_experts_per_tok=2)
    return {
        "mixtral": MixtralConfig(**common, intermediate_size=48, num_local_experts=4, vocab_size=320,
                                 sliding_window=None),
        "qwen3_moe": Qwen3MoeConfig(**common, intermediate_size=96, moe_intermediate_size=48, num_experts=4,
                                    vocab_size=300, head_dim=16, mlp_only_layers=[0], decoder_sparse_step=1,
                                    norm_topk_prob=False,
                                    # YaRN (Qwen3's long-context setting, scaled down): changes frequencies and cos/sin
                                    rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                     "original_max_position_embeddings": 16}),
    }


FAMILIES = list(_hf_configs())


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Per family: HF dir, reference tokens / logits, and the TP=1 Megatron conversion."""
    from nemo_kd.convert import convert_hf_to_megatron

    root = tmp_path_factory.mktemp("convert_moe")
    out = {}
    for seed, (family, config) in enumerate(_hf_configs().items()):
        model = random_hf_model(config, seed)
        hf_dir = str(root / f"{family}_hf")
        model.save_pretrained(hf_dir)
        tokens = torch.randint(0, config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            logits = model(tokens).logits
        megatron_dir = str(root / f"{family}_megatron")
        convert_hf_to_megatron(hf_dir, megatron_dir, progress=False)
        out[family] = dict(hf_dir=hf_dir, megatron_dir=megatron_dir, tokens=tokens, logits=logits.numpy(),
                           vocab_size=config.vocab_size)
    return out


def test_architecture_mapping(zoo):
    from nemo_kd.convert import hf_config_to_architecture, read_hf_config

    mixtral = hf_config_to_architecture(read_hf_config(zoo["mixtral"]["hf_dir"])).model
    assert (mixtral.num_moe_experts, mixtral.moe_router_topk, mixtral.moe_ffn_hidden_size) == (4, 2, 48)
    assert mixtral.moe_layer_pattern() == [1, 1] and not mixtral.moe_router_pre_softmax
    qwen = hf_config_to_architecture(read_hf_config(zoo["qwen3_moe"]["hf_dir"])).model
    assert qwen.moe_layer_pattern() == [0, 1] and qwen.moe_router_pre_softmax and qwen.qk_layernorm
    assert (qwen.ffn_hidden_size, qwen.moe_ffn_hidden_size, qwen.kv_channels) == (96, 48, 16)
    assert qwen.position_embedding_type == "yarn" and qwen.yarn_rotary_scaling_factor == 4.0
    assert (qwen.yarn_original_max_position_embeddings, qwen.yarn_correction_range_round_to_int) == (16, True)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_hf_tp1(zoo, family):
    check_logits_match_hf_tp1(zoo[family], ATOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_bit_identical(zoo, tmp_path, family):
    check_round_trip_bit_identical(zoo[family], str(tmp_path / "hf_out"), (
        "num_local_experts", "num_experts_per_tok", "intermediate_size", "moe_intermediate_size", "mlp_only_layers",
        "decoder_sparse_step", "norm_topk_prob", "architectures", "model_type"))


# ---------------------------------------------------------------- TP=2, EP=2 over gloo
@pytest.mark.distributed
def test_logits_match_hf_tp2_and_ep2(zoo, tmp_path):
    """TP=2 and EP=2 (each rank 2 of the 4 experts, tokens through the all-to-all dispatcher) load to
    transformers' logits, from HF and from the TP=1 conversion; the EP=2 load, saved, loads at EP=1."""
    cases = {f: {k: zoo[f][k] for k in ("hf_dir", "megatron_dir", "tokens", "logits", "vocab_size")} for f in FAMILIES}
    layouts = {"tp2": dict(tensor_model_parallel_size=2), "ep2": dict(expert_model_parallel_size=2)}
    results = run_distributed(parallel_conversion_worker, 2, cases, layouts, str(tmp_path))
    check_parallel_results(results, ATOL)
    for rank_results in results:
        assert sorted(rank_results) == sorted((layout, f) for layout in layouts for f in FAMILIES)
        for (layout, family), r in rank_results.items():  # EP=2: local experts 0, 1 (of 2); TP=2: all 4, cut
            assert r["experts"] == ({0, 1} if layout == "ep2" else {0, 1, 2, 3}), (layout, family)
    for family in FAMILIES:  # saved at EP=2, loaded at EP=1
        check_loads_at_ep1(str(tmp_path / family), zoo[family], ATOL)


# ---------------------------------------------------------------- refusals
def test_refusals_name_the_field(zoo):
    from nemo_kd.convert import (UnsupportedHFConfigError, architecture_to_hf_config, hf_config_to_architecture,
                                 read_hf_config)

    arch = hf_config_to_architecture(read_hf_config(zoo["qwen3_moe"]["hf_dir"]))
    arch.family = "qwen3"
    with pytest.raises(ValueError, match=r"cannot export as qwen3: GPTModelConfig.num_moe_experts is 4"):
        architecture_to_hf_config(arch)
    arch.family = "mixtral"  # layer 0 is dense
    with pytest.raises(ValueError, match=r"cannot export as mixtral: GPTModelConfig.moe_layer_freq=\[0, 1\]"):
        architecture_to_hf_config(arch)
    mixtral = read_hf_config(zoo["mixtral"]["hf_dir"])
    with pytest.raises(UnsupportedHFConfigError, match="'router_jitter_noise'"):
        hf_config_to_architecture({**mixtral, "router_jitter_noise": 0.1})
    dense = hf_config_to_architecture({**mixtral, "architectures": ["MistralForCausalLM"], "model_type": "mistral"})
    dense.family = "mixtral"
    with pytest.raises(ValueError, match=r"num_moe_experts is null \(a dense model\)"):
        architecture_to_hf_config(dense)
    # a different sparse pattern is written back in Qwen3-MoE's own spelling
    arch.family = "qwen3_moe"
    arch.model.moe_layer_freq = [1, 0]
    written = architecture_to_hf_config(arch)
    assert (written["decoder_sparse_step"], written["mlp_only_layers"]) == (1, [1])
    assert json.loads(json.dumps(written)) == written


# ---------------------------------------------------------------- a converted MoE teacher in extraction
def _ep_extract(rank, world, ep, teacher_path, tok_dir, data, out):
    from transformers import AutoTokenizer

    from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel
    from nemo_kd.teacher.extract import compute_topk_logits
    from nemo_kd.teacher.teachers import MegatronTeacher
    from test_extract import _extract_cfg

    initialize_parallel(ParallelConfig(expert_model_parallel_size=ep, seed=5))
    try:
        summary = compute_topk_logits(_extract_cfg(out, data), MegatronTeacher(teacher_path),
                                      AutoTokenizer.from_pretrained(tok_dir))
        return summary.num_tokens
    finally:
        destroy_parallel()


@pytest.fixture(scope="module")
def extraction_assets(tmp_path_factory):
    from nemo_kd.data.tokenizer_builder import train_byte_level_bpe
    from test_extract import _texts, _write_data

    d = tmp_path_factory.mktemp("moe_extract")
    tok = train_byte_level_bpe(_texts(), vocab_size=300, save_dir=str(d / "tok"))
    data = str(d / "data.jsonl")
    _write_data(data)
    return dict(dir=d, tok=tok, tok_dir=str(d / "tok"), data=data)


@pytest.mark.distributed
def test_extraction_from_converted_mixtral_ep2_equals_ep1(zoo, extraction_assets):
    """compute_topk_logits with the converted Mixtral as teacher: EP=2 (DP=2, each rank half the experts
    and half the samples) writes the store EP=1 writes: top-k ids equal, values and LSE within fp32 rounding
    (not byte for byte: DP=2 batches other samples together, so padded lengths and GEMM shapes differ;
    measured max abs difference 1.4e-6)."""
    from dist_utils import WorldOfOne
    from test_extract import _assert_same_store, _extract_cfg

    from nemo_kd.teacher.extract import compute_topk_logits
    from nemo_kd.teacher.teachers import MegatronTeacher

    a = extraction_assets
    teacher = zoo["mixtral"]["megatron_dir"]
    assert len(a["tok"]) <= zoo["mixtral"]["vocab_size"]
    ep1, ep2 = str(a["dir"] / "store_ep1"), str(a["dir"] / "store_ep2")
    with WorldOfOne(seed=5):
        n1 = compute_topk_logits(_extract_cfg(ep1, a["data"]), MegatronTeacher(teacher), a["tok"]).num_tokens
    n2 = run_distributed(_ep_extract, 2, 2, teacher, a["tok_dir"], a["data"], ep2)
    assert n2 == [n1, n1] and n1 > 0
    _assert_same_store(ep2, ep1)  # ids exactly, values / LSE to 2e-5


# ---------------------------------------------------------------- a converted MoE student through the NeMo class
def _student_world(extraction_assets, tmp_path):
    from test_distillation_model import N

    data = str(tmp_path / "train.jsonl")
    with open(data, "w") as f:
        for i in range(N):
            f.write(json.dumps({"id": i, "prompt": f"what is {i} plus {i * 3}?",
                                "response": f"{i + i * 3} because adding" + " numbers" * (i % 3)}) + "\n")
    return dict(data=data, store=None, tok_dir=extraction_assets["tok_dir"], vocab=len(extraction_assets["tok"]))


def test_moe_student_from_hf_trains_restores_exports_and_resumes(zoo, extraction_assets, tmp_path):
    """student_init = the Mixtral HF directory: the NeMo model reproduces transformers' logits, trains (SFT,
    the loss falls), its .nemo restores to identical logits and exports back to a Mixtral HF directory
    with the trained weights, and a Lightning checkpoint at step 2 resumes to the uninterrupted run's losses."""
    import lightning.pytorch as pl
    from transformers import AutoModelForCausalLM

    from dist_utils import WorldOfOne
    from nemo_kd.convert.checkpoint_io import convert_megatron_to_hf
    from nemo_kd.models.distillation_model import GPTDistillationModel
    from test_distillation_model import _cfg, _trainer

    case = zoo["mixtral"]
    w = _student_world(extraction_assets, tmp_path)
    over = {"student_init": case["hf_dir"], "teacher.mode": "none", "kd.kd_loss_weight": 0.0,
            "kd.sft_loss_weight": 1.0, "data.train_ds.logits_store": None, "data.validation_ds": None, "max_steps": 4}
    x = case["tokens"]
    with WorldOfOne(seed=5):
        ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=2, save_top_k=-1)
        trainer, rec = _trainer(tmp_path / "fit", 4, callbacks=[ckpt])
        model = GPTDistillationModel(_cfg(w, **over), trainer=trainer)
        assert model.cfg.student_hf_architecture.family == "mixtral" and model._student_cfg.num_moe_experts == 4
        model.eval()
        with torch.no_grad():
            assert max_diff(model(x), case["logits"], case["vocab_size"]) <= ATOL
        trainer.fit(model)
        losses = [r["loss"] for r in rec.rows]
        assert trainer.global_step == 4 and losses[-1] < losses[0], losses
        path = str(tmp_path / "student.nemo")
        model.save_to(path)
        restored = GPTDistillationModel.restore_from(path, map_location=torch.device("cpu"))
        model.eval(), restored.eval()
        with torch.no_grad():
            trained = model(x)
            assert torch.equal(restored(x), trained)
        assert not torch.equal(trained[..., : case["vocab_size"]], torch.as_tensor(case["logits"]))  # it trained
        convert_megatron_to_hf(path, str(tmp_path / "hf_out"), tokenizer_dir=w["tok_dir"], progress=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf_out")).eval()
        assert type(exported).__name__ == "MixtralForCausalLM"
        with torch.no_grad():
            assert max_diff(trained, exported(x).logits, case["vocab_size"]) <= ATOL
        step2 = [os.path.join(ckpt.dirpath, f) for f in sorted(os.listdir(ckpt.dirpath)) if "step=2" in f][0]
        trainer2, rec2 = _trainer(tmp_path / "resumed", 4)
        resumed = GPTDistillationModel(_cfg(w, **over), trainer=trainer2)
        trainer2.fit(resumed, ckpt_path=step2)
        assert [r["loss"] for r in rec2.rows] == pytest.approx(losses[2:], rel=1e-5, abs=1e-6)


def restore_and_save(rank, world, parallel_fields, nemo_path, out_path, tokens):
    """A ``run_distributed`` body: restore the ``.nemo`` at the layout (``ParallelConfig`` fields), return its
    full-vocabulary logits of ``tokens`` and the shapes of this rank's expert tensors, then ``save_to`` (which
    gathers the layout's shards into the full model) to ``out_path``."""
    from nemo_kd.models.distillation_model import GPTDistillationModel
    from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelConfig(**parallel_fields, seed=5))
    try:
        model = GPTDistillationModel.restore_from(nemo_path, map_location=torch.device("cpu"))
        experts = {k: tuple(v.shape) for k, v in model.student.state_dict().items()
                   if ".local_experts." in k and torch.is_tensor(v)}
        logits = megatron_logits([model.student], tokens)
        model.save_to(out_path)
        return logits, experts
    finally:
        destroy_parallel()


@pytest.mark.distributed
def test_moe_nemo_restores_at_ep2_and_saves_every_expert(zoo, extraction_assets, tmp_path):
    """A Mixtral-initialised MoE student's .nemo restores at EP=2 (each rank cuts its 2 experts) with the EP=1
    logits, and save_to at EP=2 writes all 4 experts: the re-saved .nemo restores at EP=1 to identical logits."""
    from dist_utils import WorldOfOne
    from nemo_kd.models.distillation_model import GPTDistillationModel
    from test_distillation_model import _cfg

    case = zoo["mixtral"]
    w = _student_world(extraction_assets, tmp_path)
    over = {"student_init": case["hf_dir"], "teacher.mode": "none", "kd.kd_loss_weight": 0.0,
            "data.train_ds.logits_store": None, "data.validation_ds": None}
    path, resaved = str(tmp_path / "ep1.nemo"), str(tmp_path / "ep2.nemo")
    with WorldOfOne(seed=5):
        model = GPTDistillationModel(_cfg(w, **over))
        model.eval()
        with torch.no_grad():
            want = model(case["tokens"])
        model.save_to(path)
    got = run_distributed(restore_and_save, 2, dict(expert_model_parallel_size=2), path, resaved, case["tokens"])
    for logits, experts in got:  # each rank cut its 2 experts, renumbered 0 and 1
        assert experts and all(".local_experts.0." in k or ".local_experts.1." in k for k in experts)
        torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
    with WorldOfOne(seed=5):
        again = GPTDistillationModel.restore_from(resaved, map_location=torch.device("cpu"))
        again.eval()
        with torch.no_grad():
            assert torch.equal(again(case["tokens"]), want)


# ---------------------------------------------------------------- dense <-> MoE distillation (online teacher)
@pytest.mark.parametrize("direction", ["dense_student_moe_teacher", "moe_student_dense_teacher"])
def test_online_distillation_between_dense_and_moe(zoo, extraction_assets, tmp_path, direction):
    """Online KD across the dense / MoE boundary (same tokenizer): a dense student from the converted Mixtral
    teacher, and an MoE student (aux loss on, its router term logged) from a dense teacher. The engine's
    teacher reproduces transformers' logits (MoE teacher) and the KD loss falls over 4 steps."""
    from dist_utils import WorldOfOne
    from nemo_kd.models import GPTModelConfig, build_gpt_model
    from nemo_kd.models.distillation_model import GPTDistillationModel
    from nemo_kd.teacher.teachers import save_full_checkpoint
    from test_distillation_model import _arch, _cfg, _trainer

    case = zoo["mixtral"]
    w = _student_world(extraction_assets, tmp_path)
    vocab = case["vocab_size"]
    moe = dict(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=48, moe_aux_loss_coeff=0.01)
    with WorldOfOne(seed=5):
        if direction == "dense_student_moe_teacher":
            teacher, student = case["megatron_dir"], _arch(vocab)
        else:
            dense = GPTModelConfig(**_arch(vocab))
            full = {k: v for k, v in build_gpt_model(dense).state_dict().items() if torch.is_tensor(v)}
            full["output_layer.weight"] = full["output_layer.weight"] * 20  # peaked: a teacher worth following
            teacher = str(tmp_path / "dense_teacher")
            save_full_checkpoint(teacher, full, dense)
            student = dict(_arch(vocab), **moe)
        cfg = _cfg(w, **{"student": student, "teacher": {"mode": "online", "checkpoint": teacher},
                         "data.train_ds.logits_store": None, "data.validation_ds": None, "max_steps": 4})
        trainer, rec = _trainer(tmp_path / "fit", 4)
        model = GPTDistillationModel(cfg, trainer=trainer)
        assert model._student_cfg.is_moe == (direction == "moe_student_dense_teacher")
        if direction == "dense_student_moe_teacher":
            t = model.engine.teacher
            t.eval()
            x = case["tokens"]
            with torch.no_grad():
                logits = t(x, torch.arange(x.shape[1])[None].expand_as(x), None)
            assert max_diff(logits, case["logits"], vocab) <= ATOL
        trainer.fit(model)
    kd = [r["kd_loss"] for r in rec.rows]
    assert trainer.global_step == 4 and all(map(torch.isfinite, map(torch.tensor, kd))) and kd[-1] < kd[0], kd
    if direction == "moe_student_dense_teacher":
        assert all(r["router_loss"] > 0 for r in rec.rows), rec.rows[-1]


# ---------------------------------------------------------------- the expert-load logging interval of a NeMo run
def test_moe_load_logged_every_interval_steps(extraction_assets, tmp_path):
    """``model.moe_load_log_interval=2``: in a 4-step NeMo run of an MoE student, the loggers receive the
    per-layer expert load (``moe_tokens/layer{l}/expert{e}``, load entropy, max load, dropped share) at steps
    0 and 2 only, and the router terms at every step. A logged load is that step's routing: no capacity
    factor, so nothing dropped and each layer's counts sum to top-k times the same number of tokens.

    What a real logger receives is what is checked: Lightning's logger connector hands a logger every key
    ``self.log``-ged earlier in the epoch again with its last value, so the load goes to the loggers directly
    at its own steps (without that, steps 1 and 3 held stale copies of steps 0 and 2)."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import Logger

    from dist_utils import WorldOfOne
    from nemo_kd.models.distillation_model import GPTDistillationModel
    from nemo_kd.parallel.strategy import MegatronStrategy
    from test_distillation_model import _arch, _cfg

    class Recording(Logger):
        name, version = "recording", 0

        def __init__(self):
            super().__init__()
            self.by_step = {}

        def log_metrics(self, metrics, step=None):
            self.by_step.setdefault(step, {}).update({k: float(v) for k, v in metrics.items()})

        def log_hyperparams(self, *args, **kwargs):
            pass

    w = _student_world(extraction_assets, tmp_path)
    student = dict(_arch(w["vocab"]), num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=48,
                   moe_aux_loss_coeff=0.01)
    cfg = _cfg(w, **{"student": student, "teacher.mode": "none", "kd.kd_loss_weight": 0.0, "kd.sft_loss_weight": 1.0,
                     "data.train_ds.logits_store": None, "data.validation_ds": None, "max_steps": 4,
                     "moe_load_log_interval": 2})
    logger = Recording()
    with WorldOfOne(seed=5):
        trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=MegatronStrategy(), max_steps=4,
                             use_distributed_sampler=False, logger=logger, log_every_n_steps=1,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(tmp_path / "fit"))
        model = GPTDistillationModel(cfg, trainer=trainer)
        assert model.engine.router_terms.load_log_interval == 2
        trainer.fit(model)
    assert trainer.global_step == 4 and sorted(logger.by_step) == [0, 1, 2, 3], sorted(logger.by_step)
    steps = [logger.by_step[s] for s in range(4)]
    load_names = {f"moe_tokens/layer{layer}/expert{e}" for layer in (0, 1) for e in range(4)}
    load_names |= {f"moe_{what}/layer{layer}" for what in ("load_entropy", "max_load", "dropped") for layer in (0, 1)}
    for step, metrics in enumerate(steps):
        assert metrics["global_step"] == step + 1  # the steps completed (1 after the first), as trainer.global_step
        logged = {k for k in metrics if k.startswith(("moe_tokens/", "moe_load_entropy/", "moe_max_load/",
                                                      "moe_dropped/"))}
        assert logged == (load_names if step % 2 == 0 else set()), (step, sorted(logged))
        assert metrics["router_loss"] > 0 and metrics["moe_load_balancing_loss"] > 0, (step, sorted(metrics))
        if step % 2 == 0:
            per_layer = [sum(metrics[f"moe_tokens/layer{layer}/expert{e}"] for e in range(4)) for layer in (0, 1)]
            assert per_layer[0] == per_layer[1] > 0 and per_layer[0] % 2 == 0, per_layer
            assert metrics["moe_dropped/layer0"] == metrics["moe_dropped/layer1"] == 0.0
