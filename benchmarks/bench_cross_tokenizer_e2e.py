"""Tiny end-to-end cross-family distillation vs the same-tokenizer run, on CPU (a few minutes).

    python benchmarks/bench_cross_tokenizer_e2e.py --out runs/xtok_e2e          # default, ~3-4 min on 2 cores
    python benchmarks/bench_cross_tokenizer_e2e.py --out /tmp/x --tiny          # seconds (the test)

Stages (TP = PP = DP = 1, the Megatron :class:`~nemo_kd.models.engine.DistillationEngine`):

1. data – the synthetic cipher task (:mod:`nemo_kd.data.synthetic_task`): a clean
   ``teacher_train`` set, a ``transfer`` set with noisy labels, a clean ``test`` set;
2. tokenizers, trained on the task text – the teacher's: byte-level BPE with the
   ChatML template (Qwen style); the cross-family student's: SentencePiece unigram with
   byte fallback and the Llama-2 ``[INST]`` template (Llama-2 / Mistral style);
3. teachers – a small GPT trained with SFT on ``teacher_train`` for each tokenizer;
4. stores – ``compute_topk_logits`` over ``transfer`` and ``test``: the same-tokenizer
   store of each teacher (format 1) and the BPE teacher with ``align_teacher_template:
   true`` for the SentencePiece student (format 2: teacher top-k in teacher ids over the
   teacher's own ChatML rendering + alignment);
5. students – the same small GPT architecture and initial weights (vocabulary rows
   aside), the same samples in the same order: BPE student from the BPE teacher (same
   tokenizer), SentencePiece student from the BPE teacher (cross-tokenizer), from the
   SentencePiece teacher (same tokenizer), with SFT only (no teacher) and with SFT on the
   transfer prompts' *clean* labels (what one-hot-like targets can teach this student).
   The last three separate what cross-tokenizer KD transfers from what the student's
   tokenizer and template cost it on this task;
6. held-out metrics on ``test`` for every student: exact match of greedy generations,
   KL(teacher ‖ student) over aligned tokens, token agreement, and the sequence NLL of
   the clean reference (nats per sample: comparable across tokenizers, unlike per-token
   CE); the per-step time of the first two runs (cross-tokenizer overhead); the loss
   curves in one PNG (``loss_curves.png``) and ``results.json``.
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
class E2EConfig:
    sizes: Dict[str, int] = field(default_factory=lambda: {"teacher_train": 2000, "transfer": 640,
                                                           "validation": 8, "test": 192})
    tok_vocab: int = 300
    seq_length: int = 40
    top_k: int = 16
    teacher: Dict = field(default_factory=lambda: dict(num_layers=2, hidden_size=96, num_attention_heads=4,
                                                       ffn_hidden_size=256))
    student: Dict = field(default_factory=lambda: dict(num_layers=2, hidden_size=64, num_attention_heads=4,
                                                       ffn_hidden_size=192))
    batch_size: int = 32
    teacher_steps: int = 300
    student_steps: int = 800
    lr: float = 3e-3
    kd_loss_weight: float = 1.0
    sft_loss_weight: float = 0.2
    seed: int = 1234


TINY = dict(sizes={"teacher_train": 256, "transfer": 128, "validation": 8, "test": 32}, teacher_steps=40,
            student_steps=40, batch_size=16,
            teacher=dict(num_layers=1, hidden_size=48, num_attention_heads=4, ffn_hidden_size=96),
            student=dict(num_layers=1, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model_cfg(arch: dict, vocab: int, seq: int):
    from nemo_kd.models import GPTModelConfig

    return GPTModelConfig(vocab_size=vocab, max_position_embeddings=seq, **arch)


def _engine(cfg: E2EConfig, arch, vocab, loss_kw, steps):
    from nemo_kd.losses.objective import DistillationLossConfig
    from nemo_kd.models.engine import BatchConfig, DistillationEngine, OptimConfig

    return DistillationEngine(_model_cfg(arch, vocab, cfg.seq_length), DistillationLossConfig(**loss_kw),
                              OptimConfig(lr=cfg.lr, min_lr=cfg.lr / 10, warmup_steps=max(steps // 20, 1),
                                          clip_grad=1.0),
                              BatchConfig(cfg.batch_size, cfg.batch_size, cfg.seq_length), max_steps=steps)


def _batches(ds, cfg: E2EConfig, steps: int, seed: int):
    """``steps`` global batches (one microbatch each) of ``ds`` in a seeded order, as index lists."""
    from nemo_kd.data.kd_dataset import GlobalBatchSampler

    it = iter(GlobalBatchSampler(len(ds), cfg.batch_size, cfg.batch_size, seed=seed))
    return [next(it)[0] for _ in range(steps)]


def _train(engine, ds, order, pad_id, desc) -> Dict[str, List[float]]:
    from nemo_kd.data.kd_dataset import collate

    hist = {"loss": [], "kd_loss": [], "sft_loss": [], "xtok_kl": [], "step_s": [], "collate_s": []}
    for step, idx in enumerate(order):
        t0 = time.perf_counter()
        mb = collate([ds[i] for i in idx], engine.batch_cfg.seq_length, pad_id)
        t1 = time.perf_counter()
        m = engine.train_step([mb])
        t2 = time.perf_counter()
        for key in ("loss", "kd_loss", "sft_loss"):
            hist[key].append(m[key])
        hist["xtok_kl"].append(m.get("xtok_kl", m.get("teacher_student_kd", math.nan)))
        hist["collate_s"].append(t1 - t0)
        hist["step_s"].append(t2 - t1)
        if (step + 1) % max(len(order) // 5, 1) == 0:
            print(f"  [{desc}] step {step + 1}/{len(order)} loss {m['loss']:.4f} kd {m['kd_loss']:.4f}", flush=True)
    return hist


def _heldout(engine, ds, tok, rows, task, pad_id, cfg: E2EConfig) -> Dict[str, float]:
    """Held-out metrics of a student on ``test`` (module docstring, stage 6)."""
    from nemo_kd.data.kd_dataset import collate
    from nemo_kd.evaluation.generate import greedy_generate
    from nemo_kd.evaluation.metrics import exact_match

    tot = {"kl": 0.0, "agree": 0.0, "nll": 0.0, "kd_tokens": 0.0, "tokens": 0.0}
    for j in range(0, len(ds) - cfg.batch_size + 1, cfg.batch_size):
        mb = collate([ds[i] for i in range(j, j + cfg.batch_size)], cfg.seq_length, pad_id)
        m = engine.eval_step([mb])
        kd_tokens = float(mb["loss_mask"].sum()) if "xtok_counts" not in mb else \
            float(mb["xtok_o2o_student_rows"].numel() + mb["xtok_chain_student_rows"].numel())
        tokens = float(mb["loss_mask"].sum())
        tot["kl"] += m.get("teacher_student_kd", math.nan) * kd_tokens
        tot["agree"] += m["token_agreement"] * kd_tokens
        tot["nll"] += m["sft_loss"] * tokens  # mean CE over the batch's tokens × tokens
        tot["kd_tokens"] += kd_tokens
        tot["tokens"] += tokens
    n_samples = (len(ds) // cfg.batch_size) * cfg.batch_size
    preds = greedy_generate(engine.module, tok, [r["prompt"] for r in rows], max_new_tokens=24,
                            max_length=cfg.seq_length)
    return {"exact_match": exact_match(preds, [task.answer(r["prompt"]) for r in rows]),
            "kl_aligned": tot["kl"] / tot["kd_tokens"], "token_agreement": tot["agree"] / tot["kd_tokens"],
            "reference_nll_per_sample": tot["nll"] / n_samples, "example": preds[0]}


def _step_overhead(engines: Dict[str, tuple], reps: int = 12) -> Dict[str, float]:
    """Median wall time of one training step (forward, loss, backward, optimizer) per run, the runs
    interleaved so that load from other processes on the machine hits both alike."""
    times: Dict[str, List[float]] = {name: [] for name in engines}
    for _ in range(reps):
        for name, (eng, mb) in engines.items():
            t0 = time.perf_counter()
            eng.train_step([mb])
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def _plot(hists: Dict[str, dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(xs, w=10):
        return [sum(xs[max(0, i - w + 1):i + 1]) / len(xs[max(0, i - w + 1):i + 1]) for i in range(len(xs))]

    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    for (name, h), color in zip(hists.items(), ("tab:blue", "tab:red", "tab:green", "tab:gray", "tab:olive")):
        steps = list(range(1, len(h["loss"]) + 1))
        if not all(math.isnan(x) for x in h["xtok_kl"]):  # an SFT-only run has no KL to plot
            axes[0].plot(steps, h["xtok_kl"], color=color, alpha=0.25)
            axes[0].plot(steps, smooth(h["xtok_kl"]), color=color, label=name)
        axes[1].plot(steps, h["loss"], color=color, alpha=0.25)
        axes[1].plot(steps, smooth(h["loss"]), color=color, label=name)
    axes[0].set_title("train KL(teacher || student) over aligned tokens")
    axes[1].set_title("train objective (KD + w_sft * CE)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(out: str, cfg: E2EConfig) -> dict:
    from transformers import AutoTokenizer

    from nemo_kd.data import read_records
    from nemo_kd.data.kd_dataset import DistillationDataset
    from nemo_kd.data.sentencepiece_builder import train_sentencepiece_unigram
    from nemo_kd.data.synthetic_task import CipherTask, TaskConfig, write_task
    from nemo_kd.data.tokenization import ConversationTokenizer
    from nemo_kd.data.tokenizer_builder import train_byte_level_bpe
    from nemo_kd.models import GPTModelConfig
    from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel
    from nemo_kd.teacher.extract import ExtractConfig, compute_topk_logits
    from nemo_kd.teacher.store import StoreReader
    from nemo_kd.teacher.teachers import MegatronTeacher, save_full_checkpoint

    t_start = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    task_cfg = TaskConfig(sizes=dict(cfg.sizes), seed=cfg.seed)
    task = CipherTask(task_cfg)
    paths = write_task(os.path.join(out, "data"), task_cfg)
    rows = {s: [json.loads(line) for line in open(p)] for s, p in paths.items()}
    texts = [f"{r['prompt']}\n{r['response']}" for r in rows["teacher_train"]]
    train_byte_level_bpe(texts, vocab_size=cfg.tok_vocab, template="chatml", save_dir=os.path.join(out, "tok_bpe"))
    train_sentencepiece_unigram(texts, vocab_size=cfg.tok_vocab, save_dir=os.path.join(out, "tok_spm"))
    t_tok = AutoTokenizer.from_pretrained(os.path.join(out, "tok_bpe"))
    s_tok = AutoTokenizer.from_pretrained(os.path.join(out, "tok_spm"))
    # the transfer prompts with *clean* labels: the SFT run on them bounds what one-hot-like targets teach
    paths["transfer_clean"] = os.path.join(out, "data", "transfer_clean.jsonl")
    with open(paths["transfer_clean"], "w") as f:
        for r in rows["transfer"]:
            f.write(json.dumps({**r, "response": task.answer(r["prompt"])}) + "\n")
    records = {s: read_records(p) for s, p in paths.items()}
    ct = {"bpe": ConversationTokenizer(t_tok, "chat", cfg.seq_length),
          "spm": ConversationTokenizer(s_tok, "chat", cfg.seq_length)}
    pads = {"bpe": t_tok.pad_token_id, "spm": s_tok.eos_token_id}
    toks = {"bpe": t_tok, "spm": s_tok}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    initialize_parallel(ParallelConfig(seed=cfg.seed))
    results: dict = {"config": asdict(cfg)}
    try:
        # ---- teachers: SFT on the clean teacher_train split, each with its own tokenizer and template
        from nemo_kd.evaluation.generate import greedy_generate
        from nemo_kd.evaluation.metrics import exact_match

        sft_only = dict(kd_loss_weight=0.0, sft_loss_weight=1.0)
        teacher_dirs = {}
        for side in ("bpe", "spm"):
            print(f"teacher ({side}): {cfg.teacher_steps} SFT steps", flush=True)
            tds = DistillationDataset(records["teacher_train"], ct[side])
            teacher = _engine(cfg, cfg.teacher, len(toks[side]), sft_only, cfg.teacher_steps)
            t_hist = _train(teacher, tds, _batches(tds, cfg, cfg.teacher_steps, cfg.seed), pads[side], f"teacher {side}")
            t_preds = greedy_generate(teacher.module, toks[side], [r["prompt"] for r in rows["test"]],
                                      max_new_tokens=24, max_length=cfg.seq_length)
            results[f"teacher_{side}"] = {
                "exact_match": exact_match(t_preds, [task.answer(r["prompt"]) for r in rows["test"]]),
                "final_train_ce": t_hist["sft_loss"][-1]}
            full = {k: v.detach().clone() for k, v in teacher.module.state_dict().items() if torch.is_tensor(v)}
            teacher_dirs[side] = os.path.join(out, f"teacher_{side}")
            save_full_checkpoint(teacher_dirs[side], full, _model_cfg(cfg.teacher, len(toks[side]), cfg.seq_length))
            del teacher

        # ---- stores: same-tokenizer (format 1) for each teacher, cross-tokenizer (format 2) BPE -> SentencePiece
        store_kinds = {"same_bpe": ("bpe", None), "cross": ("bpe", s_tok), "same_spm": ("spm", None)}
        stores, ext = {}, {}
        for kind, (side, student_tok) in store_kinds.items():
            mt = MegatronTeacher(teacher_dirs[side])
            for split in ("transfer", "test"):
                path = os.path.join(out, f"store_{kind}_{split}")
                if os.path.exists(path):
                    import shutil

                    shutil.rmtree(path)
                e = ExtractConfig(data_path=paths[split], output_path=path, top_k=cfg.top_k,
                                  max_seq_length=cfg.seq_length, values_dtype="bfloat16", batch_size=64,
                                  progress=False, align_teacher_template=student_tok is not None)
                summary = compute_topk_logits(e, mt, toks[side], records[split], student_tokenizer=student_tok)
                ext[f"{kind}_{split}"] = {"s": summary.elapsed_s, "align_s": summary.align_s,
                                          "one_to_one": summary.one_to_one_fraction}
                stores[(kind, split)] = StoreReader(path)
            del mt
        results["extraction"] = ext

        # ---- students: same architecture and initial weights, same sample order. The SentencePiece
        # student is run three ways so that the cross-tokenizer run has its fair comparisons: distilled
        # from a teacher of its own tokenizer, and not distilled at all.
        kd = dict(kd_loss_weight=cfg.kd_loss_weight, sft_loss_weight=cfg.sft_loss_weight, topk_convention="exact_tail")
        runs = {"same tokenizer (BPE teacher, BPE/ChatML student)": ("same_bpe", "bpe", kd),
                "cross-tokenizer (BPE teacher, SentencePiece/Llama-2 student)": ("cross", "spm", kd),
                "same tokenizer (SentencePiece teacher and student)": ("same_spm", "spm", kd),
                "no teacher (SentencePiece student, SFT only)": (None, "spm", sft_only),
                "no teacher (SentencePiece student, SFT on clean labels)": (None, "spm", sft_only)}
        from nemo_kd.data.kd_dataset import collate

        order = init = None
        hists, engines = {}, {}
        vocab = max(len(t_tok), len(s_tok))  # one model vocabulary size: identical parameter shapes and init
        for name, (kind, side, loss_kw) in runs.items():
            split = "transfer_clean" if "clean labels" in name else "transfer"
            ds = DistillationDataset(records[split], ct[side], store=stores[(kind, "transfer")] if kind else None,
                                     k=cfg.top_k if kind else None, student_vocab_size=vocab)
            test_kind = kind or "cross"  # SFT only: held-out KL against the BPE teacher, as the cross run
            test_ds = DistillationDataset(records["test"], ct[side], store=stores[(test_kind, "test")], k=cfg.top_k,
                                          student_vocab_size=vocab)
            if order is None:
                order = _batches(ds, cfg, cfg.student_steps, cfg.seed + 1)
            eng = _engine(cfg, cfg.student, vocab, loss_kw, cfg.student_steps)
            if init is None:  # the first student's initial weights are every student's
                init = {k: v.detach().clone() for k, v in eng.module.state_dict().items() if torch.is_tensor(v)}
            eng.module.load_state_dict(init, strict=False)
            print(f"student {name}: {cfg.student_steps} steps", flush=True)
            h = _train(eng, ds, order, pads[side], kind or "sft")
            hists[name] = h
            if not kind:  # held-out KL of an SFT-only student: evaluate with the KD term switched on
                from nemo_kd.losses.objective import DistillationLossConfig, DistillationObjective
                from nemo_kd.parallel import state

                eng.loss_cfg = DistillationLossConfig(**kd)
                eng.objective = DistillationObjective(eng.loss_cfg, group=state.tp_group(),
                                                      vocab_size=eng.student_cfg.vocab_size)
            held = _heldout(eng, test_ds, toks[side], rows["test"], task, pads[side], cfg)
            warm = h["step_s"][min(5, len(h["step_s"]) - 1):]
            results[name] = {
                "heldout": held,
                "train_loss_first10": sum(h["loss"][:10]) / len(h["loss"][:10]),
                "train_loss_last10": sum(h["loss"][-10:]) / len(h["loss"][-10:]),
                "train_kl_first10": sum(h["xtok_kl"][:10]) / len(h["xtok_kl"][:10]),
                "train_kl_last10": sum(h["xtok_kl"][-10:]) / len(h["xtok_kl"][-10:]),
                "step_ms": 1e3 * sum(warm) / len(warm),
                "collate_ms": 1e3 * sum(h["collate_s"]) / len(h["collate_s"]),
                "completion_tokens_per_sample": float(sum(ds[i].loss_mask.sum() for i in range(len(ds))) / len(ds)),
            }
            if len(engines) < 2:  # the per-step overhead: same- vs cross-tokenizer KD
                engines[name] = (eng, collate([ds[i] for i in order[0]], cfg.seq_length, pads[side]))
        results["step_timing"] = _step_overhead(engines)
        _plot(hists, os.path.join(out, "loss_curves.png"))
        results["histories"] = hists
    finally:
        destroy_parallel()
    results["wall_s"] = time.perf_counter() - t_start
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=float)
    return results


def _report(results: dict) -> str:
    lines = [f"teacher ({side}) exact match on test: {results[f'teacher_{side}']['exact_match']:.3f}"
             for side in ("bpe", "spm")]
    for k, v in results["extraction"].items():
        if v["one_to_one"] is not None:
            lines.append(f"extraction {k}: one-to-one aligned {100 * v['one_to_one']:.1f}% of student tokens, "
                         f"alignment {v['align_s']:.2f} s of {v['s']:.2f} s")
    lines.append(f"{'run':62s} {'EM':>6s} {'KL_al':>7s} {'agree':>6s} {'NLL/smp':>8s} {'loss 1st10':>10s} "
                 f"{'loss last10':>11s} {'ms/step':>8s} {'collate ms':>10s}")
    for name, r in results.items():
        if not isinstance(r, dict) or "heldout" not in r:
            continue
        h = r["heldout"]
        lines.append(f"{name:62s} {h['exact_match']:6.3f} {h['kl_aligned']:7.4f} {h['token_agreement']:6.3f} "
                     f"{h['reference_nll_per_sample']:8.3f} {r['train_loss_first10']:10.4f} "
                     f"{r['train_loss_last10']:11.4f} {r['step_ms']:8.1f} {r['collate_ms']:10.2f}")
    t = results["step_timing"]
    names = list(t)
    lines.append("training step (median of interleaved reps): " + ", ".join(f"{n}: {t[n]:.1f} ms" for n in names)
                 + f"; cross-tokenizer overhead {100 * (t[names[1]] / t[names[0]] - 1):+.1f}%")
    lines.append(f"wall time {results['wall_s']:.1f} s")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/xtok_e2e")
    ap.add_argument("--tiny", action="store_true", help="seconds-long smoke configuration")
    ap.add_argument("--teacher-steps", type=int, help="override the configuration's teacher_steps")
    ap.add_argument("--student-steps", type=int, help="override the configuration's student_steps")
    args = ap.parse_args(argv)
    cfg = E2EConfig(**TINY) if args.tiny else E2EConfig()
    # here, not in run(): the tests call run() in the pytest process, whose thread count must stay what
    # OMP_NUM_THREADS made it (a later in-process extraction is compared byte for byte with a subprocess's)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    for key in ("teacher_steps", "student_steps"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    results = run(args.out, cfg)
    print(_report(results), flush=True)
    return results


if __name__ == "__main__":
    main()
