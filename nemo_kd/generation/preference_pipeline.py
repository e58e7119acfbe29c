"""Dual preference distillation data: teacher positives vs student negatives, filtered pairs.

The data side of the Nanbeige4-3B recipe (arXiv 2512.06266, §3.3; seed diagram
"Student Model Training via Teacher Distillation and DPO"), reading top to bottom:

1. **student negatives** – the SFT student samples ``student.num_samples`` responses per
   prompt (``student_responses.jsonl``);
2. **teacher positives** – the teacher samples ``teacher.num_samples`` per prompt
   (``teacher_responses.jsonl``);
3. **scores** – every response gets a score: ``reference`` (rules: the answer, optionally
   extracted by ``score.extract``, equals the prompt's reference; 1 or 0) or
   ``teacher_logprob`` (the teacher's mean token log-prob of the response, the teacher as
   judge; computed while the teacher is loaded; ``pack_sequences``: the pairs packed into rows of
   ``pack_length``, :func:`~nemo_kd.generation.sampling.response_logprobs`);
4. **filters** – :class:`~nemo_kd.generation.filters.ResponseFilterConfig` drops
   degenerate, unfinished, over-long responses on both sides;
5. **pair-wise preference filter** – :func:`~nemo_kd.generation.pairs.select_pairs` keeps
   ``(positive, negative)`` only when ``score(pos) − score(neg) ≥ min_margin``
   ("ensure positive ≫ negative") → ``pairs.jsonl`` (``messages`` + ``chosen`` +
   ``rejected``, the layout :func:`nemo_kd.data.read_records` reads) and ``report.json``.

Then ``compute_topk_logits`` over ``pairs.jsonl`` stores the teacher's top-k for both sides
(and its sequence log-probs, the DPKD reference), and the NeMo model trains the joint
``L_DPO + L_pos + L_neg`` (``conf/gpt_kd_preference.yaml``).

``teacher.type: served`` (``url``, ``model``, ``dialect``, ``api_key_env``, ... as extraction's served
teacher, with the teacher's ``tokenizer``) samples the positives and judges through a server instead of
a loaded model (:mod:`~nemo_kd.generation.served_sampling`): ``num_samples`` per prompt in one request,
the same rows (equal to the in-process ones against ``nemo-kd-serve-teacher``), the server's fingerprint
and where the log-probs came from in the stage's ``.meta.json``.

Each stage's output is written atomically with its settings (:mod:`stages`): an
interrupted run resumes at the first unfinished stage. One run per ``output_dir``: the run
holds the directory's writer lock (:func:`~nemo_kd.generation.stages.output_writer`), so a
second run into it is refused naming the first; temporary files of a killed run are removed
at the next start. Under ``torchrun`` / ``srun`` the
prompts are split over data-parallel ranks (TP shards each model; PP must be 1 to sample).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from nemo_kd.generation.stages import (PipelineConfig, PolicySpec, atomic_write_json, atomic_write_jsonl, known_keys,
                                      load_policy, output_writer, run_stage)

SCORES = ("reference", "teacher_logprob")


@dataclass
class PreferencePipelineConfig(PipelineConfig):
    score: str = "reference"
    extract: Optional[str] = None  # regex of the answer inside a response (score=reference)
    pair_filter: Dict[str, Any] = field(default_factory=dict)  # PairFilterConfig fields

    @classmethod
    def from_dict(cls, d) -> "PreferencePipelineConfig":
        d = known_keys(cls, d, "pipeline")
        d["teacher"] = PolicySpec.from_dict(d.get("teacher"))
        d["student"] = PolicySpec.from_dict(d.get("student"))
        cfg = cls(**d)
        cfg.check_required()
        if cfg.score not in SCORES:
            raise ValueError(f"score={cfg.score!r} is not one of {list(SCORES)}")
        if cfg.score == "teacher_logprob":
            cfg.scoring_pack_length("teacher")  # the teacher judges: can it pack?
        return cfg


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    from nemo_kd.parallel import state

    return tqdm(total=total, desc=desc, disable=not enabled or state.global_rank() != 0, dynamic_ncols=True)


def run(cfg: PreferencePipelineConfig) -> Optional[Dict[str, Any]]:
    """Run the pipeline (module docstring); returns the report on global rank 0."""
    from nemo_kd.generation.filters import ResponseFilterConfig
    from nemo_kd.generation.pairs import PairFilterConfig
    from nemo_kd.generation.responses import read_prompts
    from nemo_kd.parallel import ParallelConfig, state

    t0 = time.time()
    pair_cfg = PairFilterConfig(**dict(cfg.pair_filter))
    pair_cfg.validate()
    resp_filter = ResponseFilterConfig(**dict(cfg.response_filter))
    prompts = read_prompts(cfg.prompts)
    if cfg.score == "reference":
        missing = [p.index for p in prompts if p.reference is None]
        if missing:
            raise ValueError(f"score=reference needs a 'reference' (or 'response') in every prompt of {cfg.prompts}; "
                             f"missing at prompt(s) {missing[:10]}")
    if not state.is_initialized():
        state.initialize_parallel(ParallelConfig(**dict(cfg.parallel)))
    os.makedirs(cfg.output_dir, exist_ok=True)
    with output_writer(cfg.output_dir, "preference pipeline output directory"):  # one run per output_dir
        return _run(cfg, prompts, pair_cfg, resp_filter, t0)


def _run(cfg: PreferencePipelineConfig, prompts, pair_cfg, resp_filter, t0: float) -> Optional[Dict[str, Any]]:
    """The stages, with the output directory's writer lock held."""
    from nemo_kd.generation.pairs import build_preference_pairs, verifier_score
    from nemo_kd.generation.responses import group_by_prompt, sample_responses, score_responses
    from nemo_kd.parallel import state

    path = lambda name: os.path.join(cfg.output_dir, name)  # noqa: E731
    base = {"prompts": os.path.abspath(cfg.prompts), "max_seq_length": cfg.max_seq_length}

    def sampled(role: str, spec: PolicySpec, policy, score_with_teacher: bool):
        def work(block):
            bar = _progress(len(block) * spec.num_samples, f"{role} samples", cfg.progress)
            rows = sample_responses(policy.model, policy.ctok, prompts[block.start:block.stop],
                                    spec.sampling_config(), spec.num_samples, vocab_size=policy.vocab_size,
                                    max_length=cfg.max_seq_length, batch_size=cfg.batch_size, progress=bar,
                                    served=policy.served)
            bar.close()
            if score_with_teacher:  # the teacher judges its own samples while loaded
                for r, (lps, _) in zip(rows, score_responses(policy.model, policy.ctok, rows,
                                                             vocab_size=policy.vocab_size,
                                                             batch_size=cfg.batch_size, served=policy.served,
                                                             pack_length=cfg.scoring_pack_length(role))):
                    r["teacher_mean_logprob"] = sum(lps) / max(len(lps), 1)
            return rows

        settings = dict(base, role=role, model=spec.identity(), score=cfg.score if score_with_teacher else None)
        return run_stage(path(f"{role}_responses.jsonl"), settings, len(prompts), work,
                         record=policy.record(spec.sampling_config()))

    # 1. student negatives (the student is loaded alone: one model in memory at a time)
    student = load_policy(cfg.student, cfg.max_seq_length)
    negatives = sampled("student", cfg.student, student, score_with_teacher=False)
    _release(student)
    student = None  # one model in memory at a time
    # 2. teacher positives, and (score=teacher_logprob) the teacher's judgement of both sides
    teacher = load_policy(cfg.teacher, cfg.max_seq_length)
    positives = sampled("teacher", cfg.teacher, teacher, score_with_teacher=cfg.score == "teacher_logprob")
    if cfg.score == "teacher_logprob":
        def judge(block):
            rows = [r for r in all_negatives if block.start <= r["prompt_index"] < block.stop]
            for r, (lps, _) in zip(rows, score_responses(teacher.model, teacher.ctok, rows,
                                                         vocab_size=teacher.vocab_size, batch_size=cfg.batch_size,
                                                         served=teacher.served,
                                                         pack_length=cfg.scoring_pack_length("teacher"))):
                r["teacher_mean_logprob"] = sum(lps) / max(len(lps), 1)
            return rows

        import torch.distributed as dist

        all_negatives = negatives
        if dist.is_initialized() and dist.get_world_size() > 1:  # every rank judges its block of prompts
            box = [negatives]
            dist.broadcast_object_list(box, src=0)
            all_negatives = box[0]
        negatives = run_stage(path("student_responses_judged.jsonl"),
                              dict(base, role="judge", model=cfg.teacher.identity()), len(prompts), judge,
                              record=teacher.record())
    _release(teacher)
    teacher = None  # free it: nothing below needs a model
    if state.global_rank() != 0:
        return None

    # 3–5. scores, filters, the pair-wise preference filter
    if cfg.score == "reference":
        score = lambda p, r: verifier_score(r["response"], p.reference, cfg.extract)  # noqa: E731
    else:
        score = lambda p, r: r["teacher_mean_logprob"]  # noqa: E731
    pairs, report = build_preference_pairs(prompts, group_by_prompt(positives), group_by_prompt(negatives), score,
                                           pair_cfg, resp_filter)
    atomic_write_jsonl(path("pairs.jsonl"), pairs)
    out = {
        "prompts": report["prompts"], "pairs": report["pairs"], "prompts_without_pair": report["prompts_without_pair"],
        "teacher_samples": len(positives), "student_samples": len(negatives),
        "mean_score_teacher": _mean(score(prompts[r["prompt_index"]], r) for r in positives),
        "mean_score_student": _mean(score(prompts[r["prompt_index"]], r) for r in negatives),
        "positive_filter": {"kept": report["positive_filter"].kept, **report["positive_filter"].dropped},
        "negative_filter": {"kept": report["negative_filter"].kept, **report["negative_filter"].dropped},
        "seconds": time.time() - t0,
    }
    atomic_write_json(path("report.json"), out)
    print(f"pairs: {out['pairs']} from {out['prompts']} prompts ({out['prompts_without_pair']} without a pair); "
          f"mean score teacher {out['mean_score_teacher']:.3f} vs student {out['mean_score_student']:.3f}; "
          f"-> {path('pairs.jsonl')}", flush=True)
    return out


def _release(policy) -> None:
    """Drop a loaded model (the caller's reference goes too); a served teacher's client is closed."""
    if policy is not None and policy.served is not None:
        policy.served.close()


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def run_from_config(cfg) -> Optional[Dict[str, Any]]:
    """Hydra / OmegaConf entry point (``conf/build_preference_pairs.yaml``)."""
    from omegaconf import OmegaConf

    return run(PreferencePipelineConfig.from_dict(OmegaConf.to_container(cfg, resolve=True)))
