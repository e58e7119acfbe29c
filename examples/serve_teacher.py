#!/usr/bin/env python
"""Serve a teacher over HTTP in vLLM's dialect (issue 15); see conf/serve_teacher.yaml.

    python examples/serve_teacher.py teacher.path=/ckpt port=8000 max_logprobs=100
    python examples/compute_topk_logits.py teacher.type=served teacher.url=http://HOST:8000 \
        tokenizer_path=/ckpt top_k=100 data_path=train.jsonl output_path=/store

Same as the console script ``nemo-kd-serve-teacher``. Stops on Ctrl-C / SIGTERM.
"""

import hydra


@hydra.main(config_path="../conf", config_name="serve_teacher", version_base=None)
def main(cfg) -> None:
    from nemo_kd.teacher.server import run_from_config  # here, not above: `--help` needs no torch

    run_from_config(cfg)


if __name__ == "__main__":
    main()
