#!/usr/bin/env python
"""Teacher positives vs student negatives → filtered preference pairs; see conf/build_preference_pairs.yaml
and :mod:`nemo_kd.generation.preference_pipeline`.

    python examples/build_preference_pairs.py prompts=prompts.jsonl output_dir=/data/pairs teacher.checkpoint=... \
        student.checkpoint=...
    torchrun --nproc-per-node 8 examples/build_preference_pairs.py ...
"""

import hydra


@hydra.main(config_path="../conf", config_name="build_preference_pairs", version_base=None)
def main(cfg) -> None:
    from nemo_kd.generation.preference_pipeline import run_from_config  # here, not above: `--help` needs no torch

    run_from_config(cfg)  # prints a summary on global rank 0


if __name__ == "__main__":
    main()
