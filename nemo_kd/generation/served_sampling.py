"""Sampling and scoring with a served teacher (``teacher.type: served``): the pipelines' stages, over HTTP.

:class:`ServedPolicy` stands where a loaded model stands in :mod:`stages`: :meth:`ServedPolicy.generate`
draws ``n`` completions per prompt (one request per prompt, ``n`` choices, ``concurrency`` requests in
flight through :class:`~nemo_kd.teacher.served.TeacherClient`) and returns the in-process sampler's
:class:`~nemo_kd.generation.sampling.Generation` records; :meth:`ServedPolicy.score` returns teacher-forced
log-probs of responses (``prompt_logprobs``), as :func:`~nemo_kd.generation.sampling.response_logprobs` does.

Seeds. Against ``nemo-kd-serve-teacher`` a prompt's request carries ``seed`` = the stage's seed and
``nemo_kd_sample_offset`` = its first global sample index (``prompt index · n``): the server draws
exactly what the in-process sampler draws for those indices, so a served stage writes the in-process
stage's rows (up to the model's float rounding). Other servers (vLLM, SGLang) get a per-request seed
``sha256(seed, prompt index)`` (reproducible where the server honours seeds; not the in-process draws).

Per-token log-probs at temperature 1 (``logprobs`` of the rows: divergence-aware selection compares them
with the student's). ``sampled_logprobs``: ``server`` takes the server's (vLLM's default
``raw_logprobs`` and the nemo_kd server report temperature 1); ``rescore`` asks the server again with
``prompt_logprobs`` over prompt + completion (for a server that reports the log-probs of the distribution
it sampled from, e.g. SGLang by default); ``auto``: ``server`` for the vLLM dialect, ``rescore`` for
SGLang unless the draw is at temperature 1 without truncation (where the two coincide). Which one was
used is recorded in the stage's ``.meta.json`` (:attr:`ServedPolicy.record`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["SAMPLED_LOGPROBS", "ServedPolicy", "request_seed"]

SAMPLED_LOGPROBS = ("auto", "server", "rescore")


def request_seed(seed: int, prompt_index: int) -> int:
    """The seed of prompt ``prompt_index``'s request to a server without the nemo_kd offset (63 bits)."""
    digest = hashlib.sha256(f"nemo_kd.served_sampling:{int(seed)}:{int(prompt_index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class ServedPolicy:
    """A served teacher in a pipeline: the client (:class:`~nemo_kd.teacher.served.ServedTeacher`) and how its
    sampled tokens' log-probs are obtained."""

    teacher: Any  # nemo_kd.teacher.served.ServedTeacher
    sampled_logprobs: str = "auto"

    def __post_init__(self):
        if self.sampled_logprobs not in SAMPLED_LOGPROBS:
            raise ValueError(f"teacher.sampled_logprobs must be one of {SAMPLED_LOGPROBS}, got "
                             f"{self.sampled_logprobs!r}")

    def logprobs_source(self, cfg) -> str:
        """``server`` or ``rescore`` for sampling config ``cfg`` (module docstring)."""
        if self.sampled_logprobs != "auto":
            return self.sampled_logprobs
        if self.teacher.client.dialect != "sglang":
            return "server"
        untruncated_t1 = cfg.temperature == 1 and cfg.top_p == 1 and cfg.top_k == 0
        return "server" if untruncated_t1 else "rescore"

    def record(self, cfg) -> Dict[str, Any]:
        """What a stage's ``.meta.json`` records of the served teacher (no URL, no key)."""
        source = self.logprobs_source(cfg)
        return {"served_teacher": self.teacher.client.fingerprint(),
                "teacher_logprobs": ("reported by the server at temperature 1 (raw model distribution)"
                                     if source == "server" else
                                     "rescored with prompt_logprobs (teacher-forced, temperature 1): the server "
                                     "reports sampling-distribution log-probs"),
                "seeds": ("in-process draws (nemo_kd_sample_offset)" if self.teacher.client.is_nemo_kd
                          else "per-request seed sha256(seed, prompt index)")}

    def _run_all(self, coros: List[Any], progress=None, weights: Optional[Sequence[int]] = None) -> List[Any]:
        """Results in order; the first failure (in order) cancels the rest and is raised."""
        loop = self.teacher._loop
        futures = [loop.submit(c) for c in coros]
        out = []
        try:
            for i, f in enumerate(futures):
                out.append(f.result())
                if progress is not None:
                    progress.update(weights[i] if weights is not None else 1)
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        return out

    def generate(self, prompts: Sequence[Sequence[int]], num_samples: int, cfg, *, eos_id: Optional[int],
                 max_length: Optional[int], sample_offset: int, progress=None, tokenizer=None):
        """``num_samples`` :class:`~nemo_kd.generation.sampling.Generation` per prompt (prompt-major), prompt ``i``
        drawing global sample indices ``sample_offset + i·n ..``; only tensor-parallel rank 0 asks the server
        (the other TP ranks' rows are not gathered by :func:`~nemo_kd.generation.stages.run_stage`)."""
        from nemo_kd.generation.sampling import Generation
        from nemo_kd.parallel import state

        n = num_samples
        if state.is_initialized() and state.tp_rank() != 0:
            return [Generation(prompt_ids=list(p)) for p in prompts for _ in range(n)]
        client, v = self.teacher.client, self.teacher.vocab_size
        source = self.logprobs_source(cfg)
        stops = [eos_id] if eos_id is not None else []

        async def one(i: int, ids: List[int]) -> List[Any]:
            first = sample_offset + i * n
            where = f"prompt {first // n} (samples {first}..{first + n - 1})"
            budget = cfg.max_new_tokens if max_length is None else max(0, min(cfg.max_new_tokens, max_length - len(ids)))
            if budget == 0:  # as the in-process sampler: a prompt at the length cap gets no tokens
                return [Generation(prompt_ids=ids) for _ in range(n)]
            seed = cfg.seed if client.is_nemo_kd else request_seed(cfg.seed, first // n)
            got = await client.sample(ids, n, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                      max_tokens=budget, seed=seed, stop_token_ids=stops, logprobs=0,
                                      sample_offset=first, where=where, vocab_size=v)
            gens = []
            for c, s in enumerate(got):
                lps = list(s.logprobs)
                if source == "rescore":
                    scored = s.token_ids + ([eos_id] if s.finished and eos_id is not None else [])
                    lps = [float(x) for x in await client.rescore(ids, scored, f"{where} choice {c}")]
                gens.append(Generation(prompt_ids=ids, token_ids=list(s.token_ids), finished=s.finished,
                                       logprobs=lps))
            return gens

        ids = [[int(t) for t in p] for p in prompts]
        groups = self._run_all([one(i, p) for i, p in enumerate(ids)], progress, [n] * len(ids))
        out = [g for group in groups for g in group]
        if tokenizer is not None:
            for g in out:
                g.text = tokenizer.decode(g.token_ids, skip_special_tokens=True)
        return out

    def score(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
              names: Optional[Sequence[str]] = None):
        """Teacher-forced log-probs of each response after its prompt (float32 tensors, as ``response_logprobs``);
        ``names`` name the samples in errors."""
        import torch

        client = self.teacher.client
        names = names or [f"response {i}" for i in range(len(prompt_ids))]
        coros = [client.rescore(p, r, name) for p, r, name in zip(prompt_ids, response_ids, names)]
        return [torch.from_numpy(x.copy()) for x in self._run_all(coros)]

    def close(self) -> None:
        self.teacher.close()
