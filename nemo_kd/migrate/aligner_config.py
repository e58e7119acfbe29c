"""NeMo-Aligner's knowledge-distillation config keys and where nemo_kd keeps them.

NeMo-Aligner's KD recipe (``examples/nlp/gpt/conf/gpt_knowledge_distillation.yaml``,
``train_gpt_knowledge_distillation.py``) keeps the parallel layout and batch sizes at the top
of ``model``, the KD settings under ``model.knowledge_distillation`` (``kd_loss: fwd_kl |
bwd_kl``), the run length under ``trainer.knowledge_distillation`` and the starting checkpoint
under ``pretrained_checkpoint``. nemo_kd's strict config check
(:mod:`nemo_kd.training.run_config`) names the new place of such a key instead of ignoring it.

Pure data and string work (no imports of the package): any layer may use it.
"""

from __future__ import annotations

from typing import Dict, Optional

__all__ = ["ALIGNER_RENAMES", "ALIGNER_VALUE_NOTES", "aligner_key_hint"]

# Aligner dotted key -> nemo_kd dotted key.
ALIGNER_RENAMES: Dict[str, str] = {
    "model.knowledge_distillation": "model.kd",
    "model.knowledge_distillation.kd_loss": "model.kd.kd_loss_type",
    "model.knowledge_distillation.kd_loss_weight": "model.kd.kd_loss_weight",
    "model.knowledge_distillation.sft_loss_weight": "model.kd.sft_loss_weight",
    "model.knowledge_distillation.logits_scale": "model.kd.logits_scale",
    "model.knowledge_distillation.target_logits_scale": "model.kd.target_logits_scale",
    "model.tensor_model_parallel_size": "model.parallel.tensor_model_parallel_size",
    "model.pipeline_model_parallel_size": "model.parallel.pipeline_model_parallel_size",
    "model.virtual_pipeline_model_parallel_size": "model.parallel.virtual_pipeline_model_parallel_size",
    "model.context_parallel_size": "model.parallel.context_parallel_size",
    "model.seed": "model.parallel.seed",
    "model.micro_batch_size": "model.data.train_ds.micro_batch_size",
    "model.global_batch_size": "model.data.train_ds.global_batch_size",
    "model.encoder_seq_length": "model.data.train_ds.max_seq_length",
    "model.data.seq_length": "model.data.train_ds.max_seq_length",
    "model.data.data_prefix": "model.data.train_ds.file_path (and model.data.validation_ds.file_path)",
    "model.optim.betas": "model.optim.adam_beta1 / model.optim.adam_beta2",
    "model.optim.sched": "model.optim (warmup_steps, min_lr, decay_style, decay_steps)",
    "model.optim.sched.warmup_steps": "model.optim.warmup_steps",
    "model.optim.sched.min_lr": "model.optim.min_lr",
    "model.optim.sched.max_steps": "model.optim.decay_steps",
    "model.optim.sched.name": "model.optim.decay_style",
    "model.restore_from_path": "model.student_init",
    "pretrained_checkpoint": "model.student_init",
    "pretrained_checkpoint.restore_from_path": "model.student_init",
    "trainer.knowledge_distillation": "trainer (max_steps, val_check_interval, ...) and exp_manager",
    "trainer.knowledge_distillation.max_steps": "trainer.max_steps",
    "trainer.knowledge_distillation.max_epochs": "trainer.max_steps (nemo_kd counts steps)",
    "trainer.knowledge_distillation.val_check_interval": "trainer.val_check_interval",
    "trainer.knowledge_distillation.save_interval": "exp_manager.checkpoint_callback_params.every_n_train_steps",
    "trainer.knowledge_distillation.limit_val_batches": "trainer.limit_val_batches",
    "trainer.knowledge_distillation.gradient_clip_val": "model.optim.clip_grad",
    "model.gradient_clip_val": "model.optim.clip_grad",
}

# How values change on the way (for the hint).
ALIGNER_VALUE_NOTES: Dict[str, str] = {
    "model.knowledge_distillation.kd_loss": "kd_loss: fwd_kl -> forward_kl, bwd_kl -> reverse_kl",
    "model.knowledge_distillation": "kd_loss: fwd_kl|bwd_kl becomes kd_loss_type: forward_kl|reverse_kl",
    "model.optim.sched.name": "CosineAnnealing -> cosine",
}


def aligner_key_hint(dotted_key: str) -> Optional[str]:
    """One sentence for a NeMo-Aligner key found at its old place, ``None`` for other keys."""
    new = ALIGNER_RENAMES.get(dotted_key)
    if new is None:
        return None
    note = ALIGNER_VALUE_NOTES.get(dotted_key)
    return f"NeMo-Aligner key {dotted_key}; nemo_kd calls it {new}" + (f" ({note})" if note else "")
