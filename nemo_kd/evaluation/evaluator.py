"""Score students on an eval set: generate (greedy or sampled, TP, DP over the data), score each sample, summarise.

One student's pass, given its loaded model chunk and tokenizer::

    records (read_records: the training readers, prompt/response or messages)
      -> prompt ids: ConversationTokenizer.render_prompt (the text sampling starts from, as in training)
      -> this DP rank's block of prompts (shard_sample_range) -> nemo_kd.generation.sampling.generate
         (Megatron's KV cache; every TP rank the same) -> all DP blocks gathered on every rank
      -> per-sample rows: prompt, reference, response, token length, finished, rouge_l, exact_match
         (and a task checker's score, e.g. the cipher's)
      -> summary: each score's mean with its bootstrap interval, length statistics

:func:`compare` adds the paired differences between students scored on the same prompts.
The held-out CE / KL terms are the main job's (:func:`nemo_kd.evaluation.metrics.heldout_metrics`),
run by the console script (:mod:`nemo_kd.evaluation.cli`), which owns the engine that computes them.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

from nemo_kd.data.records import RecordSet, read_records
from nemo_kd.data.tokenization import ConversationTokenizer
from nemo_kd.evaluation.metrics import exact_match_scores, normalize_answer, rouge_l_scores
from nemo_kd.evaluation.stats import bootstrap_interval, length_statistics, paired_difference
from nemo_kd.generation.sampling import Generation, SamplingConfig, generate

__all__ = ["EvalSettings", "load_eval_records", "prompt_token_ids", "generate_responses", "score_samples",
           "summarize", "compare", "cipher_checker", "SCORES"]

SCORES = ("rouge_l", "exact_match")  # always computed; a checker adds "checker"


@dataclass
class EvalSettings:
    """How students are sampled, scored and summarised (``conf/evaluate.yaml``: ``generation``, ``metrics``,
    ``bootstrap``)."""

    temperature: float = 0.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 128
    seed: int = 1234
    batch_size: int = 32
    rouge_stemmer: bool = True
    rouge_tokenizer: str = "default"  # default (rouge-score's) | whitespace
    exact_match: Dict[str, bool] = field(default_factory=dict)  # normalize_answer options
    bootstrap_resamples: int = 2000
    confidence: float = 0.95
    bootstrap_seed: int = 0

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              max_new_tokens=self.max_new_tokens, seed=self.seed)


def load_eval_records(path: str, split: Optional[str] = None, skip_bad_samples: bool = False,
                      limit: Optional[int] = None) -> RecordSet:
    """The eval set through the training readers; the first ``limit`` samples when given. Preference
    pairs are refused (an eval set has one reference per prompt)."""
    records = read_records(path, skip_bad_samples=skip_bad_samples, split=split)
    if records.is_preference:
        raise ValueError(f"{path}: a preference set (chosen/rejected pairs); evaluation needs one reference "
                         "response per prompt")
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1 or null, got {limit}")
        records = RecordSet(records.records[:limit], records.skipped, records.source)
    return records


def prompt_token_ids(tokenizer, records: RecordSet, prompt_format: str = "chat") -> List[List[int]]:
    """Each record's prompt as the student reads it before answering (its chat template's generation
    prompt, or ``plain``'s prompt line), tokenised without added special tokens."""
    render = ConversationTokenizer(tokenizer, prompt_format).render_prompt
    return [list(tokenizer(render(r.prompt_messages), add_special_tokens=False)["input_ids"]) for r in records]


def generate_responses(model, tokenizer, prompts: Sequence[Sequence[int]], settings: EvalSettings,
                       vocab_size: int, max_length: Optional[int] = None, progress=None) -> List[Generation]:
    """Completions of every prompt, this DP rank generating its block (the draws depend on the prompt's
    global index only, so the result does not depend on DP); every rank returns all of them."""
    import torch.distributed as dist

    from nemo_kd.parallel import state
    from nemo_kd.teacher.store import shard_sample_range

    dp = state.dp_size() if state.is_initialized() else 1
    block = shard_sample_range(len(prompts), state.dp_rank() if dp > 1 else 0, dp)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    mine = generate(model, [prompts[i] for i in block], settings.sampling, eos_id=eos, pad_id=pad,
                    vocab_size=vocab_size, max_length=max_length, batch_size=settings.batch_size,
                    sample_offset=block.start, progress=progress, tokenizer=tokenizer)
    if dp == 1:
        return mine
    blocks: List[Optional[List[Generation]]] = [None] * dp
    dist.all_gather_object(blocks, mine, group=state.dp_group())
    return list(itertools.chain.from_iterable(blocks))


def cipher_checker(task_json: str) -> Callable[[str, str], float]:
    """The cipher task's checker (:mod:`nemo_kd.data.synthetic_task`, its ``task.json``): 1.0 when the response
    is the correct encoding of the prompt's word, whatever the reference says (a noisy label)."""
    from nemo_kd.data.synthetic_task import CipherTask, TaskConfig

    with open(task_json) as f:
        task = CipherTask(TaskConfig(**json.load(f)["config"]))
    return lambda prompt, response: float(normalize_answer(response) == task.answer(prompt))


def score_samples(records: RecordSet, generations: Sequence[Generation], settings: EvalSettings,
                  checker: Optional[Callable[[str, str], float]] = None) -> List[dict]:
    """One row per sample: ``index``, ``id``, ``prompt``, ``reference``, ``response``, ``response_tokens``,
    ``response_words``, ``finished`` and the scores (``rouge_l`` in [0, 1], ``exact_match``, ``checker``)."""
    if len(records) != len(generations):
        raise ValueError(f"{len(generations)} generations for {len(records)} records")
    prompts = [r.prompt_text for r in records]
    refs = [r.completion_text for r in records]
    preds = [g.text for g in generations]
    rouge = rouge_l_scores(preds, refs, use_stemmer=settings.rouge_stemmer, tokenizer=settings.rouge_tokenizer)
    em = exact_match_scores(preds, refs, **settings.exact_match)
    rows = []
    for i, (r, g) in enumerate(zip(records, generations)):
        row = dict(index=r.index, id=r.id, prompt=prompts[i], reference=refs[i], response=preds[i],
                   response_tokens=len(g.token_ids), response_words=len(preds[i].split()), finished=g.finished,
                   rouge_l=rouge[i], exact_match=em[i])
        if checker is not None:
            row["checker"] = checker(prompts[i], preds[i])
        rows.append(row)
    return rows


def _score_names(rows: Sequence[dict]) -> List[str]:
    return list(SCORES) + (["checker"] if rows and "checker" in rows[0] else [])


def summarize(rows: Sequence[dict], settings: EvalSettings) -> dict:
    """``scores``: each score's mean and bootstrap interval; ``lengths``: statistics of the response lengths
    in tokens and words (with their own interval of the mean token length); ``finished``: the fraction
    that ended with the end token (the rest hit ``max_new_tokens`` or the position limit)."""
    boot = dict(confidence=settings.confidence, num_resamples=settings.bootstrap_resamples,
                seed=settings.bootstrap_seed)
    scores = {name: bootstrap_interval([r[name] for r in rows], **boot).to_dict() for name in _score_names(rows)}
    tokens = [r["response_tokens"] for r in rows]
    return dict(num_samples=len(rows), scores=scores,
                lengths=dict(tokens=length_statistics(tokens), words=length_statistics([r["response_words"]
                                                                                         for r in rows]),
                             tokens_interval=bootstrap_interval(tokens, **boot).to_dict()),
                finished=(sum(r["finished"] for r in rows) / len(rows)) if rows else math.nan)


def compare(rows_by_student: Dict[str, Sequence[dict]], settings: EvalSettings) -> List[dict]:
    """Paired differences ``a − b`` of every score for every pair of students (in the given order), over the
    same prompts (checked by index)."""
    out = []
    names = list(rows_by_student)
    for a, b in itertools.combinations(names, 2):
        ra, rb = rows_by_student[a], rows_by_student[b]
        if [r["index"] for r in ra] != [r["index"] for r in rb]:
            raise ValueError(f"students {a!r} and {b!r} were not scored on the same prompts")
        for name in _score_names(ra):
            d = paired_difference([r[name] for r in ra], [r[name] for r in rb], confidence=settings.confidence,
                                  num_resamples=settings.bootstrap_resamples, seed=settings.bootstrap_seed)
            out.append(dict(a=a, b=b, score=name, significant=d.significant, **d.to_dict()))
    return out
