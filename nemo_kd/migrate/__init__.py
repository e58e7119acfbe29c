"""Coming from NeMo-Aligner (import-light: nothing here imports torch, Megatron or NeMo).

* :mod:`.aligner_config` – its KD config keys and their nemo_kd names; ``nemo-kd-migrate-aligner-config``
  converts a whole Aligner KD YAML.
* :mod:`.aligner_logits` – ``nemo-kd-import-aligner-logits`` imports the top-k JSONL teacher logits of
  Aligner's ``compute_topk_logits.py`` into a verified logits store joined to the dataset.
"""
