#!/usr/bin/env python
"""Store a teacher's top-k logits per completion token (issue 3); see conf/compute_topk_logits.yaml.

    python examples/compute_topk_logits.py data_path=train.jsonl teacher.path=/ckpt output_path=/store
    torchrun --nproc-per-node 4 examples/compute_topk_logits.py parallel.tensor_model_parallel_size=2 ...
    srun --ntasks-per-node 8 python examples/compute_topk_logits.py ...

Same as the console script ``nemo-kd-compute-topk-logits``. Resumes an interrupted run.
"""

import hydra


@hydra.main(config_path="../conf", config_name="compute_topk_logits", version_base=None)
def main(cfg) -> None:
    from nemo_kd.teacher.extract import run_from_config  # here, not above: `--help` needs no torch

    run_from_config(cfg)  # prints the summary on global rank 0


if __name__ == "__main__":
    main()
