#!/usr/bin/env python
"""DASD distillation data (temperature stages, filters, divergence-aware selection, mixed policy) →
one train.jsonl per stage; see conf/build_dasd_data.yaml and :mod:`nemo_kd.generation.dasd_pipeline`.

    python examples/build_dasd_data.py prompts=questions.jsonl output_dir=/data/dasd teacher.checkpoint=... \
        student.checkpoint=...
    torchrun --nproc-per-node 8 examples/build_dasd_data.py ...
"""

import hydra


@hydra.main(config_path="../conf", config_name="build_dasd_data", version_base=None)
def main(cfg) -> None:
    from nemo_kd.generation.dasd_pipeline import run_from_config  # here, not above: `--help` needs no torch

    run_from_config(cfg)  # prints a summary per stage on global rank 0


if __name__ == "__main__":
    main()
