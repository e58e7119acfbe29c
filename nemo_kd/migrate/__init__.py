"""Coming from NeMo-Aligner: its KD config keys and their nemo_kd names (:mod:`.aligner_config`)."""
