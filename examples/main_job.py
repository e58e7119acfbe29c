"""The embedded main job: an end-to-end distillation on CPU in minutes, no downloads.

    python examples/main_job.py --out runs/main_job            # default (~8 min on 2 cores)
    python examples/main_job.py --out /tmp/smoke --smoke       # tiny, < 1 min (the test)

Stages (each with a progress bar):

1. data + tokenizer – the synthetic cipher task (:mod:`nemo_kd.data.synthetic_task`): a
   large clean ``teacher_train`` set, a smaller ``transfer`` set labelled by a sloppy
   annotator, clean ``validation``/``test``; a byte-level BPE with the ChatML template;
2. teacher – a small GPT trained (SFT, ``teacher.mode: none``) on ``teacher_train`` with
   the product's NeMo model (:class:`~nemo_kd.models.distillation_model.GPTDistillationModel`,
   Lightning ``Trainer`` + :class:`~nemo_kd.parallel.strategy.MegatronStrategy`,
   ``exp_manager`` TensorBoard logs), saved as ``teacher.nemo``;
3. store – the ``.nemo`` teacher's top-k logits on ``transfer`` (and on validation/test,
   for the held-out KL) via :func:`nemo_kd.teacher.extract.compute_topk_logits`;
4. students – the same smaller GPT (same initial weights, same batches) trained on
   ``transfer`` twice with the same NeMo model class: KD + SFT (``teacher.mode: offline``,
   the store) and SFT only (the baseline), each saved as ``.nemo``;
5. evaluation on ``test`` – loss on the clean references, KL(teacher ‖ student) and KL(student ‖
   teacher), and greedy generations scored by :mod:`nemo_kd.evaluation.evaluator` (ROUGE-L, exact
   match, the cipher checker) with bootstrap 95% intervals, and the paired KD+SFT − SFT interval;
6. ``results.md`` (the comparison table), ``results.json``, ``loss_curves.png``, ``eval/``
   (:func:`nemo_kd.evaluation.report.write_report`: per-sample generations, the evaluator's table
   with paired differences, ``scores.png``, ``lengths.png``).

Everything runs in one process at TP = PP = DP = 1; ``examples/train_gpt_kd.py`` is the
same model class driven by Hydra for real runs (TP/PP/DP under torchrun/srun).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class JobConfig:
    seed: int = 1234
    sizes: Dict[str, int] = field(default_factory=lambda: {"teacher_train": 4000, "transfer": 800,
                                                           "validation": 128, "test": 256})
    vocab_size: int = 300
    seq_length: int = 32
    top_k: int = 8
    teacher: Dict = field(default_factory=lambda: dict(num_layers=2, hidden_size=128, num_attention_heads=4,
                                                       ffn_hidden_size=384))
    student: Dict = field(default_factory=lambda: dict(num_layers=2, hidden_size=64, num_attention_heads=4,
                                                       ffn_hidden_size=192))
    batch_size: int = 32
    teacher_steps: int = 400
    student_steps: int = 300
    lr: float = 3e-3
    warmup_steps: int = 50
    kd_loss_weight: float = 1.0
    sft_loss_weight: float = 0.5  # of the KD student; the baseline is kd 0 / sft 1
    eval_every: int = 25
    threads: int = 2

    @classmethod
    def smoke(cls) -> "JobConfig":
        return cls(sizes={"teacher_train": 256, "transfer": 96, "validation": 32, "test": 32},
                   teacher=dict(num_layers=1, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64),
                   student=dict(num_layers=1, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64),
                   batch_size=16, teacher_steps=40, student_steps=30, warmup_steps=5, eval_every=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _progress(total, desc):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=True)


def _num_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _eval_batches(dataset, cfg: JobConfig, pad_id: int) -> List[List[dict]]:
    from nemo_kd.data.kd_dataset import collate

    n = len(dataset)
    out = []
    for s in range(0, n, cfg.batch_size):
        idx = list(range(s, min(s + cfg.batch_size, n)))
        out.append([collate([dataset[i] for i in idx], cfg.seq_length + 1, pad_id)])
    return out


def _model_config(cfg: JobConfig, arch: dict, vocab: int, data: str, tok_dir: str, store, loss: dict, steps: int,
                  data_seed: int):
    """The GPTDistillationModel config (the ``model:`` section of conf/gpt_kd.yaml)."""
    from omegaconf import OmegaConf

    return OmegaConf.create(dict(
        student=dict(arch, vocab_size=vocab, max_position_embeddings=2 * cfg.seq_length, params_dtype="fp32"),
        teacher=dict(mode="offline" if store else "none"),
        kd=dict(loss),
        optim=dict(lr=cfg.lr, min_lr=cfg.lr * 0.05, warmup_steps=cfg.warmup_steps, weight_decay=0.01),
        parallel=dict(seed=cfg.seed),
        data=dict(train_ds=dict(file_path=data, logits_store=store, tokenizer=tok_dir, prompt_format="chat",
                                max_seq_length=cfg.seq_length + 1, micro_batch_size=cfg.batch_size,
                                global_batch_size=cfg.batch_size, seed=data_seed, shuffle=True)),
        max_steps=steps,
    ))


def _fit(name: str, model_cfg, steps: int, log_root: str, val=None, eval_every: int = 0, init=None):
    """Train a GPTDistillationModel with a Lightning Trainer.

    Returns the trained model, the history of train and held-out metrics, and the weights it
    started from (``init`` when given)."""
    import lightning.pytorch as pl
    from nemo.utils.exp_manager import exp_manager

    from nemo_kd.evaluation import heldout_metrics
    from nemo_kd.models.distillation_model import GPTDistillationModel
    from nemo_kd.parallel.strategy import MegatronStrategy

    hist = {"step": [], "loss": [], "sft_loss": [], "kd_loss": [], "val_step": [], "val_loss": [], "val_kl": []}

    class History(pl.Callback):
        def _evaluate(self, model, step):
            m = heldout_metrics(model.engine, val)
            hist["val_step"].append(step)
            hist["val_loss"].append(m["loss"])
            hist["val_kl"].append(m["kl"])
            model.log("heldout_kl", m["kl"], batch_size=1)

        def on_train_start(self, trainer, model):
            if val is not None:
                self._evaluate(model, 0)

        def on_train_batch_end(self, trainer, model, outputs, batch, batch_idx):
            step = trainer.global_step
            metrics = trainer.callback_metrics
            hist["step"].append(step)
            for k in ("loss", "sft_loss", "kd_loss"):
                hist[k].append(float(metrics[k]) if k in metrics else math.nan)
            if val is not None and (step % eval_every == 0 or step == steps):
                self._evaluate(model, step)

    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=MegatronStrategy(), max_steps=steps,
                         use_distributed_sampler=False, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         log_every_n_steps=10, callbacks=[History()])
    log_dir = exp_manager(trainer, dict(exp_dir=log_root, name=name.replace(" ", "_").replace("+", "_"),
                                        create_tensorboard_logger=True, create_checkpoint_callback=False,
                                        version="run"))
    model = GPTDistillationModel(model_cfg, trainer=trainer)
    if init is not None:  # the same initial weights for both students: only the objective differs
        model.student.load_state_dict(init, strict=False)
    start = {k: v.detach().clone() for k, v in model.student.state_dict().items() if torch.is_tensor(v)}
    trainer.fit(model)
    return model, hist, start


def eval_settings(task, cfg: JobConfig):
    """Greedy decoding with room for the longest answer; the evaluator's bootstrap defaults (95%, 2000 resamples)."""
    from nemo_kd.evaluation.evaluator import EvalSettings

    return EvalSettings(max_new_tokens=2 * task.cfg.max_len + 2, batch_size=128)


def confused_prompts(rows: List[dict], task) -> List[int]:
    """Indices of the prompts holding a letter the annotator confuses (where noisy labels mislead SFT)."""
    confused = set(task.confusions)
    return [i for i, r in enumerate(rows) if set(r["prompt"].split()[1:]) & confused]


def evaluate_generations(model, tok, records, task, desc: str, cfg: JobConfig, checker=None):
    """Greedy generations of ``model`` (a Megatron GPTModel) on ``records`` scored by the evaluator
    (:mod:`nemo_kd.evaluation.evaluator`): per-sample rows (ROUGE-L, exact match, the cipher checker) and
    their summary (means with bootstrap intervals), plus the summaries on the prompts with / without a
    confused letter. Returns ``(rows, summary)``."""
    from nemo_kd.evaluation.evaluator import generate_responses, prompt_token_ids, score_samples, summarize

    settings = eval_settings(task, cfg)
    bar = _progress(len(records), desc)
    gens = generate_responses(model, tok, prompt_token_ids(tok, records), settings, vocab_size=len(tok),
                              max_length=cfg.seq_length + 1, progress=bar)
    bar.close()
    rows = score_samples(records, gens, settings, checker=checker)
    hard = set(confused_prompts(rows, task))
    summary = summarize(rows, settings)
    summary["subsets"] = {"confused": summarize([r for i, r in enumerate(rows) if i in hard], settings),
                          "other": summarize([r for i, r in enumerate(rows) if i not in hard], settings)}
    return rows, summary


def _generate_em(model, tok, rows, task, desc, cfg: JobConfig) -> dict:
    """Exact match overall and on the confused / other prompts as point estimates (the keys the sequence-level
    benchmarks print), through :func:`evaluate_generations`; ``summary`` holds the intervals."""
    from nemo_kd.data.records import records_from_objects

    records = records_from_objects((desc, i + 1, r, None) for i, r in enumerate(rows))
    scored, summary = evaluate_generations(model, tok, records, task, desc, cfg)
    em = lambda s: s["scores"]["exact_match"]["mean"] if s["num_samples"] else math.nan
    return {"exact_match": em(summary), "exact_match_confused": em(summary["subsets"]["confused"]),
            "exact_match_other": em(summary["subsets"]["other"]), "summary": summary,
            "examples": [{"prompt": r["prompt"], "reference": r["reference"], "generated": r["response"]}
                         for r in scored[:8]]}


def _plot(histories: Dict[str, dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    colors = {"teacher": "tab:gray", "student KD+SFT": "tab:blue", "student SFT only": "tab:orange"}

    def smooth(xs, w=20):
        out, acc = [], []
        for x in xs:
            acc.append(x)
            acc = acc[-w:]
            out.append(sum(acc) / len(acc))
        return out

    for name, h in histories.items():
        axes[0].plot(h["step"], smooth(h["sft_loss"]), label=name, color=colors.get(name))
        if h["val_step"]:
            axes[1].plot(h["val_step"], h["val_loss"], marker=".", label=name, color=colors.get(name))
            axes[2].plot(h["val_step"], h["val_kl"], marker=".", label=name, color=colors.get(name))
    axes[0].set_title("train CE on own labels (teacher: clean; students: noisy transfer set)")
    axes[1].set_title("held-out CE on clean validation references")
    axes[2].set_title("held-out KL(teacher || student)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("nats / token")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _model_result(params: int, data: str, heldout: dict, summary: dict) -> dict:
    """One model's row of results.json: the point estimates flat (as before), the intervals in ``evaluation``."""
    mean = lambda s, k: s["scores"][k]["mean"] if s["num_samples"] else math.nan
    sub = summary["subsets"]
    return dict(params=params, data=data, **heldout, heldout=heldout,
                rouge_l=mean(summary, "rouge_l"), exact_match=mean(summary, "exact_match"),
                checker=mean(summary, "checker"), exact_match_confused=mean(sub["confused"], "exact_match"),
                exact_match_other=mean(sub["other"], "exact_match"),
                evaluation={k: v for k, v in summary.items() if k != "subsets"}, subsets=sub)


def _interval(summary: dict, score: str, scale: float = 1.0, digits: int = 3) -> str:
    from nemo_kd.evaluation.stats import Interval

    return Interval(**summary["scores"][score]).format(scale, digits) if summary["num_samples"] else "n/a"


def _paired_verdict(paired: List[dict]) -> str:
    """``score +d [low, high] (significant | not significant)`` for each paired difference."""
    from nemo_kd.evaluation.stats import Interval

    parts = []
    for d in paired:
        iv = Interval(d["mean"], d["low"], d["high"], d["n"], d["confidence"])
        scale, digits = (100.0, 1) if d["score"] == "rouge_l" else (1.0, 3)
        name = {"rouge_l": "ROUGE-L ×100", "exact_match": "exact match", "checker": "checker"}[d["score"]]
        parts.append(f"{name} {iv.format(scale, digits)} ({'significant' if d['significant'] else 'not significant'})")
    return "; ".join(parts)


def _table(results: Dict[str, dict]) -> str:
    head = ("| model | params | trained on | held-out CE (nats/tok) [95% CI] | KL(teacher‖model) [95% CI] "
            "| KL(model‖teacher) [95% CI] | token agreement [95% CI] | ROUGE-L ×100 [95% CI] | exact match [95% CI] "
            "| EM, prompts with confused letters | EM, other prompts |")
    lines = [head, "|" + "---|" * 11]
    for name, r in results.items():
        ev, sub = r["evaluation"], r["subsets"]
        intervals = r.get("heldout_intervals", {})  # over test samples, token-weighted
        held = lambda k, digits: (f"{r[k]:.{digits}f}" if k not in intervals else
                                  f"{r[k]:.{digits}f} [{intervals[k]['low']:.{digits}f}, {intervals[k]['high']:.{digits}f}]")
        lines.append(f"| {name} | {r['params']:,} | {r['data']} | {held('loss', 4)} | {held('kl', 4)} | "
                     f"{held('reverse_kl', 4)} | {held('token_agreement', 3)} | {_interval(ev, 'rouge_l', 100.0, 1)} | "
                     f"{_interval(ev, 'exact_match')} | {_interval(sub['confused'], 'exact_match')} | "
                     f"{_interval(sub['other'], 'exact_match')} |")
    return "\n".join(lines)


def _quiet() -> None:
    """Keep the job's output to progress bars and results: Megatron's INFO set-up logs and
    deprecation warnings of the pinned stack say nothing a user of this job can act on."""
    import logging
    import warnings

    import megatron.core.distributed  # noqa: F401  (creates the loggers to quiet)
    import megatron.core.optimizer  # noqa: F401

    for name in [n for n in logging.root.manager.loggerDict if n.startswith("megatron")] + ["megatron"]:
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in (r".*cuda_graph_scope.*", r".*tp_group is None.*", r".*Transformer Engine and Apex.*",
                    r".*ffn_hidden_size.*", r".*sync_dist=True.*", r".*log_every_n_steps.*", r".*LeafSpec.*"):
        warnings.filterwarnings("ignore", message=pattern)


def run(out: str, cfg: JobConfig) -> dict:
    torch.set_num_threads(cfg.threads)
    _quiet()
    from nemo_kd.data import read_records
    from nemo_kd.data.kd_dataset import DistillationDataset
    from nemo_kd.data.synthetic_task import CipherTask, TaskConfig, write_task
    from nemo_kd.data.tokenization import ConversationTokenizer
    from nemo_kd.data.tokenizer_builder import train_byte_level_bpe
    from nemo_kd.evaluation import heldout_metrics
    from nemo_kd.evaluation.metrics import heldout_intervals, heldout_per_sample
    from nemo_kd.evaluation.report import markdown_table, write_report, write_text
    from nemo_kd.generation.stages import atomic_write_json
    from nemo_kd.models.distillation_model import GPTDistillationModel
    from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel
    from nemo_kd.teacher.extract import ExtractConfig, compute_topk_logits
    from nemo_kd.teacher.store import StoreReader
    from nemo_kd.teacher.teachers import MegatronTeacher

    t_start = time.time()
    timings: Dict[str, float] = {}
    os.makedirs(out, exist_ok=True)
    max_len = cfg.seq_length + 1  # prompt + completion tokens: inputs/labels of seq_length after the shift

    # ------------------------------------------------------------------ 1. data + tokenizer
    t0 = time.time()
    print(f"[1/6] data + tokenizer -> {out}", flush=True)
    task_cfg = TaskConfig(sizes=dict(cfg.sizes), seed=cfg.seed)
    task = CipherTask(task_cfg)
    paths = write_task(os.path.join(out, "data"), task_cfg)
    rows = {s: [json.loads(line) for line in open(p)] for s, p in paths.items()}
    texts = [f"{r['prompt']}\n{r['response']}" for split in ("teacher_train", "transfer") for r in rows[split]]
    tok = train_byte_level_bpe(texts, vocab_size=cfg.vocab_size, template="chatml", save_dir=os.path.join(out, "tokenizer"))
    vocab = len(tok)
    records = {s: read_records(p) for s, p in paths.items()}
    print(f"      splits: " + ", ".join(f"{s}={len(r)}" for s, r in records.items()) + f"; vocabulary {vocab}", flush=True)
    print(f"      annotator confusions in 'transfer': {task.confusions} (rate {task_cfg.confusion_rate})", flush=True)
    timings["data+tokenizer"] = time.time() - t0

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    initialize_parallel(ParallelConfig(seed=cfg.seed))
    try:
        tok_dir = os.path.join(out, "tokenizer")
        ctok = ConversationTokenizer(tok, "chat", max_len, "truncate")
        pad_id = tok.pad_token_id
        log_root = os.path.join(out, "logs")  # exp_manager: TensorBoard event files per run

        # -------------------------------------------------------------- 2. teacher
        t0 = time.time()
        print(f"[2/6] teacher: SFT on teacher_train ({len(records['teacher_train'])} clean samples)", flush=True)
        sft_only = dict(kd_loss_weight=0.0, sft_loss_weight=1.0)
        t_model, t_hist, _ = _fit("teacher", _model_config(cfg, cfg.teacher, vocab, paths["teacher_train"], tok_dir,
                                                           None, sft_only, cfg.teacher_steps, cfg.seed),
                                  cfg.teacher_steps, log_root)
        teacher_path = os.path.join(out, "teacher.nemo")
        t_model.save_to(teacher_path)
        teacher_params = _num_params(t_model.student)
        del t_model
        timings["teacher"] = time.time() - t0

        # -------------------------------------------------------------- 3. store
        t0 = time.time()
        print(f"[3/6] teacher top-{cfg.top_k} logits -> store (teacher loaded from {teacher_path})", flush=True)
        teacher = MegatronTeacher(teacher_path, name="main_job_teacher")
        stores = {}
        for split in ("transfer", "validation", "test"):
            path = os.path.join(out, "store" if split == "transfer" else f"store_{split}")
            summary = compute_topk_logits(
                ExtractConfig(data_path=paths[split], output_path=path, top_k=cfg.top_k, max_seq_length=max_len,
                              values_dtype="float32", batch_size=64, progress=True),
                teacher, tok, records=records[split])
            print(f"      {split}: {summary.num_samples} samples, {summary.num_tokens} tokens, "
                  f"{summary.store_bytes / 1024:.0f} KiB", flush=True)
            stores[split] = StoreReader(path)
        ds = {s: DistillationDataset(records[s], ctok, store=stores[s], k=cfg.top_k) for s in ("validation", "test")}
        val_batches = _eval_batches(ds["validation"], cfg, pad_id)
        test_batches = _eval_batches(ds["test"], cfg, pad_id)
        timings["store"] = time.time() - t0

        # -------------------------------------------------------------- 4. students
        kd = dict(kd_loss_type="forward_kl", topk_convention="exact_tail", kd_loss_weight=cfg.kd_loss_weight,
                  sft_loss_weight=cfg.sft_loss_weight)
        student_paths, histories, init = {}, {"teacher": t_hist}, None
        for name, loss, store in (("student KD+SFT", kd, os.path.join(out, "store")),
                                  ("student SFT only", sft_only, None)):
            t0 = time.time()
            print(f"[4/6] {name}: {cfg.student_steps} steps on transfer ({len(records['transfer'])} samples, "
                  f"noisy labels)", flush=True)
            model_cfg = _model_config(cfg, cfg.student, vocab, paths["transfer"], tok_dir, store, loss,
                                      cfg.student_steps, cfg.seed + 1)
            model, histories[name], init = _fit(name, model_cfg, cfg.student_steps, log_root, val=val_batches,
                                                eval_every=cfg.eval_every, init=init)
            student_paths[name] = os.path.join(out, name.replace(" ", "_").replace("+", "_") + ".nemo")
            model.save_to(student_paths[name])
            del model
            timings[name] = time.time() - t0

        # -------------------------------------------------------------- 5. evaluation
        t0 = time.time()
        print(f"[5/6] evaluation on test ({len(records['test'])} held-out prompts), models restored from .nemo",
              flush=True)
        from nemo_kd.evaluation.evaluator import cipher_checker, compare

        checker = cipher_checker(os.path.join(out, "data", "task.json"))  # correct encoding, whatever the label
        results, rows_by_model = {}, {}
        evaluated = [("teacher", teacher_path, f"teacher_train ({len(records['teacher_train'])}, clean)")]
        evaluated += [(n, p, f"transfer ({len(records['transfer'])}, noisy)") for n, p in student_paths.items()]
        for name, path, data in evaluated:
            model = GPTDistillationModel.restore_from(path, map_location=torch.device("cpu"))
            model.eval()
            forward = heldout_metrics(model.engine, test_batches)
            reverse = heldout_metrics(model.engine, test_batches, "reverse_kl")
            # the same terms per test sample, for their bootstrap intervals over samples (token-weighted)
            per_sample = heldout_per_sample(model.engine, [ds["test"][i] for i in range(len(ds["test"]))], max_len,
                                            pad_id)
            rows_by_model[name], summary = evaluate_generations(model.student, tok, records["test"], task,
                                                                f"generate ({name})", cfg, checker)
            results[name] = _model_result(_num_params(model.student), data, dict(forward, reverse_kl=reverse["kl"]),
                                          summary)
            settings = eval_settings(task, cfg)
            results[name]["heldout_intervals"] = heldout_intervals(per_sample, settings.confidence,
                                                                   settings.bootstrap_resamples,
                                                                   settings.bootstrap_seed)
        settings = eval_settings(task, cfg)
        paired = compare({n: rows_by_model[n] for n in student_paths}, settings)  # KD+SFT − SFT only
        assert results["teacher"]["params"] == teacher_params
        timings["evaluation"] = time.time() - t0
        for reader in stores.values():
            if hasattr(reader, "close"):
                reader.close()
    finally:
        destroy_parallel()

    # ------------------------------------------------------------------ 6. report
    print("[6/6] report", flush=True)
    _plot(histories, os.path.join(out, "loss_curves.png"))
    table = _table(results)
    eval_results = dict(settings=dict(asdict(settings), data_path=paths["test"], num_samples=len(records["test"]),
                                      checker="cipher"),
                        students={n: dict(r["evaluation"], heldout=r["heldout"]) for n, r in results.items()},
                        paired_differences=paired)
    write_report(os.path.join(out, "eval"), eval_results, rows_by_model)
    timings["total"] = time.time() - t_start
    verdict = _paired_verdict(paired)
    md = [
        "# nemo_kd main job: distillation on the synthetic cipher task",
        "",
        f"Teacher trained on {len(records['teacher_train'])} clean samples; both students trained on the same "
        f"{len(records['transfer'])}-sample transfer set whose labels come from an annotator who confuses "
        f"{len(task.confusions)} letters (rate {task_cfg.confusion_rate}); same initial weights, same batches, "
        f"{cfg.student_steps} steps. Evaluated on {len(records['test'])} clean held-out prompts (greedy).",
        "",
        table,
        "",
        "KD+SFT − SFT only on the same prompts (paired 95% bootstrap intervals): " + verdict + ".",
        "",
        "The intervals measure the eval set's sampling noise only (another seed moves a number too: "
        "benchmarks/bench_methods.py runs several). Per-sample generations, the paired table, scores.png and "
        "lengths.png: eval/.",
        "",
        markdown_table(eval_results),
        "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()),
        "",
        "Example generations (KD+SFT student):",
        "",
    ] + [f"- `{r['prompt']}` → `{r['response']}` (reference `{r['reference']}`)" for r in rows_by_model["student KD+SFT"][:5]]
    write_text(os.path.join(out, "results.md"), "\n".join(md) + "\n")
    atomic_write_json(os.path.join(out, "results.json"),
                      {"config": asdict(cfg), "results": results, "timings_s": timings, "histories": histories})
    print()
    print(table)
    print("\nKD+SFT − SFT only (paired 95% intervals): " + verdict)
    print(f"\nartefacts in {out}: results.md, results.json, loss_curves.png, eval/ (scores.png, samples); total {timings['total']:.0f} s", flush=True)
    return {"results": results, "timings": timings, "histories": histories, "table": table}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/main_job")
    p.add_argument("--smoke", action="store_true", help="tiny configuration (< 1 min), for tests")
    p.add_argument("--teacher-steps", type=int)
    p.add_argument("--student-steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int)
    a = p.parse_args(argv)
    cfg = JobConfig.smoke() if a.smoke else JobConfig()
    for key in ("teacher_steps", "student_steps", "seed", "threads"):
        if getattr(a, key) is not None:
            setattr(cfg, key, getattr(a, key))
    return run(a.out, cfg)


if __name__ == "__main__":
    main()
