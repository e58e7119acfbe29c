"""Dual preference distillation end to end on the main job's cipher task (CPU, minutes).

    python benchmarks/bench_dual_preference.py                       # uses / makes runs/main_job
    python benchmarks/bench_dual_preference.py --main-job runs/main_job --out runs/dual_pref --steps 150

The main job leaves a clean teacher (``teacher.nemo``) and an SFT student trained on noisy
labels (``student_SFT_only.nemo``: it has learned the annotator's letter confusions). This
script runs the product path of the Nanbeige4 recipe on the student's own training prompts:

1. :mod:`nemo_kd.generation.preference_pipeline` – student negatives (4 samples, T = 1),
   teacher positives (2 samples, T = 0.7), rule-based scores (the cipher's checker: answer ==
   the correct encoding), response filters, the pair-wise filter (margin 1: a correct
   positive vs an incorrect negative) → ``pairs.jsonl``;
2. ``compute_topk_logits`` over the pairs (teacher top-k on both sides + its sequence log-probs);
3. the SFT student fine-tuned from its ``.nemo`` on the pairs with the same steps, batches
   and learning rate under four objectives: **dual** (``L_DPKD + L_pos + L_neg``),
   **pos-KD** (``L_pos`` only: token-level KD on the teacher's responses, i.e. sequence-level
   KD), **pos+neg KD** (``L_pos + L_neg``, no preference term) and **DPKD only**;
4. greedy exact match on the 256 clean test prompts (+ on prompts with a confused letter),
   held-out KL to the teacher; a table and ``results.json``.

Ratios and numbers come from this one run; nothing is hard-coded.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--main-job", default="runs/main_job")
    p.add_argument("--out", default="runs/dual_preference")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--pairs-batch", type=int, default=16, help="pairs per global batch")
    p.add_argument("--variants", nargs="*", default=["dual", "pos-KD", "pos+neg KD", "DPKD only"])
    a = p.parse_args(argv)
    import main_job as mj

    torch.set_num_threads(2)
    mj._quiet()
    t_start = time.time()
    if not os.path.exists(os.path.join(a.main_job, "student_SFT_only.nemo")):
        print(f"[0] no main job at {a.main_job}: running it", flush=True)
        mj.run(a.main_job, mj.JobConfig())
    cfg = mj.JobConfig()
    os.makedirs(a.out, exist_ok=True)

    from nemo_kd.data import read_records
    from nemo_kd.data.kd_dataset import DistillationDataset
    from nemo_kd.data.synthetic_task import CipherTask, TaskConfig
    from nemo_kd.data.tokenization import ConversationTokenizer
    from nemo_kd.evaluation import heldout_metrics
    from nemo_kd.generation.preference_pipeline import PreferencePipelineConfig, run as build_pairs
    from nemo_kd.models.distillation_model import GPTDistillationModel
    from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel
    from nemo_kd.teacher.extract import ExtractConfig, compute_topk_logits
    from nemo_kd.teacher.store import StoreReader
    from nemo_kd.teacher.teachers import MegatronTeacher
    from transformers import AutoTokenizer

    task = CipherTask(TaskConfig(sizes=dict(cfg.sizes), seed=cfg.seed))
    data = os.path.join(a.main_job, "data")
    tok_dir = os.path.join(a.main_job, "tokenizer")
    teacher_path = os.path.join(a.main_job, "teacher.nemo")
    student_path = os.path.join(a.main_job, "student_SFT_only.nemo")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    max_len = cfg.seq_length + 1
    rows = {s: [json.loads(line) for line in open(os.path.join(data, f"{s}.jsonl"))] for s in ("transfer", "test")}

    # prompts of the student's own training set, each with the checker's correct answer
    prompts = os.path.join(a.out, "prompts.jsonl")
    with open(prompts, "w") as f:
        for r in rows["transfer"]:
            f.write(json.dumps({"id": r["id"], "prompt": r["prompt"], "reference": task.answer(r["prompt"])}) + "\n")

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(mj._free_port()))
    initialize_parallel(ParallelConfig(seed=cfg.seed))
    results, timings = {}, {}
    try:
        # 1. pairs
        t0 = time.time()
        print("[1/4] teacher positives vs student negatives -> pairs", flush=True)
        max_new = 2 * task.cfg.max_len + 2
        report = build_pairs(PreferencePipelineConfig.from_dict(dict(
            prompts=prompts, output_dir=os.path.join(a.out, "pairs"), max_seq_length=max_len, batch_size=128,
            teacher=dict(checkpoint=teacher_path, tokenizer=tok_dir, num_samples=2,
                         sampling=dict(temperature=0.7, max_new_tokens=max_new, seed=1)),
            student=dict(checkpoint=student_path, tokenizer=tok_dir, num_samples=4,
                         sampling=dict(temperature=1.0, max_new_tokens=max_new, seed=2)),
            score="reference", pair_filter=dict(min_margin=1.0))))
        pairs_file = os.path.join(a.out, "pairs", "pairs.jsonl")
        timings["pairs"] = time.time() - t0

        # 2. teacher top-k over both sides of every pair
        t0 = time.time()
        print(f"[2/4] teacher top-{cfg.top_k} over {report['pairs']} pairs", flush=True)
        store = os.path.join(a.out, "store")
        compute_topk_logits(ExtractConfig(data_path=pairs_file, output_path=store, top_k=cfg.top_k,
                                          max_seq_length=max_len, values_dtype="float32", batch_size=64,
                                          progress=True), MegatronTeacher(teacher_path), tok)
        timings["store"] = time.time() - t0

        test_records = read_records(os.path.join(data, "test.jsonl"))
        ctok = ConversationTokenizer(tok, "chat", max_len, "truncate")
        test_ds = DistillationDataset(test_records, ctok, store=StoreReader(os.path.join(a.main_job, "store_test")),
                                      k=cfg.top_k)
        test_batches = mj._eval_batches(test_ds, cfg, tok.pad_token_id)

        # 3. the SFT student before and after, under each objective
        base = GPTDistillationModel.restore_from(student_path, map_location=torch.device("cpu"))
        base.eval()
        results["SFT student (start)"] = dict(**heldout_metrics(base.engine, test_batches),
                                              **mj._generate_em(base.student, tok, rows["test"], task, "eval start", cfg))
        arch = {k: base.cfg.student[k] for k in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size")}
        del base
        objectives = {
            "dual": dict(kd_loss_weight=1.0, positive_kd_weight=1.0, negative_kd_weight=1.0, dpo_loss_weight=1.0),
            "pos-KD": dict(kd_loss_weight=1.0, positive_kd_weight=1.0, negative_kd_weight=0.0, dpo_loss_weight=0.0),
            "pos+neg KD": dict(kd_loss_weight=1.0, positive_kd_weight=1.0, negative_kd_weight=1.0,
                               dpo_loss_weight=0.0),
            "DPKD only": dict(kd_loss_weight=0.0, dpo_loss_weight=1.0),
        }
        histories = {}
        for name in a.variants:
            t0 = time.time()
            print(f"[3/4] {name}: {a.steps} steps on {report['pairs']} pairs", flush=True)
            loss = dict(kd_loss_type="forward_kl", topk_convention="exact_tail", sft_loss_weight=0.0,
                        preference_loss_type="dpkd", preference_beta=a.beta, **objectives[name])
            mcfg = mj._model_config(cfg, arch, len(tok), pairs_file, tok_dir, store, loss, a.steps, cfg.seed + 7)
            mcfg.student_init = student_path
            mcfg.optim.lr, mcfg.optim.min_lr, mcfg.optim.warmup_steps = a.lr, a.lr * 0.1, 10
            mcfg.data.train_ds.micro_batch_size = mcfg.data.train_ds.global_batch_size = 2 * a.pairs_batch
            model, histories[name], _ = mj._fit(name, mcfg, a.steps, os.path.join(a.out, "logs"))
            model.eval()
            results[name] = dict(**heldout_metrics(model.engine, test_batches),
                                 **mj._generate_em(model.student, tok, rows["test"], task, f"eval {name}", cfg))
            del model
            timings[name] = time.time() - t0
    finally:
        destroy_parallel()

    # 4. report
    lines = ["| student | held-out CE | KL(teacher‖student) | exact match | EM, confused letters | EM, others |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['loss']:.4f} | {r['kl']:.4f} | {r['exact_match']:.3f} | "
                     f"{r['exact_match_confused']:.3f} | {r['exact_match_other']:.3f} |")
    table = "\n".join(lines)
    timings["total"] = time.time() - t_start
    summary = (f"pairs {report['pairs']} of {report['prompts']} prompts; mean verifier score teacher "
               f"{report['mean_score_teacher']:.3f}, student {report['mean_score_student']:.3f}")
    print("\n" + summary + "\n\n" + table + "\n\ntimings (s): " +
          ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), flush=True)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"args": vars(a), "pairs_report": report, "results": results, "timings_s": timings,
                   "histories": histories}, f, indent=1, default=str)
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write(f"# Dual preference distillation on the cipher task\n\n{summary}\n\n{table}\n")
    return {"results": results, "report": report, "table": table}


if __name__ == "__main__":
    main()
