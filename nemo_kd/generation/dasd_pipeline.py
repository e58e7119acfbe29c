"""DASD distillation data: temperature-scheduled teacher samples, response filters,
divergence-aware selection and (optionally) mixed-policy samples, one training file per stage.

The data side of DASD (arXiv 2601.09088; seed diagram "Temperature-scheduled Learning →
Response Filtering → Low/High-temperature Responses → Divergence-aware Sampling ← Teacher
Model", plus "Mixed-policy Distillation"). For every temperature stage of ``stages``
(default ``low`` at T = 0.6, then ``high`` at T = 1.0), under ``<output_dir>/<stage>/``:

1. **teacher samples** – the teacher draws ``num_samples`` candidates per prompt at the
   stage's temperature (``teacher_responses.jsonl``: rows of
   :func:`~nemo_kd.generation.responses.sample_responses`, with the teacher's log-probs at
   temperature 1 and their character spans);
2. **response filters** – :class:`~nemo_kd.generation.filters.ResponseFilterConfig`;
   ``max_tokens`` counts the *student's* tokens (the response text encoded by the student's
   tokenizer, ``student_num_tokens``);
3. **divergence-aware sampling** – the student scores every surviving candidate
   (teacher-forced log-probs, :func:`~nemo_kd.generation.responses.score_responses`); per
   sentence p_T (the teacher's sampling-time log-probs at temperature 1) vs p_S (the
   student's), teacher / student / common sentences at ``beta``
   (:func:`~nemo_kd.generation.divergence.sentence_divergence`). Every candidate with its filter
   verdict and sentence counts → ``scored.jsonl`` (``pack_sequences``: the (prompt, response) pairs packed
   into rows of ``pack_length``, :func:`~nemo_kd.generation.sampling.response_logprobs`). Per prompt ``selection`` keeps
   ``divergence``: the candidate :func:`~nemo_kd.generation.divergence.select_candidates`
   picks (most teacher sentences); ``first``: the first surviving candidate; ``all``: every
   surviving one (the ablations) → ``selected.jsonl``;
4. **mixed policy** (``mixed_policy.enabled``, off by default) – for each prompt with a
   selection (its first selected response), the student rolls out with a budget of
   ``length_ratio`` × that response's student-token length; a rollout that runs out of
   budget is cut past its middle and the teacher continues it
   (:func:`~nemo_kd.generation.mixed_policy.mixed_policy_samples`). Every continuation with
   its verdict under the same filters → ``mixed.jsonl`` (``filter: null`` = kept);
5. **training file** – ``train.jsonl``: ``{"id", "messages": prompt + [assistant
   response]}`` for the selected responses, then the kept mixed samples (student prefixes
   are not masked: they are ordinary records), what :func:`nemo_kd.data.read_records` reads.
   Ids are the prompt's id when there is one record per prompt, else ``<id>#<sample>`` and
   ``<id>#mixed``.

``report.json`` sums it up per stage (candidates, filter counts, selected, sentence totals,
mixed samples, training samples).

Training is not part of this module. The stages' training files are trained *in order*,
each stage starting from the previous stage's ``student.nemo`` (``model.student_init``).
DASD's loss is plain SFT on the teacher samples (``model.teacher.mode=none``)::

    python examples/train_gpt_kd.py model.teacher.mode=none model.kd.kd_loss_weight=0 \\
        model.kd.sft_loss_weight=1 model.data.train_ds.logits_store=null \\
        model.data.train_ds.file_path=/data/dasd/low/train.jsonl model.data.train_ds.tokenizer=/tok \\
        model.student_init=/ckpt/student exp_manager.explicit_log_dir=/runs/dasd_low
    python examples/train_gpt_kd.py model.teacher.mode=none model.kd.kd_loss_weight=0 \\
        model.kd.sft_loss_weight=1 model.data.train_ds.logits_store=null \\
        model.data.train_ds.file_path=/data/dasd/high/train.jsonl model.data.train_ds.tokenizer=/tok \\
        model.student_init=/runs/dasd_low/student.nemo exp_manager.explicit_log_dir=/runs/dasd_high

For KD on the same samples instead, first store the teacher's top-k over each stage's
``train.jsonl`` (``nemo-kd-compute-topk-logits data_path=/data/dasd/low/train.jsonl
output_path=/stores/dasd_low teacher.path=/ckpt/teacher.nemo ...``) and train with
``model.teacher.mode=offline model.data.train_ds.logits_store=/stores/dasd_low`` (same
``student_init`` chaining).

``teacher.type: served`` (``url``, ``model``, ``dialect``, ``api_key_env``, ... as extraction's served
teacher, with the teacher's ``tokenizer``) draws the candidates through a server
(:mod:`~nemo_kd.generation.served_sampling`): ``num_samples`` per prompt in one request at the stage's
temperature, log-probs at temperature 1 (the server's, or rescored with ``prompt_logprobs``:
``teacher.sampled_logprobs``, recorded in ``teacher_responses.jsonl.meta.json``), per-request seeds (the
in-process draws against ``nemo-kd-serve-teacher``). Mixed policy needs the teacher in process.

Models: the teacher is loaded alone to sample every stage, then the student alone to score
them; both are in memory only for the mixed-policy phase. A model is loaded only when one of
its phases still has work. Every costly output (``teacher_responses``, ``scored``,
``mixed``) is written atomically with its settings by
:func:`~nemo_kd.generation.stages.run_stage`; each stage's settings include those of the
stages it reads, so a rerun resumes at the first unfinished output and outputs of other
settings are refused (delete them and the ones after them). ``selected.jsonl``,
``train.jsonl`` and ``report.json`` are cheap and rewritten on every run. One run per
``output_dir``: the run holds the directory's writer lock
(:func:`~nemo_kd.generation.stages.output_writer`), so a second run into it is refused naming
the first; temporary files a killed run left (in ``output_dir`` and its stage directories)
are removed at the next start. Under ``torchrun``
/ ``srun`` the prompts are split over data-parallel ranks (TP shards each model; PP must be
1 to sample).
"""

from __future__ import annotations

import glob
import os
import re
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional

from nemo_kd.generation.stages import (TEMP_GLOBS, PipelineConfig, PolicySpec, atomic_write_json, atomic_write_jsonl,
                                      known_keys, load_policy, output_writer, run_stage, stage_done)

SELECTIONS = ("divergence", "first", "all")
_STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_MODEL_KEYS = ("checkpoint", "tokenizer", "prompt_format", "backend", "trust_remote_code")


@dataclass
class DASDStage:
    """One temperature stage: the teacher's candidates at ``temperature``."""

    name: str = "???"
    temperature: float = 1.0
    num_samples: int = 4
    sampling: Dict[str, Any] = field(default_factory=dict)  # overrides of teacher.sampling (not temperature)

    @classmethod
    def from_dict(cls, d) -> "DASDStage":
        st = cls(**known_keys(cls, d, "stage"))
        st.sampling = dict(st.sampling or {})
        if not isinstance(st.name, str) or not _STAGE_NAME.match(st.name):
            raise ValueError(f"stage name {st.name!r} must be a directory name ([A-Za-z0-9_.-], not starting "
                             "with '.', '-' or '_')")
        if "temperature" in st.sampling:
            raise ValueError(f"stage {st.name}: give the temperature as the stage's `temperature`, not in `sampling`")
        if not (isinstance(st.num_samples, int) and st.num_samples >= 1):
            raise ValueError(f"stage {st.name}: num_samples must be an integer >= 1, got {st.num_samples!r}")
        return st


def _default_stages() -> List[DASDStage]:
    return [DASDStage("low", 0.6), DASDStage("high", 1.0)]


@dataclass
class MixedPolicySettings:
    enabled: bool = False
    length_ratio: float = 1.5  # student budget = ⌈length_ratio · selected response's student tokens⌉
    min_cut_fraction: float = 0.5  # cut past this fraction of the student's rollout
    seed: int = 0  # cut points
    student_sampling: Dict[str, Any] = field(default_factory=dict)  # overrides of the stage's sampling
    teacher_sampling: Dict[str, Any] = field(default_factory=dict)  # overrides of the stage's sampling

    @classmethod
    def from_dict(cls, d) -> "MixedPolicySettings":
        m = cls(**known_keys(cls, d, "mixed_policy"))
        m.student_sampling, m.teacher_sampling = dict(m.student_sampling or {}), dict(m.teacher_sampling or {})
        m.policy_config().validate()
        return m

    def policy_config(self):
        from nemo_kd.generation.mixed_policy import MixedPolicyConfig

        return MixedPolicyConfig(self.length_ratio, self.min_cut_fraction, self.seed)


@dataclass
class DASDPipelineConfig(PipelineConfig):
    """``teacher.sampling``: the base of every stage's sampling; ``student``: scores the
    candidates (and rolls out, mixed policy)."""

    stages: List[DASDStage] = field(default_factory=_default_stages)
    selection: str = "divergence"  # divergence | first | all
    beta: float = 0.1  # sentence threshold on p_T − p_S
    mixed_policy: MixedPolicySettings = field(default_factory=MixedPolicySettings)

    @classmethod
    def from_dict(cls, d) -> "DASDPipelineConfig":
        d = known_keys(cls, d, "pipeline")
        for role in ("teacher", "student"):
            if "num_samples" in dict(d.get(role) or {}):
                raise ValueError(f"{role}.num_samples is not used here: give `num_samples` per stage")
        if "sampling" in dict(d.get("student") or {}):
            raise ValueError("student.sampling is not used here: the mixed-policy rollout's sampling is "
                             "mixed_policy.student_sampling (overrides of the stage's sampling)")
        d["teacher"] = PolicySpec.from_dict(d.get("teacher"))
        d["student"] = PolicySpec.from_dict(d.get("student"))
        if "stages" in d:
            d["stages"] = [DASDStage.from_dict(s) for s in (d["stages"] or [])]
        d["mixed_policy"] = MixedPolicySettings.from_dict(d.get("mixed_policy"))
        cfg = cls(**d)
        cfg.check_required()
        if not cfg.stages:
            raise ValueError("`stages` is empty")
        names = [s.name for s in cfg.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        if cfg.selection not in SELECTIONS:
            raise ValueError(f"selection={cfg.selection!r} is not one of {list(SELECTIONS)}")
        if not 0.0 <= cfg.beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {cfg.beta}")
        if cfg.mixed_policy.enabled and cfg.teacher.type == "served":
            raise ValueError("mixed_policy.enabled with teacher.type=served is not supported: the teacher's "
                             "continuations of student prefixes run in process (load the teacher, or turn "
                             "mixed_policy off)")
        for st in cfg.stages:  # fail on bad sampling settings before any model is loaded
            cfg.stage_sampling(st)
            cfg.mixed_sampling(st)
        cfg.scoring_pack_length("student")  # the student scores the candidates: can it pack?
        return cfg

    def stage_sampling(self, stage: DASDStage):
        """The teacher's sampling at ``stage``: teacher.sampling, the stage's overrides, its temperature."""
        from nemo_kd.generation.sampling import SamplingConfig

        return SamplingConfig(**{**dict(self.teacher.sampling), **stage.sampling, "temperature": stage.temperature})

    def mixed_sampling(self, stage: DASDStage):
        """(student rollout, teacher continuation) sampling of the mixed-policy phase at ``stage``."""
        from dataclasses import replace

        base = self.stage_sampling(stage)
        mp = self.mixed_policy
        return replace(base, **mp.student_sampling), replace(base, **mp.teacher_sampling)


def _model_identity(spec: PolicySpec) -> Dict[str, Any]:
    return spec.identity(_MODEL_KEYS)


def _filter_settings(f) -> Dict[str, Any]:
    return {x.name: getattr(f, x.name) for x in fields(f) if x.init}


def _broadcast(obj):
    """``obj`` of global rank 0 on every rank."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def _pending(path: str, settings: Dict[str, Any]) -> bool:
    """Whether the stage output ``path`` still has to be computed (the same answer on every rank)."""
    from nemo_kd.parallel import state

    return not _broadcast(stage_done(path, settings) if state.global_rank() == 0 else None)


def _student_num_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


_ROW_KEYS = ("id", "prompt_index", "sample", "messages", "response", "finished", "num_tokens", "temperature",
             "reference")


def run(cfg: DASDPipelineConfig) -> Optional[Dict[str, Any]]:
    """Run the pipeline (module docstring); returns the report on global rank 0."""
    from nemo_kd.generation.filters import ResponseFilterConfig
    from nemo_kd.generation.responses import read_prompts
    from nemo_kd.parallel import ParallelConfig, state

    t0 = time.time()
    resp_filter = ResponseFilterConfig(**dict(cfg.response_filter))
    prompts = read_prompts(cfg.prompts)
    if not state.is_initialized():
        state.initialize_parallel(ParallelConfig(**dict(cfg.parallel)))
    os.makedirs(cfg.output_dir, exist_ok=True)
    temps = TEMP_GLOBS + tuple(f"{glob.escape(st.name)}/{g}" for st in cfg.stages for g in TEMP_GLOBS)
    with output_writer(cfg.output_dir, "DASD pipeline output directory", temps):  # one run per output_dir
        return _run(cfg, prompts, resp_filter, t0)


def _run(cfg: DASDPipelineConfig, prompts, resp_filter, t0: float) -> Optional[Dict[str, Any]]:
    """The phases, with the output directory's writer lock held."""
    from nemo_kd.generation.divergence import sentence_divergence
    from nemo_kd.generation.filters import filter_response
    from nemo_kd.generation.preference_pipeline import _progress
    from nemo_kd.generation.responses import sample_responses, score_responses
    from nemo_kd.parallel import state

    rank0 = state.global_rank() == 0
    path = lambda stage, name: os.path.join(cfg.output_dir, stage.name, name)  # noqa: E731
    base = {"prompts": os.path.abspath(cfg.prompts), "max_seq_length": cfg.max_seq_length}
    mixed_on = cfg.mixed_policy.enabled
    settings: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for st in cfg.stages:  # each output's settings include those of the outputs it reads
        sample = dict(base, phase="teacher_samples", stage=st.name, teacher=_model_identity(cfg.teacher),
                      num_samples=st.num_samples, sampling=asdict(cfg.stage_sampling(st)))
        score = dict(sample, phase="student_scores", student=_model_identity(cfg.student),
                     response_filter=_filter_settings(resp_filter), beta=cfg.beta)
        s_roll, t_cont = cfg.mixed_sampling(st)
        mixed = dict(score, phase="mixed_policy", selection=cfg.selection,
                     mixed_policy=asdict(cfg.mixed_policy.policy_config()), student_sampling=asdict(s_roll),
                     teacher_sampling=asdict(t_cont))
        settings[st.name] = {"teacher_responses.jsonl": sample, "scored.jsonl": score, "mixed.jsonl": mixed}
    pending = {(st.name, name): _pending(path(st, name), s)
               for st in cfg.stages for name, s in settings[st.name].items()
               if name != "mixed.jsonl" or mixed_on}

    def needs(name: str) -> bool:
        return any(v for (_, n), v in pending.items() if n == name)

    # 1. teacher candidates, every stage (the teacher alone in memory)
    teacher = load_policy(cfg.teacher, cfg.max_seq_length) if needs("teacher_responses.jsonl") else None
    candidates: Dict[str, Optional[List[Dict[str, Any]]]] = {}
    for st in cfg.stages:
        sampling = cfg.stage_sampling(st)

        def sample_work(block, st=st, sampling=sampling):
            bar = _progress(len(block) * st.num_samples, f"{st.name} teacher samples (T={st.temperature})",
                            cfg.progress)
            rows = sample_responses(teacher.model, teacher.ctok, prompts[block.start:block.stop], sampling,
                                    st.num_samples, vocab_size=teacher.vocab_size, max_length=cfg.max_seq_length,
                                    batch_size=cfg.batch_size, progress=bar, served=teacher.served)
            bar.close()
            return rows

        candidates[st.name] = run_stage(path(st, "teacher_responses.jsonl"),
                                        settings[st.name]["teacher_responses.jsonl"], len(prompts), sample_work,
                                        record=teacher.record(sampling) if teacher is not None else None)
    if teacher is not None and teacher.served is not None:
        teacher.served.close()
    teacher = None

    # 2-3. student token counts, filters, the student's scores (the student alone in memory)
    student = load_policy(cfg.student, cfg.max_seq_length) if needs("scored.jsonl") else None
    scored: Dict[str, Optional[List[Dict[str, Any]]]] = {}
    for st in cfg.stages:
        rows_all = _broadcast(candidates[st.name]) if pending[(st.name, "scored.jsonl")] else None

        def score_work(block, rows_all=rows_all):
            rows = [r for r in rows_all if block.start <= r["prompt_index"] < block.stop]
            tok = student.ctok.tokenizer
            out = []
            for r in rows:
                n = _student_num_tokens(tok, r["response"])
                verdict = filter_response(r["response"], num_tokens=n, finished=r["finished"], cfg=resp_filter)
                out.append(dict({k: r[k] for k in _ROW_KEYS if k in r}, student_num_tokens=n,
                                filter=verdict.reason, divergence=None))
            keep = [i for i, o in enumerate(out) if o["filter"] is None]
            for i, (lps, spans) in zip(keep, score_responses(student.model, student.ctok, [rows[i] for i in keep],
                                                             vocab_size=student.vocab_size,
                                                             batch_size=cfg.batch_size,
                                                             pack_length=cfg.scoring_pack_length("student"))):
                r = rows[i]
                if r.get("logprobs") is None:
                    raise ValueError(f"prompt {r['prompt_index']} sample {r.get('sample')}: no teacher log-probs")
                out[i]["divergence"] = sentence_divergence(r["response"], r["token_offsets"], r["logprobs"], spans,
                                                           lps, cfg.beta).score.to_dict()
                out[i]["student_mean_logprob"] = sum(lps) / max(len(lps), 1)
            return out

        scored[st.name] = run_stage(path(st, "scored.jsonl"), settings[st.name]["scored.jsonl"], len(prompts),
                                    score_work)

    # 3. selection (cheap: global rank 0, then shared with the ranks that mix)
    selected = {st.name: _select(scored[st.name], cfg.selection) if rank0 else None for st in cfg.stages}

    # 4. mixed policy (student and teacher both in memory)
    mixed: Dict[str, Optional[List[Dict[str, Any]]]] = {st.name: [] for st in cfg.stages}
    if mixed_on:
        if needs("mixed.jsonl"):
            student = student or load_policy(cfg.student, cfg.max_seq_length)
            teacher = load_policy(cfg.teacher, cfg.max_seq_length)
        for st in cfg.stages:
            sel_all = _broadcast(selected[st.name]) if pending[(st.name, "mixed.jsonl")] else None
            s_roll, t_cont = cfg.mixed_sampling(st)

            def mixed_work(block, sel_all=sel_all, s_roll=s_roll, t_cont=t_cont, st=st):
                rows = [r for r in sel_all if block.start <= r["prompt_index"] < block.stop]
                return _mixed_rows(cfg, st, prompts, rows, student, teacher, s_roll, t_cont, resp_filter,
                                   filter_response, _progress)

            mixed[st.name] = run_stage(path(st, "mixed.jsonl"), settings[st.name]["mixed.jsonl"], len(prompts),
                                       mixed_work)
    student = teacher = None
    if not rank0:
        return None

    # 5. training files and the report
    report: Dict[str, Any] = {"prompts": len(prompts), "selection": cfg.selection, "beta": cfg.beta, "stages": {}}
    for st in cfg.stages:
        sel, mix = selected[st.name], mixed[st.name] or []
        atomic_write_jsonl(path(st, "selected.jsonl"), sel)
        kept_mixed = [r for r in mix if r["filter"] is None]
        train = _train_records(sel, kept_mixed, one_per_prompt=cfg.selection != "all")
        atomic_write_jsonl(path(st, "train.jsonl"), train)
        rep = _stage_report(st, cfg.stage_sampling(st), candidates[st.name], scored[st.name], sel,
                            mix if mixed_on else None, len(prompts), len(train))
        report["stages"][st.name] = rep
        print(f"[{st.name}] T={st.temperature}: {rep['candidates']} candidates, {rep['filter']['kept']} pass the "
              f"filters, {rep['selected']} selected ({rep['prompts_without_selection']} prompts without one)"
              + (f", {rep['mixed']['kept']} mixed samples" if mixed_on else "")
              + f" -> {path(st, 'train.jsonl')} ({len(train)} samples)", flush=True)
    report["seconds"] = time.time() - t0
    atomic_write_json(os.path.join(cfg.output_dir, "report.json"), report)
    return report


def _select(scored: List[Dict[str, Any]], selection: str) -> List[Dict[str, Any]]:
    """The kept candidates, per prompt in prompt order (see ``selection`` in the module docstring)."""
    from nemo_kd.generation.divergence import DivergenceScore, select_candidates
    from nemo_kd.generation.responses import group_by_prompt

    out = []
    for pi, group in sorted(group_by_prompt(scored).items()):
        ok = [i for i, r in enumerate(group) if r["filter"] is None]
        if not ok:
            continue
        if selection == "all":
            picks = ok
        elif selection == "first":
            picks = ok[:1]
        else:
            scores = [DivergenceScore(**r["divergence"]) if r["filter"] is None and r["divergence"] else None
                      for r in group]
            pick = select_candidates(scores)
            picks = [] if pick is None else [pick]
        out.extend({k: v for k, v in group[i].items() if k != "filter"} for i in picks)
    return out


def _contiguous_runs(rows: List[Dict[str, Any]]) -> List[List[Dict[str, Any]]]:
    runs: List[List[Dict[str, Any]]] = []
    for r in rows:
        if runs and runs[-1][-1]["prompt_index"] + 1 == r["prompt_index"]:
            runs[-1].append(r)
        else:
            runs.append([r])
    return runs


def _mixed_rows(cfg: DASDPipelineConfig, st: DASDStage, prompts, selected_rows, student, teacher, s_roll, t_cont,
                resp_filter, filter_response, progress) -> List[Dict[str, Any]]:
    """Mixed-policy continuations for the prompts of ``selected_rows`` (one per prompt, the first
    selected response's student-token length sets the budget), with their filter verdicts.

    Prompt ``i``'s rollout draws with sample index ``i`` (and its cut with ``(seed, i)``) however
    the prompts are split over ranks: each run of consecutive prompts goes with its first index."""
    from nemo_kd.generation.mixed_policy import mixed_policy_samples

    first: Dict[int, Dict[str, Any]] = {}
    for r in selected_rows:
        first.setdefault(r["prompt_index"], r)
    rows = [first[i] for i in sorted(first)]
    bar = progress(len(rows), f"{st.name} mixed-policy rollouts", cfg.progress)
    out = []
    for run_rows in _contiguous_runs(rows):
        samples, _ = mixed_policy_samples(
            student.model, teacher.model, student.ctok, teacher.ctok, [r["messages"] for r in run_rows],
            [r["student_num_tokens"] for r in run_rows], cfg.mixed_policy.policy_config(), s_roll, t_cont,
            student_vocab_size=student.vocab_size, teacher_vocab_size=teacher.vocab_size,
            max_length=cfg.max_seq_length, batch_size=cfg.batch_size, sample_offset=run_rows[0]["prompt_index"])
        bar.update(len(run_rows))
        for s in samples:
            p = prompts[s.index]
            n = _student_num_tokens(student.ctok.tokenizer, s.response)
            verdict = filter_response(s.response, num_tokens=n, finished=s.finished, cfg=resp_filter)
            row = {"id": p.id, "prompt_index": p.index, "sample": "mixed", "messages": [dict(m) for m in p.messages],
                   "response": s.response, "prefix": s.prefix, "continuation": s.continuation, "cut": s.cut,
                   "student_tokens": s.student_tokens, "finished": s.finished, "temperature": t_cont.temperature,
                   "budget_from_student_num_tokens": first[p.index]["student_num_tokens"],
                   "student_num_tokens": n, "filter": verdict.reason}
            if p.reference is not None:
                row["reference"] = p.reference
            out.append(row)
    bar.close()
    return out


def _train_records(selected, kept_mixed, one_per_prompt: bool) -> List[Dict[str, Any]]:
    def rec(r, rid):
        return {"id": rid, "messages": [dict(m) for m in r["messages"]] + [{"role": "assistant",
                                                                           "content": r["response"]}]}

    out = [rec(r, r["id"] if one_per_prompt else f"{r['id']}#{r['sample']}") for r in selected]
    out += [rec(r, f"{r['id']}#mixed") for r in kept_mixed]
    return out


def _stage_report(st, sampling, candidates, scored, selected, mixed, num_prompts, num_train) -> Dict[str, Any]:
    from nemo_kd.generation.filters import FilterReport, FilterVerdict

    def sentences(rows):
        tot = {"teacher": 0, "student": 0, "common": 0, "unscored": 0}
        for r in rows:
            for k in tot:
                tot[k] += (r.get("divergence") or {}).get(f"num_{k}", 0)
        return tot

    def filter_counts(rows):
        fr = FilterReport()
        for r in rows:
            fr.add(FilterVerdict(r["filter"] is None, r["filter"]))
        return {"kept": fr.kept, "dropped": fr.num_dropped, "total": fr.total, "reasons": dict(fr.dropped)}

    rep = {
        "temperature": st.temperature, "num_samples": st.num_samples, "sampling": asdict(sampling),
        "candidates": len(candidates if candidates is not None else scored),
        "filter": filter_counts(scored),
        "selected": len(selected),
        "prompts_without_selection": num_prompts - len({r["prompt_index"] for r in selected}),
        "selected_sentences": sentences(selected),
        "candidate_sentences": sentences(r for r in scored if r["filter"] is None),
        "mixed": None,
        "train_samples": num_train,
    }
    if mixed is not None:
        rollouts = len({r["prompt_index"] for r in selected})
        rep["mixed"] = {"rollouts": rollouts, "truncated": len(mixed), "finished_within_budget": rollouts - len(mixed),
                        "kept": sum(r["filter"] is None for r in mixed), "filter": filter_counts(mixed)}
    return rep


def run_from_config(cfg) -> Optional[Dict[str, Any]]:
    """Hydra / OmegaConf entry point (``conf/build_dasd_data.yaml``)."""
    from omegaconf import OmegaConf

    return run(DASDPipelineConfig.from_dict(OmegaConf.to_container(cfg, resolve=True)))
