"""Train a GPT student by knowledge distillation (NeMo + Megatron-core), then save ``student.nemo``.

    python examples/train_gpt_kd.py model.data.train_ds.file_path=train.jsonl \
        model.data.train_ds.logits_store=/stores/train model.data.train_ds.tokenizer=/tok
    python examples/train_gpt_kd.py --config-name gpt_kd_online model.teacher.checkpoint=/ckpt ...
    torchrun --nproc-per-node 8 examples/train_gpt_kd.py trainer.devices=8 model.parallel.tensor_model_parallel_size=2 ...

See ``conf/gpt_kd.yaml`` (offline teacher store) and ``conf/gpt_kd_online.yaml`` (online teacher).
The whole config is checked first (``nemo_kd.training.run_config``): unknown keys, conflicting
precision settings and NeMo-Aligner keys at their old places are refused before anything is
built. A preemption signal (SIGUSR1 from ``#SBATCH --signal``, or SIGTERM) saves a checkpoint
after the current step and exits 0 without ``student.nemo``; rerun with
``exp_manager.resume_if_exists=true`` to continue (``examples/slurm/*.sbatch`` requeue themselves).
A resumed run leaves what an uninterrupted one leaves (``nemo_kd.training.resume``): TensorBoard
steps continue without a duplicate or a shift, checkpoint names get no ``-v1``, and the run holds
a lock on its checkpoint directory from start to end (a second training into the same run
directory is refused, naming the first); at the start, with the lock held, what a killed run
left there is repaired and named in the log (temporary directories of unfinished saves included).
"""

import os

import nemo_kd  # noqa: F401  first: registers the "nemo_kd." allow-list and quiets optional-extras warnings

import lightning.pytorch as pl
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import OmegaConf

from nemo.core.config import hydra_runner
from nemo.utils import logging
from nemo.utils.exp_manager import exp_manager

from nemo_kd.models.distillation_model import GPTDistillationModel
from nemo_kd.parallel import ParallelConfig
from nemo_kd.parallel.strategy import MegatronStrategy
from nemo_kd.training.preemption import PreemptionCheckpoint
from nemo_kd.training.resume import ResumeContinuity, TrainingRunLock
from nemo_kd.training.run_config import prepare_run_config


@hydra_runner(config_path="../conf", config_name="gpt_kd")
def main(cfg) -> None:
    run = prepare_run_config(cfg)  # strict keys, one precision setting, device, checkpoint cadence
    logging.info(f"\n{OmegaConf.to_yaml(cfg)}")
    logging.info(f"device: {run.accelerator}, student dtype: {run.params_dtype}, validation: {run.validation}")
    # One writer per run directory, held from before exp_manager reads the checkpoints (to pick the one to
    # resume from) until the end; what a killed predecessor left there is repaired now, with the lock held.
    # A second training into the same directory stops here, naming the first, before anything is changed.
    with TrainingRunLock().acquire(cfg.get("exp_manager")) as run_lock:
        preemption = PreemptionCheckpoint(run.preemption_signals)
        preemption.install()  # before the models load: a signal now is kept for the first step (uninstall: after)
        try:
            strategy = MegatronStrategy(ParallelConfig.from_dict(cfg.model.parallel))
            # Under Slurm, Lightning would requeue on SIGUSR1 itself; the batch script does (examples/slurm/common.sh)
            plugins = [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []
            trainer = pl.Trainer(strategy=strategy, callbacks=[preemption, ResumeContinuity()], plugins=plugins,
                                 **OmegaConf.to_container(cfg.trainer))
            log_dir = exp_manager(trainer, cfg.get("exp_manager"))
            run_lock.attach(trainer)  # the directory exp_manager chose, if it was not known before (a new version)
            model = GPTDistillationModel(cfg.model, trainer=trainer)
            trainer.fit(model)
        finally:
            preemption.uninstall()
        if preemption.preempted:
            logging.info(f"preempted at step {trainer.global_step}: checkpoint saved under {log_dir}; "
                         "resume with exp_manager.resume_if_exists=true")
            return
        path = os.path.join(str(log_dir), "student.nemo")
        model.save_to(path)
        if trainer.is_global_zero:
            logging.info(f"student saved to {path}")


if __name__ == "__main__":
    main()
