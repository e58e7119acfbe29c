"""Train a GPT student by knowledge distillation (NeMo + Megatron-core), then save ``student.nemo``.

    python examples/train_gpt_kd.py model.data.train_ds.file_path=train.jsonl \
        model.data.train_ds.logits_store=/stores/train model.data.train_ds.tokenizer=/tok
    python examples/train_gpt_kd.py --config-name gpt_kd_online model.teacher.checkpoint=/ckpt ...
    torchrun --nproc-per-node 8 examples/train_gpt_kd.py trainer.devices=8 model.parallel.tensor_model_parallel_size=2 ...

See ``conf/gpt_kd.yaml`` (offline teacher store) and ``conf/gpt_kd_online.yaml`` (online teacher).
"""

import os

import lightning.pytorch as pl
from omegaconf import OmegaConf

from nemo.core.config import hydra_runner
from nemo.utils import logging
from nemo.utils.exp_manager import exp_manager

from nemo_kd.models.distillation_model import GPTDistillationModel
from nemo_kd.parallel import ParallelConfig
from nemo_kd.parallel.strategy import MegatronStrategy


@hydra_runner(config_path="../conf", config_name="gpt_kd")
def main(cfg) -> None:
    OmegaConf.resolve(cfg)  # the saved model config must not point at trainer.* any more
    logging.info(f"\n{OmegaConf.to_yaml(cfg)}")
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg["use_distributed_sampler"] = False
    strategy = MegatronStrategy(ParallelConfig.from_dict(cfg.model.parallel))
    trainer = pl.Trainer(strategy=strategy, **trainer_cfg)
    log_dir = exp_manager(trainer, cfg.get("exp_manager"))
    model = GPTDistillationModel(cfg.model, trainer=trainer)
    trainer.fit(model)
    path = os.path.join(str(log_dir), "student.nemo")
    model.save_to(path)
    if trainer.is_global_zero:
        logging.info(f"student saved to {path}")


if __name__ == "__main__":
    main()
