"""The sequence-level recipes end to end on the main job's cipher task (CPU, minutes).

    python benchmarks/bench_sequence_pipelines.py dual            # uses / makes runs/main_job
    python benchmarks/bench_sequence_pipelines.py dasd --main-job runs/main_job --out runs/dasd
    python benchmarks/bench_sequence_pipelines.py gkd

The main job leaves a clean teacher (``teacher.nemo``) and an SFT student trained on noisy
labels (``student_SFT_only.nemo``: it has learned the annotator's letter confusions). Both
recipes start from them, on the student's own training prompts, through the product path
(the pipelines of :mod:`nemo_kd.generation`, ``compute_topk_logits``, the NeMo model with
``student_init`` from a ``.nemo``), and end with greedy exact match on the 256 clean test
prompts (+ on prompts with a confused letter) and the held-out KL to the teacher.

**dual** (Nanbeige4 §3.3): :mod:`~nemo_kd.generation.preference_pipeline` – student
negatives (4 samples, T = 1), teacher positives (2 samples, T = 0.7), rule-based scores (the
cipher's checker), the pair-wise filter (margin 1) → pairs → teacher top-k over both sides →
the student fine-tuned on the pairs with the same steps, batches and learning rate under
four objectives: **dual** (``L_DPKD + L_pos + L_neg``), **pos-KD** (``L_pos``: token-level
KD on the teacher's responses), **pos+neg KD** and **DPKD only**.

**dasd** (arXiv 2601.09088): :mod:`~nemo_kd.generation.dasd_pipeline` – teacher candidates
at T = 0.6 and T = 1.0 (4 each), filters, divergence-aware selection scored by the SFT
student, mixed-policy samples (student rollouts continued by the teacher) → one
``train.jsonl`` per stage → SFT on the teacher samples (DASD's loss), **low → high** (stage 2
from stage 1's ``.nemo``) vs one stage at **T = 1.0** and at **T = 0.6**, same steps in total.

**gkd** (arXiv 2306.13649): the student fine-tuned on the noisy transfer prompts with the
co-located teacher (online, generalised JSD β = 0.5), with a fraction λ ∈ {0, 0.5, 1} of
on-policy steps (the student's own samples replace the dataset's responses).

Numbers come from this one run; nothing is hard-coded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))


class Setting:
    """The main job's artefacts, the test evaluation and the student fine-tuning, shared by both recipes."""

    def __init__(self, main_job: str, out: str):
        import main_job as mj

        from nemo_kd.data import read_records
        from nemo_kd.data.kd_dataset import DistillationDataset
        from nemo_kd.data.synthetic_task import CipherTask, TaskConfig
        from nemo_kd.data.tokenization import ConversationTokenizer
        from nemo_kd.teacher.store import StoreReader
        from transformers import AutoTokenizer

        torch.set_num_threads(2)
        mj._quiet()
        if not os.path.exists(os.path.join(main_job, "student_SFT_only.nemo")):
            print(f"[0] no main job at {main_job}: running it", flush=True)
            mj.run(main_job, mj.JobConfig())
        self.mj, self.cfg, self.out = mj, mj.JobConfig(), out
        self.task = CipherTask(TaskConfig(sizes=dict(self.cfg.sizes), seed=self.cfg.seed))
        data = os.path.join(main_job, "data")
        self.tok_dir = os.path.join(main_job, "tokenizer")
        self.teacher = os.path.join(main_job, "teacher.nemo")
        self.student = os.path.join(main_job, "student_SFT_only.nemo")
        self.tok = AutoTokenizer.from_pretrained(self.tok_dir)
        # The main job's training length, for sampling too: the models never learnt to end an answer
        # past it (its end-of-turn token was truncated away), so the filters drop what does not fit.
        self.max_len = self.cfg.seq_length + 1
        self.max_new = 2 * self.task.cfg.max_len + 2
        self.rows = {s: [json.loads(line) for line in open(os.path.join(data, f"{s}.jsonl"))]
                     for s in ("transfer", "test")}
        os.makedirs(out, exist_ok=True)
        # the student's own training prompts, each with the checker's correct answer
        self.prompts = os.path.join(out, "prompts.jsonl")
        with open(self.prompts, "w") as f:
            for r in self.rows["transfer"]:
                f.write(json.dumps({"id": r["id"], "prompt": r["prompt"],
                                    "reference": self.task.answer(r["prompt"])}) + "\n")
        self._test = (read_records(os.path.join(data, "test.jsonl")),
                      ConversationTokenizer(self.tok, "chat", self.max_len, "truncate"),
                      StoreReader(os.path.join(main_job, "store_test")))
        self.test_batches = None
        self.DistillationDataset = DistillationDataset

    def start(self):
        from nemo_kd.parallel import ParallelConfig, initialize_parallel

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(self.mj._free_port()))
        initialize_parallel(ParallelConfig(seed=self.cfg.seed))
        records, ctok, store = self._test
        self.test_batches = self.mj._eval_batches(self.DistillationDataset(records, ctok, store=store,
                                                                           k=self.cfg.top_k),
                                                  self.cfg, self.tok.pad_token_id)
        self.start_result, self.arch = self.evaluate_nemo(self.student, "start")

    def evaluate(self, model, name: str) -> dict:
        from nemo_kd.evaluation import heldout_metrics

        model.eval()
        return dict(**heldout_metrics(model.engine, self.test_batches),
                    **self.mj._generate_em(model.student, self.tok, self.rows["test"], self.task, f"eval {name}",
                                           self.cfg))

    def evaluate_nemo(self, path: str, name: str) -> dict:
        from nemo_kd.models.distillation_model import GPTDistillationModel

        model = GPTDistillationModel.restore_from(path, map_location=torch.device("cpu"))
        return self.evaluate(model, name), {k: model.cfg.student[k] for k in (
            "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size")}

    def fine_tune(self, name: str, init: str, data: str, store, loss: dict, steps: int, lr: float, batch: int,
                  seed: int, **extra):
        """The student from ``init`` (a .nemo) trained ``steps`` steps; ``extra``: more ``model.*``
        settings (e.g. ``teacher``, ``on_policy``). Returns (model, history)."""
        from omegaconf import OmegaConf

        mcfg = self.mj._model_config(self.cfg, self.arch, len(self.tok), data, self.tok_dir, store, loss, steps, seed)
        for key, value in extra.items():
            OmegaConf.update(mcfg, key, value, merge=False)
        mcfg.student_init = init
        mcfg.optim.lr, mcfg.optim.min_lr, mcfg.optim.warmup_steps = lr, lr * 0.1, 10
        mcfg.data.train_ds.micro_batch_size = mcfg.data.train_ds.global_batch_size = batch
        model, hist, _ = self.mj._fit(name, mcfg, steps, os.path.join(self.out, "logs"))
        return model, hist

    def variant(self, name: str, results: dict, timings: dict, histories: dict, *args, **kwargs) -> None:
        """:meth:`fine_tune` from the SFT student, then evaluate; results, timing and history recorded."""
        t0 = time.time()
        model, histories[name] = self.fine_tune(name, self.student, *args, **kwargs)
        results[name] = self.evaluate(model, name)
        timings[name] = time.time() - t0


def _table(results: dict) -> str:
    lines = ["| student | held-out CE | KL(teacher‖student) | exact match | EM, confused letters | EM, others |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['loss']:.4f} | {r['kl']:.4f} | {r['exact_match']:.3f} | "
                     f"{r['exact_match_confused']:.3f} | {r['exact_match_other']:.3f} |")
    return "\n".join(lines)


def _finish(out: str, title: str, summary: str, results: dict, timings: dict, extra: dict) -> dict:
    table = _table(results)
    print("\n" + summary + "\n\n" + table + "\n\ntimings (s): " +
          ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), flush=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"results": results, "timings_s": timings, **extra}, f, indent=1, default=str)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(f"# {title}\n\n{summary}\n\n{table}\n")
    return {"results": results, "table": table, **extra}

def run_dual(a) -> dict:
    from nemo_kd.generation.preference_pipeline import PreferencePipelineConfig, run as build_pairs
    from nemo_kd.parallel import destroy_parallel
    from nemo_kd.teacher.extract import ExtractConfig, compute_topk_logits
    from nemo_kd.teacher.teachers import MegatronTeacher

    t_start = time.time()
    st = Setting(a.main_job, a.out)
    st.start()
    results, timings, histories = {"SFT student (start)": st.start_result}, {}, {}
    try:
        t0 = time.time()
        print("[1/3] teacher positives vs student negatives -> pairs", flush=True)
        report = build_pairs(PreferencePipelineConfig.from_dict(dict(
            prompts=st.prompts, output_dir=os.path.join(a.out, "pairs"), max_seq_length=st.max_len, batch_size=128,
            teacher=dict(checkpoint=st.teacher, tokenizer=st.tok_dir, num_samples=2,
                         sampling=dict(temperature=0.7, max_new_tokens=st.max_new, seed=1)),
            student=dict(checkpoint=st.student, tokenizer=st.tok_dir, num_samples=4,
                         sampling=dict(temperature=1.0, max_new_tokens=st.max_new, seed=2)),
            score="reference", pair_filter=dict(min_margin=1.0))))
        pairs_file = os.path.join(a.out, "pairs", "pairs.jsonl")
        print(f"[2/3] teacher top-{st.cfg.top_k} over both sides of {report['pairs']} pairs", flush=True)
        store = os.path.join(a.out, "store")
        compute_topk_logits(ExtractConfig(data_path=pairs_file, output_path=store, top_k=st.cfg.top_k,
                                          max_seq_length=st.max_len, values_dtype="float32", batch_size=64,
                                          progress=True), MegatronTeacher(st.teacher), st.tok)
        timings["pairs+store"] = time.time() - t0
        objectives = {
            "dual": dict(kd_loss_weight=1.0, positive_kd_weight=1.0, negative_kd_weight=1.0, dpo_loss_weight=1.0),
            "pos-KD": dict(kd_loss_weight=1.0, positive_kd_weight=1.0, negative_kd_weight=0.0, dpo_loss_weight=0.0),
            "pos+neg KD": dict(kd_loss_weight=1.0, positive_kd_weight=1.0, negative_kd_weight=1.0,
                               dpo_loss_weight=0.0),
            "DPKD only": dict(kd_loss_weight=0.0, dpo_loss_weight=1.0),
        }
        for name in a.variants:
            print(f"[3/3] {name}: {a.steps} steps on {report['pairs']} pairs", flush=True)
            loss = dict(kd_loss_type="forward_kl", topk_convention="exact_tail", sft_loss_weight=0.0,
                        preference_loss_type="dpkd", preference_beta=a.beta, **objectives[name])
            st.variant(name, results, timings, histories, pairs_file, store, loss, a.steps, a.lr, 2 * a.pairs_batch,
                       st.cfg.seed + 7)
    finally:
        destroy_parallel()
    timings["total"] = time.time() - t_start
    summary = (f"pairs {report['pairs']} of {report['prompts']} prompts; mean verifier score teacher "
               f"{report['mean_score_teacher']:.3f}, student {report['mean_score_student']:.3f}")
    return _finish(a.out, "Dual preference distillation on the cipher task", summary, results, timings,
                   {"args": vars(a), "pairs_report": report, "histories": histories})


def run_dasd(a) -> dict:
    from nemo_kd.generation.dasd_pipeline import DASDPipelineConfig, run as build_dasd
    from nemo_kd.parallel import destroy_parallel

    t_start = time.time()
    st = Setting(a.main_job, a.out)
    st.start()
    results, timings, histories = {"SFT student (start)": st.start_result}, {}, {}
    sft = dict(kd_loss_weight=0.0, sft_loss_weight=1.0)  # DASD's loss: SFT on the teacher's samples
    try:
        t0 = time.time()
        print("[1/2] DASD data: teacher candidates at T=0.6 and T=1.0, filters, divergence-aware selection, "
              "mixed policy", flush=True)
        data_dir = os.path.join(a.out, "data")
        report = build_dasd(DASDPipelineConfig.from_dict(dict(
            prompts=st.prompts, output_dir=data_dir, max_seq_length=st.max_len, batch_size=128,
            teacher=dict(checkpoint=st.teacher, tokenizer=st.tok_dir, sampling=dict(max_new_tokens=st.max_new, seed=1)),
            student=dict(checkpoint=st.student, tokenizer=st.tok_dir),
            stages=[dict(name="low", temperature=0.6, num_samples=4), dict(name="high", temperature=1.0, num_samples=4)],
            mixed_policy=dict(enabled=True))))
        timings["data"] = time.time() - t0
        train = {name: os.path.join(data_dir, name, "train.jsonl") for name in ("low", "high")}
        runs = {"DASD low → high": [("low", a.steps // 2), ("high", a.steps - a.steps // 2)],
                "T = 1.0 only": [("high", a.steps)], "T = 0.6 only": [("low", a.steps)]}
        slug = dict(zip(runs, ("low_to_high", "high_only", "low_only")))
        for name, stages in runs.items():
            t0 = time.time()
            init = st.student
            for i, (stage, steps) in enumerate(stages):
                print(f"[2/2] {name}: stage {stage}, {steps} steps from {os.path.basename(init)}", flush=True)
                model, histories[f"{name} / {stage}"] = st.fine_tune(f"{name} {stage}", init, train[stage], None, sft,
                                                                     steps, a.lr, 32, st.cfg.seed + 7 + i)
                init = os.path.join(a.out, f"{slug[name]}_{stage}.nemo")
                model.save_to(init)
                del model
            results[name] = st.evaluate_nemo(init, name)[0]
            timings[name] = time.time() - t0
    finally:
        destroy_parallel()
    timings["total"] = time.time() - t_start
    stages = report["stages"]
    summary = "; ".join(f"stage {n} (T = {r['temperature']}): {r['train_samples']} training samples ({r['selected']} "
                        f"selected of {r['candidates']} candidates, {(r['mixed'] or {}).get('kept', 0)} mixed-policy; "
                        f"selected sentences {r['selected_sentences']})" for n, r in stages.items())
    return _finish(a.out, "DASD on the cipher task", summary, results, timings,
                   {"args": vars(a), "dasd_report": report, "histories": histories})


def run_gkd(a) -> dict:
    """On-policy distillation (GKD) with the online teacher on the noisy transfer set: the same
    student, steps and batches, the fraction of on-policy steps λ ∈ {0, 0.5, 1}."""
    from nemo_kd.parallel import destroy_parallel

    t_start = time.time()
    st = Setting(a.main_job, a.out)
    st.start()
    results, timings, histories = {"SFT student (start)": st.start_result}, {}, {}
    data = os.path.join(a.main_job, "data", "transfer.jsonl")
    loss = dict(kd_loss_type="jsd", jsd_beta=0.5, kd_loss_weight=1.0, sft_loss_weight=0.0)
    try:
        for fraction in (0.0, 0.5, 1.0):
            name = f"online JSD, λ = {fraction}" + (" (supervised KD)" if fraction == 0 else "")
            print(f"[1/1] {name}: {a.steps} steps", flush=True)
            st.variant(name, results, timings, histories, data, None, loss, a.steps, a.lr, 32, st.cfg.seed + 7,
                       teacher={"mode": "online", "checkpoint": st.teacher},
                       on_policy={"fraction": fraction, "temperature": 1.0, "max_new_tokens": st.max_new, "seed": 5})
    finally:
        destroy_parallel()
    timings["total"] = time.time() - t_start
    summary = (f"online teacher {os.path.basename(st.teacher)}, generalised JSD (β = 0.5), {a.steps} steps of 32 "
               "prompts of the noisy transfer set from the SFT student")
    return _finish(a.out, "On-policy distillation (GKD) on the cipher task", summary, results, timings,
                   {"args": vars(a), "histories": histories})


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("recipe", choices=("dual", "dasd", "gkd"))
    p.add_argument("--main-job", default="runs/main_job")
    p.add_argument("--out", default=None, help="default: runs/<recipe>")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: dual 150, dasd 100)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--beta", type=float, default=0.1, help="dual: DPKD beta")
    p.add_argument("--pairs-batch", type=int, default=16, help="dual: pairs per global batch")
    p.add_argument("--variants", nargs="*", default=["dual", "pos-KD", "pos+neg KD", "DPKD only"])
    a = p.parse_args(argv)
    a.out = a.out or f"runs/{a.recipe}"
    a.steps = a.steps or (150 if a.recipe == "dual" else 100)
    return {"dual": run_dual, "dasd": run_dasd, "gkd": run_gkd}[a.recipe](a)


if __name__ == "__main__":
    main()
