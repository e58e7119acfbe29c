"""The DPKD paper's Table 1 rows on an embedded task: one student, the same data and steps, several seeds.

    python benchmarks/bench_methods.py --out runs/bench_methods            # the real configuration
    python benchmarks/bench_methods.py --out /tmp/bench_methods --tiny     # a few steps (the test)

Rows (DPKD, arXiv 2406.19774, Table 1: SFT, KD, SeqKD, MiniLLM, DPKD; plus the divergences and
recipes nemo_kd trains), each built from the library's own pieces:

* **SFT** – CE on the transfer set's (noisy) labels (``kd_loss_weight 0``);
* **KD (forward KL)**, **reverse KL**, **JSD**, **AKL** – word-level KD against the teacher's top-k
  store on the same samples (``kd_loss_type``, ``topk_convention exact_tail``, no CE term);
* **SeqKD** – SFT on the teacher's greedy responses to the transfer prompts
  (:func:`nemo_kd.evaluation.evaluator.generate_responses`);
* **DPKD + LM** – the DPKD preference term (teacher response preferred, teacher as the reference,
  length-normalised; ``preference_loss_type dpkd``) plus its LM term, here CE on the preferred
  (teacher) side (``sft_loss_weight``; the paper's LM term is pre-training data this task has not);
* **dual preference** – ``L_DPKD + L_pos + L_neg`` (Nanbeige4 §3.3) on the same pairs;
* **on-policy GKD** – the co-located teacher (``teacher.mode online``), generalised JSD (β 0.5) on
  the student's own samples (``on_policy.fraction 1``).

Pairs: :mod:`nemo_kd.generation.preference_pipeline` on the transfer prompts, teacher samples
(T 0.7) against the warm-start student's samples (T 1.0), scored by the cipher's checker, kept
when the teacher's is at least as good (``min_margin 0``: DPKD prefers the teacher's output),
then the teacher's top-k over both sides.

Protocol, per seed: the student (initial weights and batch order from the seed) is warm-started
by SFT on the transfer set, then every method trains ``--steps`` steps from that warm start with
the same learning rate and rows per step (a preference step holds ``batch/2`` pairs). The teacher
(trained once, on the clean set) and the warm start itself are the bounds.

Task: :mod:`nemo_kd.data.synthetic_task`, longer words than the main job's (5–8 letters, so an
answer holds more letters the sloppy annotator confuses) and, with ``--reverse``, the reversed
variant. Scores on the clean test prompts, greedy: ROUGE-L (rouge-score) and exact match, each
with percentile-bootstrap 95% intervals per seed and pooled over seeds (resampling
(seed, prompt) cells), and each method's paired difference to SFT over the same (seed, prompt)
cells. A pooled interval measures the eval set's noise plus the spread of the seeds it pools,
not the full seed-to-seed variance of a method; the per-seed columns show that spread.

Outputs: ``results.md`` (table, per-seed table, paired differences, the "what differs
significantly" line), ``results.json``, ``eval/`` (:func:`nemo_kd.evaluation.report.write_report`:
per-sample rows, ``scores.png`` = metric by method with intervals, ``lengths.png``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "examples"))
sys.path.insert(0, REPO)

import main_job as mj  # noqa: E402  (the main job's teacher/data building and training helpers)

METHODS = ("SFT", "KD (forward KL)", "reverse KL", "JSD", "AKL", "SeqKD", "DPKD + LM", "dual preference",
           "on-policy GKD")
BOUNDS = ("teacher", "warm start")


@dataclass
class MethodsConfig(mj.JobConfig):
    """The main job's settings plus the comparison's (``--tiny``: a smoke run of a few steps)."""

    sizes: Dict[str, int] = field(default_factory=lambda: {"teacher_train": 3000, "transfer": 600,
                                                           "validation": 16, "test": 200})
    seq_length: int = 48
    min_len: int = 5
    max_len: int = 8
    reverse: bool = False
    teacher_steps: int = 400
    warm_steps: int = 60
    steps: int = 80  # per method, from the warm start
    method_lr: float = 1e-3
    method_warmup: int = 5
    seeds: List[int] = field(default_factory=lambda: [1, 2, 3])
    preference_beta: float = 0.1
    methods: List[str] = field(default_factory=lambda: list(METHODS))
    reuse_teacher: bool = False  # take the teacher stage of an earlier run in the same --out (checked)

    @classmethod
    def tiny(cls) -> "MethodsConfig":
        return cls(sizes={"teacher_train": 128, "transfer": 48, "validation": 8, "test": 16},
                   teacher=dict(num_layers=1, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64),
                   student=dict(num_layers=1, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64),
                   batch_size=8, teacher_steps=8, warm_steps=3, steps=3, warmup_steps=2, method_warmup=1,
                   seeds=[1, 2, 3])


def _loss(name: str, beta: float) -> dict:
    """The objective's keys of each row (``model.kd``)."""
    kd = lambda kind: dict(kd_loss_type=kind, topk_convention="exact_tail", kd_loss_weight=1.0, sft_loss_weight=0.0)
    pref = dict(kd_loss_type="forward_kl", topk_convention="exact_tail", preference_loss_type="dpkd",
                preference_beta=beta)
    return {
        "SFT": dict(kd_loss_weight=0.0, sft_loss_weight=1.0),
        "SeqKD": dict(kd_loss_weight=0.0, sft_loss_weight=1.0),
        "KD (forward KL)": kd("forward_kl"),
        "reverse KL": kd("reverse_kl"),
        "JSD": kd("jsd"),
        "AKL": kd("akl"),
        "DPKD + LM": dict(pref, kd_loss_weight=0.0, sft_loss_weight=1.0, dpo_loss_weight=1.0),
        "dual preference": dict(pref, kd_loss_weight=1.0, positive_kd_weight=1.0, negative_kd_weight=1.0,
                                sft_loss_weight=0.0, dpo_loss_weight=1.0),
        "on-policy GKD": dict(kd_loss_type="jsd", jsd_beta=0.5, kd_loss_weight=1.0, sft_loss_weight=0.0),
    }[name]


class Bench:
    """Task, tokenizer, teacher and its stores (once); per seed: warm start, pairs, every method."""

    def __init__(self, out: str, cfg: MethodsConfig):
        self.out, self.cfg = out, cfg
        self.timings: Dict[str, float] = {}

    # -------------------------------------------------------------- shared: task, tokenizer, teacher
    def prepare(self) -> None:
        from nemo_kd.data import read_records
        from nemo_kd.data.synthetic_task import CipherTask, TaskConfig, write_task
        from nemo_kd.data.tokenizer_builder import train_byte_level_bpe
        from nemo_kd.evaluation.evaluator import cipher_checker
        from nemo_kd.generation.stages import atomic_write_jsonl

        cfg, t0 = self.cfg, time.time()
        task_cfg = TaskConfig(sizes=dict(cfg.sizes), seed=cfg.seed, min_len=cfg.min_len, max_len=cfg.max_len,
                              reverse=cfg.reverse, instruction="encode reversed:" if cfg.reverse else "encode:")
        self.task = CipherTask(task_cfg)
        self.paths = write_task(os.path.join(self.out, "data"), task_cfg)
        rows = {s: [json.loads(line) for line in open(p)] for s, p in self.paths.items()}
        texts = [f"{r['prompt']}\n{r['response']}" for s in ("teacher_train", "transfer") for r in rows[s]]
        self.tok_dir = os.path.join(self.out, "tokenizer")
        self.tok = train_byte_level_bpe(texts, vocab_size=cfg.vocab_size, template="chatml", save_dir=self.tok_dir)
        self.records = {s: read_records(p) for s, p in self.paths.items()}
        self.checker = cipher_checker(os.path.join(self.out, "data", "task.json"))
        longest = max(len(self.tok.apply_chat_template([{"role": "user", "content": r["prompt"]},
                                                        {"role": "assistant", "content": r["response"]}],
                                                       tokenize=True)) for s in rows for r in rows[s])
        if longest > cfg.seq_length + 1:
            raise ValueError(f"seq_length {cfg.seq_length}: the longest rendered sample has {longest} tokens")
        # the preference pipeline's prompts: the student's training prompts with the correct answer
        self.prompts = os.path.join(self.out, "prompts.jsonl")
        atomic_write_jsonl(self.prompts, [{"id": r["id"], "prompt": r["prompt"], "reference": self.task.answer(r["prompt"])}
                                          for r in rows["transfer"]])
        self.timings["data+tokenizer"] = time.time() - t0

    def _teacher_stage_key(self) -> dict:
        """What the teacher stage's outputs depend on: the task's data, the tokenizer, the teacher's settings."""
        import hashlib

        digest = lambda path: hashlib.sha256(open(path, "rb").read()).hexdigest()
        cfg = self.cfg
        return dict(data={s: digest(p) for s, p in sorted(self.paths.items())},
                    tokenizer=digest(os.path.join(self.tok_dir, "tokenizer.json")), teacher=cfg.teacher,
                    teacher_steps=cfg.teacher_steps, seed=cfg.seed, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                    batch_size=cfg.batch_size, seq_length=cfg.seq_length, top_k=cfg.top_k,
                    vocab_size=cfg.vocab_size)

    def _reuse_teacher(self) -> bool:
        """``--reuse-teacher``: take teacher.nemo, the store and the SeqKD data of an earlier run in ``out`` whose
        ``teacher_stage.json`` names the same data, tokenizer and teacher settings (refused otherwise)."""
        from nemo_kd.models.distillation_model import GPTDistillationModel

        stage = os.path.join(self.out, "teacher_stage.json")
        self.teacher_path = os.path.join(self.out, "teacher.nemo")
        self.store, self.seqkd = os.path.join(self.out, "store"), os.path.join(self.out, "seqkd.jsonl")
        missing = [p for p in (stage, self.teacher_path, self.store, self.seqkd) if not os.path.exists(p)]
        if missing:
            raise FileNotFoundError(f"--reuse-teacher: {', '.join(missing)} missing (run once without it)")
        with open(stage) as f:
            recorded = json.load(f)
        if recorded != json.loads(json.dumps(self._teacher_stage_key())):
            raise ValueError(f"--reuse-teacher: {stage} was written for other data or teacher settings "
                             f"({recorded} vs {self._teacher_stage_key()})")
        print(f"[teacher] reused from {self.teacher_path} ({stage} matches)", flush=True)
        model = GPTDistillationModel.restore_from(self.teacher_path, map_location=torch.device("cpu"))
        self.rows = {"teacher": {0: self.evaluate(model, "teacher")}}
        del model
        kept = [json.loads(line) for line in open(self.seqkd)]
        self.seqkd_report = dict(samples=len(kept), empty=len(self.records["transfer"]) - len(kept),
                                 correct=sum(self.checker(k["prompt"], k["response"]) for k in kept) / len(kept))
        return True

    def train_teacher(self) -> None:
        from nemo_kd.generation.stages import atomic_write_json, atomic_write_jsonl
        from nemo_kd.teacher.extract import ExtractConfig, compute_topk_logits
        from nemo_kd.teacher.teachers import MegatronTeacher

        cfg, t0 = self.cfg, time.time()
        if cfg.reuse_teacher and self._reuse_teacher():
            self.timings["teacher (reused)"] = time.time() - t0
            return
        print(f"[teacher] SFT on {len(self.records['teacher_train'])} clean samples, {cfg.teacher_steps} steps",
              flush=True)
        sft = _loss("SFT", cfg.preference_beta)
        model, _, _ = mj._fit("teacher", mj._model_config(cfg, cfg.teacher, len(self.tok), self.paths["teacher_train"],
                                                          self.tok_dir, None, sft, cfg.teacher_steps, cfg.seed),
                              cfg.teacher_steps, os.path.join(self.out, "logs"))
        self.teacher_path = os.path.join(self.out, "teacher.nemo")
        model.save_to(self.teacher_path)
        self.rows = {"teacher": {0: self.evaluate(model, "teacher")}}
        # SeqKD's data: the teacher's samples (T 1, as MiniLLM / DPKD build it) on the transfer prompts; an
        # empty sample (the end token first) is no training target and is left out, counted
        from nemo_kd.evaluation.evaluator import generate_responses, prompt_token_ids

        bar = mj._progress(len(self.records["transfer"]), "teacher samples (SeqKD)")
        sampling = dataclasses.replace(mj.eval_settings(self.task, cfg), temperature=1.0, seed=cfg.seed + 7)
        gens = generate_responses(model.student, self.tok, prompt_token_ids(self.tok, self.records["transfer"]),
                                  sampling, vocab_size=len(self.tok), max_length=cfg.seq_length + 1, progress=bar)
        bar.close()
        del model
        self.seqkd = os.path.join(self.out, "seqkd.jsonl")
        kept = [{"id": r.id, "prompt": r.prompt_text, "response": g.text}
                for r, g in zip(self.records["transfer"], gens) if g.text.strip()]
        if not kept:
            raise RuntimeError(f"SeqKD: all {len(gens)} teacher samples are empty (an untrained teacher?)")
        atomic_write_jsonl(self.seqkd, kept)
        self.seqkd_report = dict(samples=len(kept), empty=len(gens) - len(kept),
                                 correct=sum(self.checker(k["prompt"], k["response"]) for k in kept) / len(kept))
        print(f"      SeqKD data: {len(kept)} teacher samples ({len(gens) - len(kept)} empty left out), "
              f"{self.seqkd_report['correct']:.3f} correct", flush=True)
        self.store = os.path.join(self.out, "store")
        shutil.rmtree(self.store, ignore_errors=True)  # an earlier run's store holds an earlier teacher's logits
        compute_topk_logits(ExtractConfig(data_path=self.paths["transfer"], output_path=self.store, top_k=cfg.top_k,
                                          max_seq_length=cfg.seq_length + 1, values_dtype="float32", batch_size=64,
                                          progress=True),
                            MegatronTeacher(self.teacher_path), self.tok, records=self.records["transfer"])
        atomic_write_json(os.path.join(self.out, "teacher_stage.json"), self._teacher_stage_key())
        self.timings["teacher+store+seqkd"] = time.time() - t0

    # -------------------------------------------------------------- evaluation
    def evaluate(self, model, name: str) -> List[dict]:
        model.eval()
        rows, _ = mj.evaluate_generations(model.student, self.tok, self.records["test"], self.task,
                                          f"eval {name}", self.cfg, self.checker)
        return rows

    # -------------------------------------------------------------- per seed
    def _train(self, name: str, seed_cfg, data: str, store, loss: dict, steps: int, init=None, lr=None,
               warmup=None, batch=None, **extra):
        from omegaconf import OmegaConf

        mcfg = mj._model_config(seed_cfg, seed_cfg.student, len(self.tok), data, self.tok_dir, store, loss, steps,
                                seed_cfg.seed + 1)
        for key, value in extra.items():
            OmegaConf.update(mcfg, key, value, merge=False)
        if init is not None:
            mcfg.student_init = init
        if lr is not None:
            mcfg.optim.lr, mcfg.optim.min_lr = lr, lr * 0.1
        if warmup is not None:
            mcfg.optim.warmup_steps = warmup
        if batch is not None:
            mcfg.data.train_ds.micro_batch_size = mcfg.data.train_ds.global_batch_size = batch
        model, _, _ = mj._fit(name, mcfg, steps, os.path.join(self.out, "logs"))
        return model

    def _pairs(self, seed: int, warm: str) -> tuple:
        from nemo_kd.generation.preference_pipeline import PreferencePipelineConfig, run as build_pairs
        from nemo_kd.teacher.extract import ExtractConfig, compute_topk_logits
        from nemo_kd.teacher.teachers import MegatronTeacher

        cfg, pdir = self.cfg, os.path.join(self.out, f"seed{seed}", "pairs")
        store = os.path.join(self.out, f"seed{seed}", "pairs_store")
        # The pipeline and the store resume what they find, keyed by the checkpoint's path, not its weights: an
        # earlier run's pairs in this --out were sampled from an earlier warm start, so they are dropped.
        for stale in (pdir, store):
            shutil.rmtree(stale, ignore_errors=True)
        max_new = mj.eval_settings(self.task, cfg).max_new_tokens
        report = build_pairs(PreferencePipelineConfig.from_dict(dict(
            prompts=self.prompts, output_dir=pdir, max_seq_length=cfg.seq_length + 1, batch_size=128,
            teacher=dict(checkpoint=self.teacher_path, tokenizer=self.tok_dir, num_samples=1,
                         sampling=dict(temperature=0.7, max_new_tokens=max_new, seed=100 + seed)),
            student=dict(checkpoint=warm, tokenizer=self.tok_dir, num_samples=2,
                         sampling=dict(temperature=1.0, max_new_tokens=max_new, seed=200 + seed)),
            score="reference", pair_filter=dict(min_margin=0.0))))
        pairs = os.path.join(pdir, "pairs.jsonl")
        if not report or not report.get("pairs"):
            raise RuntimeError(f"seed {seed}: the preference pipeline kept no pairs ({report})")
        compute_topk_logits(ExtractConfig(data_path=pairs, output_path=store, top_k=cfg.top_k,
                                          max_seq_length=cfg.seq_length + 1, values_dtype="float32", batch_size=64,
                                          progress=True), MegatronTeacher(self.teacher_path), self.tok)
        return pairs, store, report

    def run_seed(self, seed: int) -> None:
        cfg = self.cfg
        seed_cfg = dataclasses.replace(cfg, seed=cfg.seed + 1000 * seed)  # initial weights and batch order
        t0 = time.time()
        print(f"[seed {seed}] warm start: SFT {cfg.warm_steps} steps on transfer", flush=True)
        model = self._train(f"seed{seed} warm", seed_cfg, self.paths["transfer"], None, _loss("SFT", 0), cfg.warm_steps)
        warm = os.path.join(self.out, f"seed{seed}", "warm.nemo")
        os.makedirs(os.path.dirname(warm), exist_ok=True)
        model.save_to(warm)
        self.rows.setdefault("warm start", {})[seed] = self.evaluate(model, f"seed{seed} warm start")
        del model
        pairs = store = None
        if {"DPKD + LM", "dual preference"} & set(cfg.methods):
            pairs, store, self.pair_reports[seed] = self._pairs(seed, warm)
        self.timings[f"seed{seed} warm+pairs"] = time.time() - t0
        common = dict(init=warm, lr=cfg.method_lr, warmup=cfg.method_warmup)
        for name in cfg.methods:
            t0 = time.time()
            print(f"[seed {seed}] {name}: {cfg.steps} steps from the warm start", flush=True)
            loss = _loss(name, cfg.preference_beta)
            if name in ("DPKD + LM", "dual preference"):
                # whole pairs per step: batch/2 of them (fewer only when the pipeline kept fewer: --tiny)
                pair_rows = 2 * min(cfg.batch_size // 2, self.pair_reports[seed]["pairs"])
                model = self._train(f"seed{seed} {name}", seed_cfg, pairs, store, loss, cfg.steps, batch=pair_rows,
                                    **common)
            elif name == "SeqKD":
                model = self._train(f"seed{seed} {name}", seed_cfg, self.seqkd, None, loss, cfg.steps, **common)
            elif name == "on-policy GKD":
                max_new = mj.eval_settings(self.task, cfg).max_new_tokens
                model = self._train(f"seed{seed} {name}", seed_cfg, self.paths["transfer"], None, loss, cfg.steps,
                                    teacher={"mode": "online", "checkpoint": self.teacher_path},
                                    on_policy={"fraction": 1.0, "temperature": 1.0, "max_new_tokens": max_new,
                                               "seed": 300 + seed}, **common)
            else:
                uses_store = loss["kd_loss_weight"] > 0
                model = self._train(f"seed{seed} {name}", seed_cfg, self.paths["transfer"],
                                    self.store if uses_store else None, loss, cfg.steps, **common)
            self.rows.setdefault(name, {})[seed] = self.evaluate(model, f"seed{seed} {name}")
            del model
            self.timings[f"seed{seed} {name}"] = time.time() - t0

    def run(self) -> dict:
        from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel

        torch.set_num_threads(self.cfg.threads)
        mj._quiet()
        t_start = time.time()
        os.makedirs(self.out, exist_ok=True)
        self.pair_reports: Dict[int, dict] = {}
        self.prepare()
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(mj._free_port()))
        initialize_parallel(ParallelConfig(seed=self.cfg.seed))
        try:
            self.train_teacher()
            for done, seed in enumerate(self.cfg.seeds, 1):
                self.run_seed(seed)
                if done < len(self.cfg.seeds):  # the seeds so far, so that a run stopped early still reports
                    self.timings.pop("total", None)
                    self.timings["total"] = time.time() - t_start
                    report(self.out, dataclasses.replace(self.cfg, seeds=self.cfg.seeds[:done]), self.rows,
                           self.timings, dict(pairs=self.pair_reports, seqkd=self.seqkd_report))
        finally:
            destroy_parallel()
        self.timings.pop("total", None)  # an intermediate report's total: the final one goes last
        self.timings["total"] = time.time() - t_start
        return report(self.out, self.cfg, self.rows, self.timings, dict(pairs=self.pair_reports,
                                                                        seqkd=self.seqkd_report))


# ------------------------------------------------------------------ report
def _pooled(rows_by_seed: Dict[int, List[dict]]) -> List[dict]:
    """Every (seed, prompt) cell, seed-major; ``index`` made unique per cell so paired comparisons line up."""
    out = []
    for seed in sorted(rows_by_seed):
        for r in rows_by_seed[seed]:
            out.append(dict(r, seed=seed, index=(seed, r["index"])))
    return out


def _fmt(iv: dict, score: str) -> str:
    from nemo_kd.evaluation.stats import Interval

    scale, digits = (100.0, 1) if score == "rouge_l" else (1.0, 3)
    # ``iv``: an interval's dict, or a paired difference's row (the interval's fields plus a/b/score/...)
    return Interval(*(iv[k] for k in ("mean", "low", "high", "n", "confidence"))).format(scale, digits)


def report(out: str, cfg: MethodsConfig, rows: Dict[str, Dict[int, List[dict]]], timings: Dict[str, float],
           data_reports: dict) -> dict:
    """Pooled and per-seed intervals, paired differences to SFT, results.md / results.json / eval/."""
    from nemo_kd.evaluation.evaluator import summarize
    from nemo_kd.evaluation.report import write_report, write_text
    from nemo_kd.evaluation.stats import paired_difference
    from nemo_kd.generation.stages import atomic_write_json

    from nemo_kd.evaluation.evaluator import EvalSettings

    settings = EvalSettings()  # the bootstrap settings (95%, 2000 resamples, seed 0)
    order = [n for n in ("teacher", "warm start") + tuple(cfg.methods) if n in rows]
    pooled = {n: _pooled(rows[n]) for n in order}
    summaries = {n: summarize(pooled[n], settings) for n in order}
    per_seed = {n: {s: summarize(r, settings)["scores"] for s, r in rows[n].items()} for n in order}
    paired = []
    if "SFT" in rows:
        for n in order:
            if n in ("SFT", "teacher"):
                continue
            a, b = pooled[n], pooled["SFT"]
            if [r["index"] for r in a] != [r["index"] for r in b]:
                raise ValueError(f"{n} and SFT were not scored on the same (seed, prompt) cells")
            for score in ("rouge_l", "exact_match"):
                d = paired_difference([r[score] for r in a], [r[score] for r in b], settings.confidence,
                                      settings.bootstrap_resamples, settings.bootstrap_seed)
                seeds_up = sum(per_seed[n][s][score]["mean"] > per_seed["SFT"][s][score]["mean"] for s in rows[n])
                paired.append(dict(a=n, b="SFT", score=score, significant=d.significant, seeds_above=seeds_up,
                                   seeds=len(rows[n]), **d.to_dict()))
    results = dict(settings=dict(asdict(settings), num_samples=len(next(iter(rows["teacher"].values()))),
                                 seeds=cfg.seeds, pooled_over="(seed, prompt) cells"),
                   students=summaries, paired_differences=paired)
    write_report(os.path.join(out, "eval"), results, pooled)

    seeds = cfg.seeds
    head = ["method", "seeds", "ROUGE-L ×100 pooled [95% CI]", "exact match pooled [95% CI]"]
    head += [f"ROUGE-L ×100, seed {s}" for s in seeds] + [f"EM, seed {s}" for s in seeds]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in order:
        cells = [n, str(len(rows[n])), _fmt(summaries[n]["scores"]["rouge_l"], "rouge_l"),
                 _fmt(summaries[n]["scores"]["exact_match"], "exact_match")]
        cells += [_fmt(per_seed[n][s]["rouge_l"], "rouge_l") if s in per_seed[n] else "–" for s in seeds]
        cells += [_fmt(per_seed[n][s]["exact_match"], "exact_match") if s in per_seed[n] else "–" for s in seeds]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    diff_lines = ["| method − SFT | score | paired difference [95% CI] | significant | seeds above SFT |",
                  "|---|---|---|---|---|"]
    for d in paired:
        diff_lines.append(f"| {d['a']} | {'ROUGE-L ×100' if d['score'] == 'rouge_l' else 'exact match'} | "
                          f"{_fmt(d, d['score'])} | {'yes' if d['significant'] else 'no'} | "
                          f"{d['seeds_above']}/{d['seeds']} |")
    verdict = _verdict(paired)
    ranking = sorted((n for n in order if n in cfg.methods), key=lambda n: -summaries[n]["scores"]["rouge_l"]["mean"])
    md = [f"# Method comparison on the cipher task ({'reversed, ' if cfg.reverse else ''}{cfg.min_len}–{cfg.max_len} "
          "letters)", "",
          f"Teacher {cfg.teacher} trained {cfg.teacher_steps} steps on {cfg.sizes['teacher_train']} clean samples; "
          f"student {cfg.student}, per seed warm-started by {cfg.warm_steps} SFT steps on the {cfg.sizes['transfer']}"
          f"-sample noisy transfer set, then {cfg.steps} steps per method (lr {cfg.method_lr}, {cfg.batch_size} rows "
          f"per step); seeds {seeds}; {cfg.sizes['test']} clean test prompts, greedy.", "",
          table, "", "Paired differences to SFT over the same (seed, prompt) cells:", "", "\n".join(diff_lines), "",
          "What differs significantly from SFT (95%, paired): " + verdict, "",
          "Ordering by pooled ROUGE-L: " + " > ".join(ranking), "",
          "Pooled intervals resample (seed, prompt) cells: they hold the eval-set noise and the spread of these "
          f"{len(seeds)} seeds, not a method's full seed-to-seed variance; the per-seed columns show the spread.", "",
          "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())]
    write_text(os.path.join(out, "results.md"), "\n".join(md) + "\n")
    atomic_write_json(os.path.join(out, "results.json"),
                      dict(config=asdict(cfg), methods=summaries, per_seed=per_seed, paired_vs_sft=paired,
                           ranking_rouge_l=ranking, timings_s=timings,
                           data={"seqkd": data_reports["seqkd"],
                                 "pairs": {str(k): v for k, v in data_reports["pairs"].items()}}))
    print("\n" + "\n".join(md), flush=True)
    return dict(summaries=summaries, per_seed=per_seed, paired=paired, table=table, verdict=verdict)


def _verdict(paired: List[dict]) -> str:
    label = lambda d: f"{d['a']} ({'ROUGE-L' if d['score'] == 'rouge_l' else 'EM'} {_fmt(d, d['score'])})"
    up = [label(d) for d in paired if d["significant"] and d["mean"] > 0]
    down = [label(d) for d in paired if d["significant"] and d["mean"] < 0]
    # by name, not by parsing the labels: method names hold parentheses ("KD (forward KL)")
    same = sorted({d["a"] for d in paired} - {d["a"] for d in paired if d["significant"]})
    return (f"above SFT: {', '.join(up) or 'none'}; below SFT: {', '.join(down) or 'none'}; "
            f"not distinguishable from SFT on either score: {', '.join(same) or 'none'}.")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/bench_methods")
    p.add_argument("--tiny", action="store_true", help="a few steps at tiny size (the test)")
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--steps", type=int, help="steps per method from the warm start")
    p.add_argument("--warm-steps", type=int)
    p.add_argument("--teacher-steps", type=int)
    p.add_argument("--reverse", action="store_true", help="the reversed cipher variant (harder)")
    p.add_argument("--methods", nargs="+", choices=METHODS)
    p.add_argument("--threads", type=int)
    p.add_argument("--reuse-teacher", action="store_true",
                   help="reuse teacher.nemo, store/ and seqkd.jsonl of an earlier run in --out with the same data and "
                        "teacher settings (teacher_stage.json)")
    a = p.parse_args(argv)
    cfg = MethodsConfig.tiny() if a.tiny else MethodsConfig()
    for key in ("seeds", "steps", "warm_steps", "teacher_steps", "methods", "threads"):
        if getattr(a, key) is not None:
            setattr(cfg, key, getattr(a, key))
    cfg.reverse = cfg.reverse or a.reverse
    cfg.reuse_teacher = a.reuse_teacher
    if "SFT" not in cfg.methods:
        cfg.methods = ["SFT"] + list(cfg.methods)  # the reference of every paired difference
    return Bench(a.out, cfg).run()


if __name__ == "__main__":
    main()
