"""Every conf/*.yaml composes with Hydra and parses with the product's own config classes, so a
renamed option or a typo in a shipped config fails here rather than in a user's job."""

import dataclasses
import os

import pytest
from omegaconf import OmegaConf

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


def _compose(name, resolve=True):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF, version_base=None):
        return OmegaConf.to_container(compose(config_name=name), resolve=resolve)


def _fill(d, value="x"):
    """Required fields ('???') replaced by a placeholder, everything else as shipped."""
    if isinstance(d, dict):
        return {k: _fill(v, value) for k, v in d.items()}
    return value if d == "???" else d


def test_every_yaml_is_covered():
    assert sorted(f[:-5] for f in os.listdir(CONF) if f.endswith(".yaml")) == sorted(
        ["gpt_kd", "gpt_kd_online", "gpt_kd_served", "gpt_kd_preference", "compute_topk_logits",
         "build_preference_pairs", "build_dasd_data", "serve_teacher", "evaluate"])


@pytest.mark.parametrize("name", ["gpt_kd", "gpt_kd_online", "gpt_kd_served", "gpt_kd_preference"])
def test_training_configs_parse(name):
    from nemo_kd.generation.on_policy import OnPolicyConfig
    from nemo_kd.losses.objective import DistillationLossConfig
    from nemo_kd.models import GPTModelConfig
    from nemo_kd.models.engine import OptimConfig
    from nemo_kd.parallel import ParallelConfig
    from nemo_kd.training.run_config import DATA_KEYS, TEACHER_KEYS, prepare_run_config

    # the recipe's whole-config check (strict keys, precision, checkpointing), on the shipped file
    cfg = OmegaConf.create(_fill(_compose(name, resolve=False)))
    prepare_run_config(cfg, cuda_available=False)  # resolves cfg in place
    model = OmegaConf.to_container(cfg.model)
    GPTModelConfig.from_dict(model["student"])
    loss = DistillationLossConfig.from_dict(model["kd"])
    OptimConfig.from_dict(model["optim"])
    ParallelConfig.from_dict(model["parallel"])
    OnPolicyConfig.from_dict(model.get("on_policy"))
    assert set(model["teacher"]) <= TEACHER_KEYS
    assert set(model["data"]["train_ds"]) <= DATA_KEYS
    if name == "gpt_kd_preference":
        assert loss.dpo_loss_weight > 0 and loss.preference_loss_type == "dpkd"
        assert model["data"]["train_ds"]["micro_batch_size"] % 2 == 0  # pairs share a microbatch
    if name == "gpt_kd_online":
        assert model["teacher"]["mode"] == "online"
    if name == "gpt_kd_served":  # the shipped keys are the served training teacher's (checked as the model would)
        from nemo_kd.training.served_teacher import ServedTrainingConfig

        served = ServedTrainingConfig.from_teacher_section(dict(model["teacher"], url="http://127.0.0.1:8000"), loss)
        assert served.top_k == 20 and served.client.dialect == "auto"


def test_compute_topk_logits_config_parses():
    from nemo_kd.teacher.extract import RUN_CONFIG_KEYS, ExtractConfig, parse_teacher_section, run_from_config
    from nemo_kd.teacher.teachers import TeacherSpec

    c = _fill(_compose("compute_topk_logits"))
    spec, served = parse_teacher_section(c["teacher"])
    assert isinstance(spec, TeacherSpec) and spec.type == "megatron" and served is None
    # the shipped served-teacher keys parse into the client's settings with teacher.type=served
    spec, served = parse_teacher_section(dict(c["teacher"], type="served", path=None, url="http://127.0.0.1:8000"))
    assert spec.type == "served" and served.dialect == "auto" and served.concurrency >= 1
    with pytest.raises(ValueError, match="teacher.url: for teacher.type=served only"):
        parse_teacher_section(dict(c["teacher"], url="http://127.0.0.1:8000"))
    extract_fields = {f.name for f in dataclasses.fields(ExtractConfig)}
    assert set(c) <= extract_fields | RUN_CONFIG_KEYS, sorted(set(c) - extract_fields - RUN_CONFIG_KEYS)
    with pytest.raises(ValueError, match=r"unknown compute_topk_logits keys \['top-k'\]"):
        run_from_config(OmegaConf.create(dict(c, **{"top-k": 5})))


def test_serve_teacher_config_parses():
    from nemo_kd.teacher.server import RUN_CONFIG_KEYS, ServeConfig, run_from_config
    from nemo_kd.teacher.teachers import TeacherSpec

    c = _fill(_compose("serve_teacher"))
    TeacherSpec(**c["teacher"])
    fields = {f.name for f in dataclasses.fields(ServeConfig)}
    assert set(c) <= fields | RUN_CONFIG_KEYS, sorted(set(c) - fields - RUN_CONFIG_KEYS)
    serve = ServeConfig(**{k: v for k, v in c.items() if k in fields})
    assert serve.host == "127.0.0.1"  # loopback unless told otherwise
    with pytest.raises(ValueError, match=r"unknown serve_teacher keys \['max-logprobs'\]"):
        run_from_config(OmegaConf.create(dict(c, **{"max-logprobs": 5})))


def test_evaluate_config_parses_and_refuses_unknown_keys():
    from nemo_kd.evaluation.cli import run_from_config

    c = _fill(_compose("evaluate"))
    with pytest.raises(ValueError, match=r"unknown evaluate keys \['no_such_key'\]"):
        run_from_config(OmegaConf.create(dict(c, no_such_key=1)))


def test_pipeline_configs_parse():
    from nemo_kd.generation.dasd_pipeline import DASDPipelineConfig
    from nemo_kd.generation.filters import ResponseFilterConfig
    from nemo_kd.generation.pairs import PairFilterConfig
    from nemo_kd.generation.preference_pipeline import PreferencePipelineConfig

    pref = PreferencePipelineConfig.from_dict(_fill(_compose("build_preference_pairs")))
    PairFilterConfig(**pref.pair_filter).validate()
    ResponseFilterConfig(**pref.response_filter)
    pref.teacher.sampling_config(), pref.student.sampling_config()
    assert pref.student.num_samples >= 1 and pref.teacher.num_samples >= 1
    dasd = DASDPipelineConfig.from_dict(_fill(_compose("build_dasd_data")))
    ResponseFilterConfig(**dasd.response_filter)
    assert [s.temperature for s in dasd.stages] == [0.6, 1.0]  # DASD's schedule: low, then high
