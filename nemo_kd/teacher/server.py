"""``nemo-kd-serve-teacher``: serve any teacher nemo_kd loads over HTTP, in vLLM's dialect.

Endpoints (``aiohttp.web``):

* ``POST /v1/completions`` – token-id prompts (one list, or a list of lists), in two modes:

  - *scoring* (``max_tokens <= 1``, ``n = 1``, temperature 0 or absent, no ``logprobs``): teacher-forced
    ``prompt_logprobs = k`` exactly as vLLM answers them (``null`` at position 0, then
    ``{token_id: {logprob, rank, decoded_token}}``: the k best plus the scored token when it is outside
    them), ``echo``, ``return_token_ids``; the one generated token is greedy (scoring clients discard it).
  - *sampling* (anything else): ``n`` completions per prompt drawn by :func:`nemo_kd.generation.sampling.generate`
    (Megatron's KV cache; every TP rank decodes; PP must be 1) with ``temperature`` (default 1, as vLLM),
    ``top_p``, ``top_k`` (0 or -1: off), ``max_tokens``, ``seed``, ``stop_token_ids``, ``stop`` (strings: needs
    ``tokenizer_path``), ``ignore_eos``; ``logprobs = k`` of the generated tokens in vLLM's completion shape
    (``{text_offset, token_logprobs, tokens, top_logprobs}``, ``tokens`` / keys as ``token_id:N`` with
    ``return_tokens_as_token_ids``), ``finish_reason`` ``stop`` (end or stop token: included in ``token_ids`` and
    the log-probs, as vLLM does; ``stop_reason`` names a stop token / string, ``null`` for the end token) or
    ``length``, and ``usage``. **Log-probs of generated tokens are the raw model distribution at temperature 1**
    (``log softmax(z)``, untruncated: vLLM's default ``--logprobs-mode raw_logprobs``), not the sampling
    distribution: the sampled token's from the decoding forward (float64 of its logits), the other top-k
    from a teacher-forced forward over prompt + completion (the scoring statistics).
    Seeds: choice ``c`` of prompt ``i`` draws from ``(seed, offset + i·n + c, step)`` with the sampler's
    counter-based hash, ``offset`` = the request's ``nemo_kd_sample_offset`` (a nemo_kd extension, default 0;
    vLLM ignores unknown fields), so a seeded request gives the same tokens whatever else is served at the same
    time (up to the model's own float rounding in the logits) and equals the in-process sampler's draw
    of global sample index ``offset + i·n + c``. No ``seed``: a random one per request. Sampling requests are
    decoded one request at a time (all its prompts × ``n`` in one batch); scoring requests that arrive together
    share one forward.
* ``GET /v1/models`` – the one model, with ``max_model_len`` and a ``nemo_kd`` record (teacher
  hash, vocabulary size, ``max_logprobs``) that a client fingerprints into its store's manifest.
* ``GET /health``.

Requests that arrive while a forward runs are batched into the next one (up to
``max_batch_tokens`` padded tokens): one forward per batch, on a worker thread, so the event
loop keeps accepting. The statistics are extraction's (:func:`nemo_kd.losses.token_stats.teacher_token_stats`:
same top-k order, log-probs ``z − LSE`` in fp32), so a store extracted through this server equals
the in-process one up to the batch's float rounding. Limits (prompt length, ``max_tokens``, ``n``,
k above ``max_logprobs``, prompts per request, ``n``, prompt + ``max_tokens`` above the model's
length, sampling parameters out of range) are answered with a 4xx naming the limit, in
vLLM's error shape (``{"error": {"message", "type", "param", "code"}}``); a teacher producing
NaN/Inf logits is a 422 naming the prompt and position. Binds 127.0.0.1 unless ``host`` says
otherwise; ``api_key_env`` names the environment variable of an optional bearer key.

Parallelism: a TP/PP teacher under ``torchrun`` / ``srun`` (the world is one TP × PP model, DP = 1):
global rank 0 serves HTTP and batches; each batch is broadcast to every rank, all ranks run the
forward (the statistics are vocab-parallel over the TP group), and the last pipeline stage's first
TP rank sends the answers back to rank 0 (``torch.distributed`` object broadcasts on the default
group). The other ranks wait in :func:`serve_forward_worker` until rank 0 stops. Data parallelism:
one server per replica behind the client's ``concurrency`` (a world larger than TP × PP is refused).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import math
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from aiohttp import web

if TYPE_CHECKING:  # torch and the teachers are imported where they run: `nemo-kd-serve-teacher --help` stays light
    import torch

    from nemo_kd.teacher.teachers import Teacher

__all__ = ["ServeConfig", "TeacherServer", "main", "run_from_config", "serve_in_background"]

log = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    """``conf/serve_teacher.yaml`` besides ``teacher`` / ``parallel``."""

    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000  # 0: a free port chosen by the OS (printed)
    model_id: Optional[str] = None  # the id clients send as "model" (None: the teacher's name)
    api_key_env: Optional[str] = None  # NAME of the environment variable holding the bearer key
    max_logprobs: int = 20  # vLLM's --max-logprobs: the largest k served
    max_prompt_tokens: Optional[int] = None  # None: the teacher's max_position_embeddings
    max_prompts_per_request: int = 256
    max_batch_tokens: int = 16384  # padded tokens per forward (bounds the [B, S, V] logits)
    batch_wait_ms: float = 2.0  # after the first request of a batch, how long to wait for more
    tokenizer_path: Optional[str] = None  # for decoded_token / text (None: decoded_token is null)
    max_tokens_limit: int = 4096  # the largest max_tokens a sampling request may ask
    max_n: int = 16  # the most completions per prompt (n)
    eos_token_id: Optional[int] = None  # ends a completion (None: the tokenizer's eos, else only stop_token_ids)

    def __post_init__(self):
        if min(self.max_logprobs, self.max_batch_tokens, self.max_prompts_per_request, self.max_tokens_limit,
               self.max_n) < 1:
            raise ValueError("max_logprobs, max_batch_tokens, max_prompts_per_request, max_tokens_limit and max_n "
                             "must be >= 1")


class _BadRequest(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def _error(status: int, message: str, param: Optional[str] = None) -> web.Response:
    kind = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
            422: "UnprocessableEntityError"}.get(status, "InternalServerError")
    return web.json_response({"error": {"message": message, "type": kind, "param": param, "code": status}},
                             status=status)


@dataclass
class _Scored:
    """One prompt's statistics at positions 1..L-1 (row j-1 predicts token j)."""

    logprobs: torch.Tensor  # [L-1, k] fp32
    ids: torch.Tensor  # [L-1, k] int64
    label_logprobs: torch.Tensor  # [L-1]
    label_ranks: torch.Tensor  # [L-1] int64, 1 = the best
    next_token: int  # greedy token after the prompt


def _world_size() -> int:
    import torch

    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def check_served_world() -> None:
    """The world must be exactly one TP × PP model (one server per data-parallel replica)."""
    if _world_size() == 1:
        return
    from nemo_kd.parallel import state

    if state.dp_size() != 1:
        raise ValueError(f"nemo-kd-serve-teacher: a world of {_world_size()} ranks is {state.dp_size()} "
                         f"data-parallel replicas of a TP = {state.tp_size()} x PP = {state.pp_size()} teacher: "
                         "start one server per replica "
                         "(world size = TP x PP) and list them in the client")


def _broadcast_command(command: Optional[tuple]) -> Optional[tuple]:
    """Rank 0's command to every rank (``None`` on the others: receive)."""
    import torch

    box = [command]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def score_prompts(teacher: "Teacher", prompts: List[List[int]], k: int) -> List[Any]:
    """Teacher-forced top-k of ``prompts`` (every rank of the teacher calls it with the same prompts).

    Per prompt a :class:`_Scored` (top-k log-probs ``z − LSE``, ids, the scored tokens' log-probs and ranks,
    the greedy next token) or the :class:`NonFiniteLogitsError` it raised; the answers are whole on global
    rank 0 (sent there from the last pipeline stage), ``[]`` on the other ranks.
    """
    import torch

    from nemo_kd.losses.kd import vocab_parallel_argmax
    from nemo_kd.losses.vocab_parallel import all_reduce_no_grad, vocab_shard_range
    from nemo_kd.losses.token_stats import NonFiniteLogitsError, check_finite_logits, teacher_token_stats

    b, s = len(prompts), max(len(p) for p in prompts)
    tokens = torch.zeros(b, s, dtype=torch.int64)
    for r, p in enumerate(prompts):
        tokens[r, :len(p)] = torch.tensor(p, dtype=torch.int64)
    out: List[Any] = [None] * b
    v = teacher.vocab_size

    def callback(first, logits, group):
        for r in range(first, first + logits.shape[0]):
            n = len(prompts[r])
            try:
                z = logits[r - first, :n].float()  # [n, V/TP]: this rank's vocabulary shard
                lo = vocab_shard_range(z.shape[-1], group)[0]
                padding = torch.arange(lo, lo + z.shape[-1], device=z.device) >= v  # the padded vocabulary
                z = z.masked_fill(padding, float("-inf"))
                labels = tokens[r, 1:n].to(z.device)
                if n > 1:
                    st = teacher_token_stats(z[:n - 1], min(k, v), labels, group=group, row_sample_index=r,
                                             row_positions=torch.arange(1, n), vocab_size=v)
                    # The scored token's rank (1 = the best): its own logit from the shard that holds it, then
                    # the logits above it counted on every shard.
                    local = labels - lo
                    inside = (local >= 0) & (local < z.shape[-1])
                    own = z[:n - 1].gather(1, local.clamp(0, z.shape[-1] - 1)[:, None])[:, 0]
                    label_z = all_reduce_no_grad(torch.where(inside, own, 0.0), group=group)
                    ranks = all_reduce_no_grad((z[:n - 1] > label_z[:, None]).sum(-1), group=group) + 1
                    scored = (st.values - st.lse[:, None], st.ids, st.label_logprobs, ranks)
                else:
                    scored = (torch.zeros(0, k), torch.zeros(0, k, dtype=torch.int64), torch.zeros(0),
                              torch.zeros(0, dtype=torch.int64))
                last = z[n - 1:n]
                try:
                    check_finite_logits(last, group, r, torch.tensor([n - 1]), v)
                except NonFiniteLogitsError:
                    raise NonFiniteLogitsError(f"non-finite (NaN/Inf) teacher logits in prompt {r}, the "
                                               f"position after its last token ({n - 1})") from None
                next_token = int(vocab_parallel_argmax(last, group)[0])
                out[r] = _Scored(*(t.cpu() for t in scored), next_token=next_token)
            except NonFiniteLogitsError as e:
                out[r] = e

    teacher.run(tokens, callback, micro_batch_size=b)
    if _world_size() == 1:
        return out
    from nemo_kd.parallel import state

    holder = state.is_pipeline_last_stage() and state.tp_rank() == 0
    # The same source on every rank: the one global rank holding the answers (whatever the rank order).
    src = torch.tensor([torch.distributed.get_rank() if holder else torch.distributed.get_world_size()],
                       device=state.device())
    torch.distributed.all_reduce(src, op=torch.distributed.ReduceOp.MIN)
    box = [out if holder else None]
    torch.distributed.broadcast_object_list(box, src=int(src))
    return box[0] if torch.distributed.get_rank() == 0 else []


@dataclass
class _Sampled:
    """One completion as decoded: its tokens with the end token when it ended, their raw log-probs."""

    tokens: List[int]  # the end token included when ``finished``
    logprobs: List[float]  # log softmax(z) at temperature 1 of each of ``tokens`` (float64 of the decoding logits)
    finished: bool  # the end token was drawn
    top_ids: Optional[List[List[int]]] = None  # [len(tokens), k]: the teacher-forced top-k of each step (k > 0)
    top_logprobs: Optional[List[List[float]]] = None


@dataclass
class _SampleJob:
    """A sampling request's work: every rank runs it (the fields broadcast, the future stays on rank 0)."""

    prompts: List[List[int]]
    n: int
    sampling: Dict[str, Any]  # SamplingConfig fields
    eos_id: Optional[int]
    offset: int  # global sample index of choice 0 of prompt 0
    k: Optional[int]  # top-k log-probs per generated token (None or 0: the sampled token's only)
    fut: Any = None

    def command(self) -> tuple:
        return ("generate", self.prompts, self.n, self.sampling, self.eos_id, self.offset, self.k)


def _sampling_model(teacher: "Teacher"):
    """The module :func:`~nemo_kd.generation.sampling.generate` decodes with (an HF teacher behind its adapter)."""
    from nemo_kd.generation.sampling import HFCausalLM
    from nemo_kd.teacher.teachers import HFTeacher

    return HFCausalLM(teacher.model) if isinstance(teacher, HFTeacher) else teacher.model


def sample_prompts(teacher: "Teacher", prompts: List[List[int]], n: int, sampling: Dict[str, Any],
                   eos_id: Optional[int], offset: int, k: Optional[int], max_batch_tokens: int) -> List[Any]:
    """``n`` completions of each prompt (prompt-major: choice ``c`` of prompt ``i`` at ``i·n + c``, drawing as global
    sample index ``offset + i·n + c``), on every rank of the teacher; per completion a :class:`_Sampled` or the
    :class:`NonFiniteLogitsError` its top-k scoring raised. With ``k > 0`` the top-k of each generated position
    comes from one teacher-forced forward over prompt + completion (:func:`score_prompts`); whole on rank 0.
    """
    from nemo_kd.generation.sampling import SamplingConfig, generate

    cfg = SamplingConfig(**sampling)
    expanded = [list(p) for p in prompts for _ in range(n)]
    longest = max(len(p) for p in prompts) + cfg.max_new_tokens
    batch = max(1, min(len(expanded), max_batch_tokens // max(longest, 1)))  # batching does not change a draw
    gens = generate(_sampling_model(teacher), expanded, cfg, eos_id=eos_id, pad_id=0,
                    vocab_size=int(teacher.vocab_size), max_length=teacher.max_seq_length, batch_size=batch,
                    sample_offset=offset)
    out: List[Any] = [_Sampled(g.token_ids + ([eos_id] if g.finished else []), list(g.logprobs), g.finished)
                      for g in gens]
    if not k:
        return out if _is_rank0() else []
    todo = [r for r, s in enumerate(out) if s.tokens]
    start = 0
    while start < len(todo):  # chunks of at most max_batch_tokens padded tokens
        stop = start + 1
        while stop < len(todo) and max(len(expanded[r]) + len(out[r].tokens) for r in todo[start:stop + 1]) * (
                stop + 1 - start) <= max_batch_tokens:
            stop += 1
        rows = todo[start:stop]
        scored = score_prompts(teacher, [expanded[r] + out[r].tokens for r in rows], k)
        for r, sc in zip(rows, scored):  # rank 0 only (the others get [])
            if isinstance(sc, BaseException):
                out[r] = sc
                continue
            first = len(expanded[r]) - 1  # row first predicts the first generated token
            m = len(out[r].tokens)
            out[r].top_ids = sc.ids[first:first + m, :k].tolist()
            out[r].top_logprobs = sc.logprobs[first:first + m, :k].tolist()
        start = stop
    return out if _is_rank0() else []


def _is_rank0() -> bool:
    import torch

    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def serve_forward_worker(teacher: "Teacher", max_batch_tokens: int = 16384) -> None:
    """Ranks other than 0: run every forward rank 0 broadcasts, until it says stop."""
    while True:
        command = _broadcast_command(None)
        if command[0] == "stop":
            return
        if command[0] == "generate":
            try:
                sample_prompts(teacher, *command[1:], max_batch_tokens=max_batch_tokens)
            except ValueError:  # refused identically on rank 0, which answers the request
                pass
            continue
        _, prompts, k = command
        score_prompts(teacher, prompts, k)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class _SampleRequest:
    job: _SampleJob
    extra_stops: List[int]  # stop_token_ids other than the end token the sampler stops at
    stop: List[str]  # stop strings
    echo: bool
    include_stop_str: bool
    return_ids: bool
    as_token_ids: bool  # tokens / top_logprobs keys as "token_id:N" (vLLM's return_tokens_as_token_ids)


class TeacherServer:
    """The HTTP front (aiohttp) and the batching forward of one teacher."""

    def __init__(self, teacher: Teacher, cfg: ServeConfig, tokenizer=None):
        # here, not at the top: nemo_kd.models loads Megatron, which `--help` must not wait for
        from nemo_kd.models.router_terms import check_token_dropping

        # requests of different clients share a forward: under token dropping one client's logits would
        # depend on the others' traffic (what a stored or trained-on row must never do)
        check_token_dropping(getattr(teacher, "model", None), "serving a teacher",
                             "a request's logits would depend on the requests batched with it",
                             "moe_expert_capacity_factor: null in the teacher checkpoint's architecture",
                             refuse=True)
        check_served_world()
        self.teacher, self.cfg = teacher, cfg
        self.model_id = cfg.model_id or teacher.name
        self._key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        if cfg.api_key_env and not self._key:
            raise ValueError(f"api_key_env={cfg.api_key_env}: that environment variable is not set")
        self.max_prompt = cfg.max_prompt_tokens or teacher.max_seq_length or 1 << 30
        self._tokens = None
        if tokenizer is not None:  # json-escaped token strings, once (decoded_token is per entry)
            self._tokens = [json.dumps(t) for t in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))]
        self.tokenizer = tokenizer
        self.eos_id = cfg.eos_token_id if cfg.eos_token_id is not None else (
            getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None)
        self._queue: Optional[asyncio.Queue] = None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="teacher-forward")
        self.created = int(time.time())
        self.forwards = 0  # batches run (tests: requests that arrive together share one)

    # -- the forward

    def _forward(self, prompts: List[List[int]], k: int) -> List[Any]:
        """One padded forward over ``prompts`` on every rank; per prompt a :class:`_Scored` or the exception it raised."""
        if _world_size() > 1:
            _broadcast_command(("forward", prompts, k))
        out = score_prompts(self.teacher, prompts, k)
        self.forwards += 1
        return out

    def _sample(self, job: _SampleJob) -> List[Any]:
        """A sampling request on every rank: per completion a :class:`_Sampled` (or the exception it raised)."""
        if _world_size() > 1:
            _broadcast_command(job.command())
        out = sample_prompts(self.teacher, *job.command()[1:], max_batch_tokens=self.cfg.max_batch_tokens)
        self.forwards += 1
        return out

    def stop_workers(self) -> None:
        """Release the ranks waiting in :func:`serve_forward_worker` (rank 0, once, at shutdown)."""
        if _world_size() > 1:
            _broadcast_command(("stop",))

    async def _batcher(self) -> None:
        loop = asyncio.get_running_loop()

        async def sample(job: _SampleJob) -> None:
            try:
                res = await loop.run_in_executor(self._pool, self._sample, job)
            except BaseException as e:  # noqa: BLE001 - the request answers it
                res = e
            if not job.fut.done():
                job.fut.set_result(res)

        while True:
            item = await self._queue.get()
            if isinstance(item, _SampleJob):  # one sampling request at a time, all its prompts x n together
                await sample(item)
                continue
            batch, later = [item], []
            deadline = loop.time() + self.cfg.batch_wait_ms / 1000
            while True:  # take what arrived together, up to max_batch_tokens padded tokens
                try:
                    item = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    if loop.time() >= deadline:
                        break
                    await asyncio.sleep(max(0.0, min(deadline - loop.time(), 0.001)))
                    continue
                if isinstance(item, _SampleJob):
                    later.append(item)  # after this scoring batch
                    continue
                longest = max(len(item[0]), *(len(x[0]) for x in batch))
                if longest * (len(batch) + 1) > self.cfg.max_batch_tokens:
                    self._queue.put_nowait(item)  # behind the others: order within a batch does not matter
                    break
                batch.append(item)
            k = max(x[1] for x in batch)
            try:
                results = await loop.run_in_executor(self._pool, self._forward, [x[0] for x in batch], k)
            except BaseException as e:  # noqa: BLE001 - every waiting request gets the error
                results = [e] * len(batch)
            for (_, _, fut), res in zip(batch, results):
                if not fut.done():
                    fut.set_result(res)
            for job in later:
                await sample(job)

    # -- HTTP

    def _authorised(self, request: web.Request) -> bool:
        return self._key is None or request.headers.get("Authorization", "") == f"Bearer {self._key}"

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def models(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return _error(401, "invalid or missing API key")
        entry = {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "nemo_kd",
                 "root": self.teacher.name, "parent": None, "max_model_len": self.teacher.max_seq_length,
                 "nemo_kd": {"teacher_hash": self.teacher.hash, "vocab_size": int(self.teacher.vocab_size),
                             "max_logprobs": self.cfg.max_logprobs}}
        return web.json_response({"object": "list", "data": [entry]})

    def _parse(self, body: Any):
        """A scoring request as ``(prompts, k, max_tokens, echo, return_token_ids)``, or a :class:`_SampleRequest`."""
        if not isinstance(body, dict):
            raise _BadRequest(400, "the request body must be a JSON object")
        if body.get("model") not in (None, self.model_id):
            raise _BadRequest(404, f"The model `{body.get('model')}` does not exist (this server serves "
                                   f"`{self.model_id}`)", "model")
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, list) and p for p in prompt):
            prompts = prompt
        else:
            raise _BadRequest(400, "prompt must be token ids (a list of ints, or a list of such lists): this server "
                                   "scores the ids the client's tokenizer produced, it does not tokenise text",
                              "prompt")
        if len(prompts) > self.cfg.max_prompts_per_request:
            raise _BadRequest(400, f"{len(prompts)} prompts in one request exceed max_prompts_per_request="
                                   f"{self.cfg.max_prompts_per_request}", "prompt")
        v = int(self.teacher.vocab_size)
        for i, p in enumerate(prompts):
            if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < v for t in p):
                raise _BadRequest(400, f"prompt {i}: token ids must be ints in [0, {v})", "prompt")
            if len(p) > self.max_prompt:
                raise _BadRequest(400, f"prompt {i} has {len(p)} tokens, more than max_prompt_tokens="
                                       f"{self.max_prompt}", "prompt")
        n, max_tokens = body.get("n", 1), body.get("max_tokens", 1)
        temperature, logprobs = body.get("temperature"), body.get("logprobs")
        if not _is_int(n) or n < 1:
            raise _BadRequest(400, f"n must be an integer >= 1, got {n!r}", "n")
        if (n != 1 or (_is_int(max_tokens) and max_tokens > 1) or max_tokens is None
                or temperature not in (None, 0, 0.0) or logprobs is not None):
            return self._parse_sampling(body, prompts)
        if not _is_int(max_tokens) or not 0 <= max_tokens <= 1:
            raise _BadRequest(400, f"max_tokens must be an integer >= 0, got {max_tokens!r}", "max_tokens")
        k = body.get("prompt_logprobs")
        if k is not None:
            if not isinstance(k, int) or isinstance(k, bool) or k < -1:
                raise _BadRequest(400, f"prompt_logprobs must be an int >= 0, got {k!r}", "prompt_logprobs")
            want = v if k == -1 else k
            if want > self.cfg.max_logprobs:  # vLLM's wording, which clients recognise
                raise _BadRequest(400, f"Requested prompt logprobs of {want}, which is greater than max allowed: "
                                       f"{self.cfg.max_logprobs} (start the server with max_logprobs >= {want})",
                                  "prompt_logprobs")
            k = want if want > 0 else None
        return prompts, k, max_tokens, bool(body.get("echo")), bool(body.get("return_token_ids"))

    def _parse_sampling(self, body: dict, prompts: List[List[int]]) -> "_SampleRequest":
        """The sampling parameters of a request (vLLM's names and defaults), each refused by name when out of range."""
        import random

        from nemo_kd.parallel import state

        cfg, v = self.cfg, int(self.teacher.vocab_size)
        if state.is_initialized() and state.pp_size() > 1:
            raise _BadRequest(400, f"sampling needs the whole model on each rank: this teacher is served at "
                                   f"PP={state.pp_size()} (serve it with pipeline_model_parallel_size=1 to sample; "
                                   "scoring with prompt_logprobs works at any PP)", "n")
        n = body.get("n", 1)
        if n > cfg.max_n:
            raise _BadRequest(400, f"n={n} exceeds max_n={cfg.max_n} (start the server with max_n >= {n})", "n")
        model_len = self.teacher.max_seq_length or 1 << 30
        max_tokens = body.get("max_tokens", 16)  # vLLM's default
        if max_tokens is None:  # vLLM: up to the model's length
            max_tokens = min(cfg.max_tokens_limit, model_len - max(len(p) for p in prompts))
        if not _is_int(max_tokens) or max_tokens < 1:
            raise _BadRequest(400, f"max_tokens={max_tokens!r}: a sampling request needs an integer max_tokens >= 1",
                              "max_tokens")
        if max_tokens > cfg.max_tokens_limit:
            raise _BadRequest(400, f"max_tokens={max_tokens} exceeds max_tokens_limit={cfg.max_tokens_limit} (start "
                                   f"the server with max_tokens_limit >= {max_tokens})", "max_tokens")
        for i, p in enumerate(prompts):
            if len(p) + max_tokens > model_len:  # vLLM's refusal
                raise _BadRequest(400, f"This model's maximum context length is {model_len} tokens. However, prompt "
                                       f"{i} has {len(p)} tokens and max_tokens={max_tokens} asks for "
                                       f"{len(p) + max_tokens}: lower max_tokens", "max_tokens")
        temperature = body.get("temperature")
        temperature = 1.0 if temperature is None else temperature  # vLLM's default
        if not _is_number(temperature) or not math.isfinite(temperature) or temperature < 0:
            raise _BadRequest(400, f"temperature must be a finite number >= 0, got {temperature!r}", "temperature")
        top_p = body.get("top_p")
        top_p = 1.0 if top_p is None else top_p
        if not _is_number(top_p) or not 0 < top_p <= 1:
            raise _BadRequest(400, f"top_p must be in (0, 1], got {top_p!r}", "top_p")
        top_k = body.get("top_k")
        top_k = 0 if top_k in (None, -1) else top_k  # vLLM: -1 (or 0) is off
        if not _is_int(top_k) or top_k < 0:
            raise _BadRequest(400, f"top_k must be -1, 0 (off) or a positive integer, got {top_k!r}", "top_k")
        seed = body.get("seed")
        if seed is None:
            seed = random.SystemRandom().getrandbits(63)  # vLLM: an unseeded request is drawn at random
        if not _is_int(seed):
            raise _BadRequest(400, f"seed must be an integer, got {seed!r}", "seed")
        offset = body.get("nemo_kd_sample_offset", 0)
        if not _is_int(offset) or offset < 0:
            raise _BadRequest(400, f"nemo_kd_sample_offset must be an integer >= 0, got {offset!r}",
                              "nemo_kd_sample_offset")
        logprobs = body.get("logprobs")
        if logprobs is not None:
            if not _is_int(logprobs) or logprobs < 0:
                raise _BadRequest(400, f"logprobs must be an integer >= 0, got {logprobs!r}", "logprobs")
            if logprobs > cfg.max_logprobs:  # vLLM's wording
                raise _BadRequest(400, f"Requested sample logprobs of {logprobs}, which is greater than max allowed: "
                                       f"{cfg.max_logprobs} (start the server with max_logprobs >= {logprobs})",
                                  "logprobs")
        if body.get("prompt_logprobs") is not None:
            raise _BadRequest(400, "prompt_logprobs together with sampling is not served: score the prompt in its own "
                                   "request (max_tokens=1, temperature=0)", "prompt_logprobs")
        echo = bool(body.get("echo"))
        if echo and logprobs is not None:
            raise _BadRequest(400, "echo together with logprobs of a sampling request is not served", "echo")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(x, str) and x for x in stop):
            raise _BadRequest(400, "stop must be a non-empty string or a list of them", "stop")
        if stop and self.tokenizer is None:
            raise _BadRequest(400, "stop strings need the server's tokenizer (start it with tokenizer_path=...); "
                                   "stop_token_ids work without one", "stop")
        stop_ids = body.get("stop_token_ids") or []
        if not isinstance(stop_ids, list) or not all(_is_int(t) and 0 <= t < v for t in stop_ids):
            raise _BadRequest(400, f"stop_token_ids must be token ids in [0, {v})", "stop_token_ids")
        ignore_eos = bool(body.get("ignore_eos"))
        # The sampler stops at one end token; further stop tokens cut the completion afterwards (the draw of a
        # token depends on (seed, index, step) and its prefix only, so what precedes the cut is the same).
        eos = None if ignore_eos else (self.eos_id if self.eos_id is not None else (stop_ids[0] if stop_ids else None))
        sampling = {"temperature": float(temperature), "top_p": float(top_p), "top_k": int(top_k),
                    "max_new_tokens": int(max_tokens), "seed": int(seed)}
        return _SampleRequest(
            job=_SampleJob(prompts, n, sampling, eos, int(offset), logprobs),
            extra_stops=[t for t in stop_ids if t != eos], stop=stop, echo=echo,
            include_stop_str=bool(body.get("include_stop_str_in_output")),
            return_ids=bool(body.get("return_token_ids")),
            as_token_ids=bool(body.get("return_tokens_as_token_ids")) or self.tokenizer is None)

    def _token_json(self, t: int) -> str:
        return self._tokens[t] if self._tokens is not None and t < len(self._tokens) else "null"

    def _prompt_logprobs_json(self, prompt: List[int], sc: _Scored, k: int) -> str:
        """vLLM's ``prompt_logprobs``, written directly (a dict per entry through json.dumps costs ~3x)."""
        parts = ["[null"]
        lps, ids = sc.logprobs[:, :k].tolist(), sc.ids[:, :k].tolist()
        labels, label_ranks = sc.label_logprobs.tolist(), sc.label_ranks.tolist()
        tok = self._token_json
        for j in range(1, len(prompt)):
            row_ids, row_lps, label = ids[j - 1], lps[j - 1], prompt[j]
            entries = []
            if label not in row_ids:  # vLLM lists the scored token first, with its rank, when outside the top-k
                entries.append(f'"{label}":{{"logprob":{labels[j - 1]:.9g},"rank":{label_ranks[j - 1]},'
                               f'"decoded_token":{tok(label)}}}')
            entries.extend(f'"{t}":{{"logprob":{lp:.9g},"rank":{c + 1},"decoded_token":{tok(t)}}}'
                           for c, (t, lp) in enumerate(zip(row_ids, row_lps)))
            parts.append("{" + ",".join(entries) + "}")
        return ",".join(parts) + "]"

    async def completions(self, request: web.Request) -> web.Response:
        from nemo_kd.losses.token_stats import NonFiniteLogitsError

        if not self._authorised(request):
            return _error(401, "invalid or missing API key")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the request body is not JSON")
        try:
            parsed = self._parse(body)
        except _BadRequest as e:
            return _error(e.status, e.message, e.param)
        if isinstance(parsed, _SampleRequest):
            return await self._completions_sampled(parsed)
        prompts, k, max_tokens, echo, return_ids = parsed
        loop = asyncio.get_running_loop()
        futures = []
        for p in prompts:
            fut = loop.create_future()
            await self._queue.put((p, k or 1, fut))
            futures.append(fut)
        results = await asyncio.gather(*futures)
        choices = []
        for i, (p, res) in enumerate(zip(prompts, results)):
            if isinstance(res, NonFiniteLogitsError):
                return _error(422, f"prompt {i}: {res}")
            if isinstance(res, BaseException):
                log.exception("forward failed", exc_info=res)
                return _error(500, f"the teacher forward failed: {type(res).__name__}: {res}")
            gen = [res.next_token] if max_tokens else []
            text = ""
            if self.tokenizer is not None:
                text = self.tokenizer.decode((p if echo else []) + gen)
            pl = self._prompt_logprobs_json(p, res, k) if k else "null"
            extra = (f',"prompt_token_ids":{json.dumps(p)},"token_ids":{json.dumps(gen)}' if return_ids else "")
            choices.append(f'{{"index":{i},"text":{json.dumps(text)},"logprobs":null,"finish_reason":"length",'
                           f'"stop_reason":null,"prompt_logprobs":{pl}{extra}}}')
        n_prompt = sum(len(p) for p in prompts)
        n_gen = len(prompts) * max_tokens
        text = (f'{{"id":"cmpl-{uuid.uuid4().hex}","object":"text_completion","created":{int(time.time())},'
                f'"model":{json.dumps(self.model_id)},"choices":[{",".join(choices)}],"usage":{{"prompt_tokens":'
                f'{n_prompt},"completion_tokens":{n_gen},"total_tokens":{n_prompt + n_gen}}}}}')
        return web.Response(text=text, content_type="application/json")

    async def _completions_sampled(self, req: _SampleRequest) -> web.Response:
        """A sampling request: queued as one job, answered in vLLM's completion shape (module docstring)."""
        from nemo_kd.losses.token_stats import NonFiniteLogitsError

        job = req.job
        job.fut = asyncio.get_running_loop().create_future()
        await self._queue.put(job)
        results = await job.fut
        if isinstance(results, ValueError):  # the sampler's own refusal (e.g. an empty prompt)
            return _error(400, f"sampling refused: {results}")
        if isinstance(results, BaseException):
            log.error("sampling failed", exc_info=results)
            return _error(500, f"the teacher's sampling failed: {type(results).__name__}: {results}")
        choices, generated = [], 0
        for r, res in enumerate(results):
            i, c = divmod(r, job.n)
            if isinstance(res, NonFiniteLogitsError):
                return _error(422, f"prompt {i} choice {c}: {res}")
            if isinstance(res, BaseException):
                log.error("sampling failed", exc_info=res)
                return _error(500, f"the teacher's sampling failed: {type(res).__name__}: {res}")
            bad = next((j for j, lp in enumerate(res.logprobs) if not math.isfinite(lp)), None)
            if bad is not None:
                return _error(422, f"prompt {i} choice {c}: non-finite (NaN/Inf) teacher log-prob at generated "
                                   f"token {bad}")
            choice = self._sampled_choice(req, job.prompts[i], res, r)
            generated += len(choice["token_ids"])
            if not req.return_ids:
                del choice["token_ids"], choice["prompt_token_ids"]
            choices.append(choice)
        n_prompt = sum(len(p) for p in job.prompts)
        body = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_id, "choices": choices,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": generated,
                          "total_tokens": n_prompt + generated}}
        return web.json_response(body)

    def _sampled_choice(self, req: _SampleRequest, prompt: List[int], res: _Sampled, index: int) -> Dict[str, Any]:
        """One choice: stop tokens / strings applied, text, vLLM's ``logprobs`` record."""
        tok = self.tokenizer
        tokens, lps = list(res.tokens), list(res.logprobs)
        finish, stop_reason = ("stop" if res.finished else "length"), None
        cut = next((j for j, t in enumerate(tokens) if t in req.extra_stops), None)
        if cut is not None:  # a stop token other than the end token: the completion ends with it (vLLM keeps it)
            tokens, finish, stop_reason = tokens[:cut + 1], "stop", tokens[cut]
        text = None
        if req.stop:  # the first token whose decoding holds a stop string ends the completion
            for j in range(len(tokens)):
                decoded = tok.decode(tokens[:j + 1], skip_special_tokens=True)
                hits = [(decoded.find(x), x) for x in req.stop if x in decoded]
                if hits:
                    at, x = min(hits)
                    tokens, finish, stop_reason = tokens[:j + 1], "stop", x
                    text = decoded[:at + (len(x) if req.include_stop_str else 0)]
                    break
        if text is None:
            text = tok.decode(tokens, skip_special_tokens=True) if tok is not None else ""
        prompt_text = tok.decode(prompt) if (req.echo and tok is not None) else ""
        choice = {"index": index, "text": prompt_text + text, "logprobs": None, "finish_reason": finish,
                  "stop_reason": stop_reason, "prompt_logprobs": None, "token_ids": tokens, "prompt_token_ids": prompt}
        k = req.job.k
        if k is not None:
            name = (lambda t: f"token_id:{t}") if req.as_token_ids else (lambda t: tok.decode([t]))
            strs = [name(t) for t in tokens]
            own = [max(lp, -9999.0) for lp in lps[:len(tokens)]]  # vLLM's clamp of -inf
            top = []
            for j, t in enumerate(tokens):
                entry = {}
                if k:
                    ids, vals = res.top_ids[j][:k], res.top_logprobs[j][:k]
                    if t not in ids:  # the sampled token first when it is outside the top-k (vLLM's k + 1)
                        entry[name(t)] = own[j]
                    for u, val in zip(ids, vals):  # the sampled token's value from the decoding, as token_logprobs
                        entry.setdefault(name(u), own[j] if u == t else max(val, -9999.0))
                else:
                    entry[name(t)] = own[j]
                top.append(entry)
            offsets, at = [], len(prompt_text)
            for x in strs:
                offsets.append(at)
                at += len(x)
            choice["logprobs"] = {"text_offset": offsets, "token_logprobs": own, "tokens": strs, "top_logprobs": top}
        return choice

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)

        async def start_batcher(app):
            self._queue = asyncio.Queue()
            task = asyncio.create_task(self._batcher())
            yield
            task.cancel()

        app.cleanup_ctx.append(start_batcher)
        return app

    async def start(self, host: Optional[str] = None, port: Optional[int] = None) -> Tuple[web.AppRunner, int]:
        runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        site = web.TCPSite(runner, host or self.cfg.host, self.cfg.port if port is None else port)
        await site.start()
        bound = site._server.sockets[0].getsockname()[1]  # the OS's choice for port 0
        return runner, bound


class serve_in_background:
    """``with serve_in_background(teacher, cfg) as url:`` – the server on a thread (tests, benchmarks)."""

    def __init__(self, teacher: Teacher, cfg: Optional[ServeConfig] = None, tokenizer=None):
        self.server = TeacherServer(teacher, cfg or ServeConfig(port=0), tokenizer)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="teacher-server")

    def __enter__(self) -> str:
        self.thread.start()
        self.runner, port = asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result()
        return f"http://{self.server.cfg.host}:{port}"

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.server._pool.shutdown(wait=True)


# ----------------------------------------------------------------------------- config entry points

RUN_CONFIG_KEYS = {"teacher", "parallel"}


def run_from_config(cfg, teacher_loader=None) -> None:
    """Serve the teacher of ``conf/serve_teacher.yaml`` until interrupted (prints ``serving <model> on <url>``)."""
    import torch

    from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel
    from nemo_kd.teacher.extract import _plain
    from nemo_kd.teacher.teachers import TeacherSpec, build_teacher

    c = _plain(cfg)
    names = {f.name for f in dataclasses.fields(ServeConfig)}
    unknown = sorted(set(c) - names - RUN_CONFIG_KEYS)
    if unknown:
        raise ValueError(f"unknown serve_teacher keys {unknown}; valid keys: {sorted(names | RUN_CONFIG_KEYS)}")
    serve_cfg = ServeConfig(**{k: c[k] for k in names if k in c})
    teacher_cfg = dict(c.get("teacher") or {})
    spec_keys = {f.name for f in dataclasses.fields(TeacherSpec)}
    if set(teacher_cfg) - spec_keys:
        raise ValueError(f"unknown teacher keys {sorted(set(teacher_cfg) - spec_keys)}")
    spec = TeacherSpec(**teacher_cfg)
    if os.environ.get("NEMO_KD_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["NEMO_KD_NUM_THREADS"]))
    initialize_parallel(ParallelConfig.from_dict(dict(c.get("parallel") or {})))
    try:
        tokenizer = None
        if serve_cfg.tokenizer_path:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(serve_cfg.tokenizer_path,
                                                      trust_remote_code=bool(spec.trust_remote_code))
        teacher = build_teacher(spec, loader=teacher_loader)
        check_served_world()
        if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            serve_forward_worker(teacher, serve_cfg.max_batch_tokens)  # until rank 0 stops
            return
        server = TeacherServer(teacher, serve_cfg, tokenizer)

        async def serve():
            runner, port = await server.start()
            print(f"serving {server.model_id} on http://{serve_cfg.host}:{port}", flush=True)
            try:
                await asyncio.Event().wait()
            finally:
                await runner.cleanup()

        try:
            asyncio.run(serve())
        except KeyboardInterrupt:
            pass
        finally:
            server.stop_workers()
    finally:
        destroy_parallel()


def _default_conf_dir() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.normpath(os.path.join(here, "..", "..", "conf"))


def main() -> None:
    """Console entry point ``nemo-kd-serve-teacher`` (Hydra; overrides as ``key=value``)."""
    import hydra

    @hydra.main(config_path=_default_conf_dir(), config_name="serve_teacher", version_base=None)
    def _app(cfg) -> None:
        run_from_config(cfg)

    _app()


if __name__ == "__main__":
    main()
