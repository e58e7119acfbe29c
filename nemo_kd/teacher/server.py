"""``nemo-kd-serve-teacher``: serve any teacher nemo_kd loads over HTTP, in vLLM's dialect.

Endpoints (``aiohttp.web``):

* ``POST /v1/completions`` – token-id prompts (one list, or a list of lists), teacher-forced
  ``prompt_logprobs = k`` exactly as vLLM answers them (``null`` at position 0, then
  ``{token_id: {logprob, rank, decoded_token}}``: the k best plus the scored token when it is
  outside them), ``echo``, ``return_token_ids``, and ``max_tokens <= 1`` at temperature 0 (one
  greedy token, which scoring clients discard). Sampling (``max_tokens > 1``, ``temperature > 0``,
  ``n > 1``, ``logprobs`` of generated tokens) is refused with a 400 that says so: it is not served yet.
* ``GET /v1/models`` – the one model, with ``max_model_len`` and a ``nemo_kd`` record (teacher
  hash, vocabulary size, ``max_logprobs``) that a client fingerprints into its store's manifest.
* ``GET /health``.

Requests that arrive while a forward runs are batched into the next one (up to
``max_batch_tokens`` padded tokens): one forward per batch, on a worker thread, so the event
loop keeps accepting. The statistics are extraction's (:func:`nemo_kd.teacher.topk.teacher_token_stats`:
same top-k order, log-probs ``z − LSE`` in fp32), so a store extracted through this server equals
the in-process one up to the batch's float rounding. Limits (prompt length, ``max_tokens``, ``n``,
k above ``max_logprobs``, prompts per request) are answered with a 4xx naming the limit, in
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

    def __post_init__(self):
        if self.max_logprobs < 1 or self.max_batch_tokens < 1 or self.max_prompts_per_request < 1:
            raise ValueError("max_logprobs, max_batch_tokens and max_prompts_per_request must be >= 1")


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
    from nemo_kd.teacher.topk import NonFiniteLogitsError, check_finite_logits, teacher_token_stats

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


def serve_forward_worker(teacher: "Teacher") -> None:
    """Ranks other than 0: run every forward rank 0 broadcasts, until it says stop."""
    while True:
        command = _broadcast_command(None)
        if command[0] == "stop":
            return
        _, prompts, k = command
        score_prompts(teacher, prompts, k)


class TeacherServer:
    """The HTTP front (aiohttp) and the batching forward of one teacher."""

    def __init__(self, teacher: Teacher, cfg: ServeConfig, tokenizer=None):
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

    def stop_workers(self) -> None:
        """Release the ranks waiting in :func:`serve_forward_worker` (rank 0, once, at shutdown)."""
        if _world_size() > 1:
            _broadcast_command(("stop",))

    async def _batcher(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.cfg.batch_wait_ms / 1000
            while True:  # take what arrived together, up to max_batch_tokens padded tokens
                try:
                    item = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    if loop.time() >= deadline:
                        break
                    await asyncio.sleep(max(0.0, min(deadline - loop.time(), 0.001)))
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

    def _parse(self, body: Any) -> Tuple[List[List[int]], Optional[int], int, bool, bool]:
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
        n = body.get("n", 1)
        if n != 1:
            raise _BadRequest(400, f"n={n}: this server returns one choice per prompt (n must be 1; sampling "
                                   "several completions is not served yet)", "n")
        max_tokens = body.get("max_tokens", 1)
        if not isinstance(max_tokens, int) or not 0 <= max_tokens <= 1:
            raise _BadRequest(400, f"max_tokens={max_tokens}: sampling is not served yet (max_tokens must be 0 or "
                                   "1: teacher-forced scoring with prompt_logprobs)", "max_tokens")
        temperature = body.get("temperature")
        if max_tokens and temperature not in (None, 0, 0.0):
            raise _BadRequest(400, f"temperature={temperature}: sampling is not served yet (the one generated "
                                   "token is greedy: send temperature=0)", "temperature")
        if body.get("logprobs"):
            raise _BadRequest(400, "logprobs of generated tokens are not served yet: use prompt_logprobs",
                              "logprobs")
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
        from nemo_kd.teacher.topk import NonFiniteLogitsError

        if not self._authorised(request):
            return _error(401, "invalid or missing API key")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the request body is not JSON")
        try:
            prompts, k, max_tokens, echo, return_ids = self._parse(body)
        except _BadRequest as e:
            return _error(e.status, e.message, e.param)
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
            serve_forward_worker(teacher)  # until rank 0 stops
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
