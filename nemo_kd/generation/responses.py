"""Prompts in, sampled responses out: the JSON Lines every pipeline stage reads and writes.

**Prompts** (:func:`read_prompts`): one object per line, ``{"prompt": str}`` or
``{"messages": [prompt turns]}`` (trailing assistant turns, if any, are dropped: a
training file works as a prompt file), with an optional ``id`` and an optional
``reference`` answer for rule-based scoring (a ``response`` field serves as the
reference when ``reference`` is absent). Errors name ``file:line``.

**Responses** (:func:`sample_responses`): one object per sampled response::

    {"id": <prompt id>, "prompt_index": i, "sample": j, "messages": [prompt turns],
     "response": str, "finished": bool, "num_tokens": int, "temperature": T,
     "logprobs": [...], "token_offsets": [[start, end], ...]}

``logprobs`` are the sampling model's log-probs of the response tokens at temperature 1
(the raw distribution, as vLLM reports them; what divergence-aware selection compares
with the student's teacher-forced log-probs: both sides on the same footing whatever the
sampling temperature) and ``token_offsets`` their character spans in ``response``.
Response ``j`` of prompt ``i`` is drawn with sample index ``i·n + j`` (:mod:`sampling`'s
reproducibility contract), so a run split over data-parallel ranks writes the same
responses as one process.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from nemo_kd.align.groups import content_offsets, content_ranges
from nemo_kd.data.records import DataError, _iter_jsonl, completion_start


@dataclass(frozen=True)
class Prompt:
    index: int
    id: Any
    messages: Tuple[Dict[str, str], ...]  # prompt turns only
    reference: Optional[str] = None


def _prompt_from_object(obj: Any, file: str, line: int, index: int) -> Prompt:
    if not isinstance(obj, dict):
        raise DataError(file, line, "expected a JSON object")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                 and isinstance(m.get("content"), str) for m in msgs):
            raise DataError(file, line, "field 'messages' must be a list of {role, content} strings")
        msgs = msgs[:completion_start(msgs)]
        if not msgs:
            raise DataError(file, line, "no prompt turns before the assistant turn(s)")
    elif isinstance(obj.get("prompt"), str):
        msgs = [{"role": "user", "content": obj["prompt"]}]
    else:
        raise DataError(file, line, "missing field: expected 'prompt' (string) or 'messages'")
    ref = obj.get("reference", obj.get("response"))
    if ref is not None and not isinstance(ref, str):
        raise DataError(file, line, "field 'reference' must be a string")
    return Prompt(index, obj.get("id", index), tuple({"role": m["role"], "content": m["content"]} for m in msgs), ref)


def read_prompts(path: str) -> List[Prompt]:
    """Prompts of a JSON Lines file (module docstring); ``DataError`` names file:line."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such prompt file: {path}")
    out: List[Prompt] = []
    for line, obj, err in _iter_jsonl(path):
        if err is not None:
            raise DataError(path, line, err)
        out.append(_prompt_from_object(obj, path, line, len(out)))
    return out


def group_by_prompt(rows: Sequence[Dict[str, Any]]) -> Dict[int, List[Dict[str, Any]]]:
    """Response rows grouped by ``prompt_index``, each group in ``sample`` order."""
    groups: Dict[int, List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["prompt_index"], []).append(r)
    for g in groups.values():
        g.sort(key=lambda r: r.get("sample", 0))
    return groups


def _token_offsets(tokenizer, token_ids: Sequence[int], text: str, window: int = 8) -> List[Tuple[int, int]]:
    """Character span of each token in ``text`` (the decoding of ``token_ids``).

    Incremental detokenisation: token ``j`` adds ``decode(ids[s:j+1]) − decode(ids[s:j])``
    characters, ``s = max(0, j − window)``. The window always holds a token before ``j``
    (``j ≥ 1``), so a SentencePiece word-start space dropped at the start of a decode is
    dropped on both sides; a byte of an unfinished multi-byte character adds nothing until
    the token that completes it. O(n·window) decodes instead of n prefix decodes."""
    def length(ids):
        return len(tokenizer.decode(list(ids), skip_special_tokens=True).rstrip("\ufffd"))

    spans, prev = [], 0
    for j in range(len(token_ids)):
        s = max(0, j - window)
        cur = min(len(text), prev + max(0, length(token_ids[s:j + 1]) - length(token_ids[s:j])))
        spans.append((prev, cur))
        prev = cur
    if spans:  # what is still pending at the end (bytes of an unfinished character) is the last token's
        spans[-1] = (spans[-1][0], len(text))
    return spans


def sample_responses(model, ctok, prompts: Sequence[Prompt], sampling, num_samples: int = 1, *,
                     vocab_size: int, max_length: Optional[int] = None, batch_size: int = 64,
                     with_logprobs: bool = True, progress=None, served=None) -> List[Dict[str, Any]]:
    """``num_samples`` responses per prompt from ``model`` (a Megatron GPT at any TP, or
    :class:`~nemo_kd.generation.sampling.HFCausalLM`), or from ``served`` (a
    :class:`~nemo_kd.generation.served_sampling.ServedPolicy`: a teacher behind a server, ``model`` unused),
    rendered with ``ctok`` (the model's :class:`~nemo_kd.data.tokenization.ConversationTokenizer`). Rows as in
    the module docstring."""
    from nemo_kd.generation.sampling import generate

    if any(p.index != prompts[0].index + i for i, p in enumerate(prompts)):
        raise ValueError("sample_responses needs a contiguous block of prompts (see shard_range)")
    tok = ctok.tokenizer
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    rows: List[Dict[str, Any]] = []
    ids = [list(tok(ctok.render_prompt(p.messages), add_special_tokens=False)["input_ids"]) for p in prompts]
    # Prompt i's j-th draw is global sample index first·n + i·n + j whatever the batching.
    first = prompts[0].index if prompts else 0
    if served is not None:  # n draws per prompt in one request, the same sample indices
        gens = served.generate(ids, num_samples, sampling, eos_id=eos, max_length=max_length,
                               sample_offset=first * num_samples, progress=progress, tokenizer=tok)
    else:
        expanded = [ids[i] for i in range(len(prompts)) for _ in range(num_samples)]
        gens = generate(model, expanded, sampling, eos_id=eos, pad_id=pad, vocab_size=vocab_size,
                        max_length=max_length, batch_size=batch_size, sample_offset=first * num_samples,
                        progress=progress, tokenizer=tok)
    for r, g in enumerate(gens):
        p = prompts[r // num_samples]
        row = {"id": p.id, "prompt_index": p.index, "sample": r % num_samples, "messages": [dict(m) for m in p.messages],
               "response": g.text, "finished": g.finished, "num_tokens": len(g.token_ids),
               "temperature": sampling.temperature}
        if p.reference is not None:
            row["reference"] = p.reference
        if with_logprobs:
            row["logprobs"] = [float(x) for x in g.logprobs[:len(g.token_ids)]]
            row["token_offsets"] = [list(s) for s in _token_offsets(tok, g.token_ids, g.text)]
        rows.append(row)
    return rows


def shard_range(n: int, rank: int, world: int) -> range:
    """The contiguous block of ``range(n)`` data-parallel rank ``rank`` of ``world`` handles."""
    per = -(-n // world)
    return range(min(n, rank * per), min(n, (rank + 1) * per))


def response_content_tokens(ctok, row: Dict[str, Any]) -> Tuple[List[int], List[int], List[Tuple[int, int]]]:
    """``(prompt ids, response ids, spans)`` of ``row``'s conversation as ``ctok`` renders it:
    the response tokens up to the last one that holds content (the end-of-turn tokens after
    it excluded) and their character spans in ``row["response"]`` (empty for a token of the
    template's own text). The content is placed where the template put it
    (:func:`~nemo_kd.align.groups.content_ranges`: an answer ``<`` is not inside Qwen3's
    ``<think>``) and mapped back through what the template rewrote
    (:func:`~nemo_kd.align.groups.content_offsets`: Llama-2's strip, Qwen3's think block).
    Empty lists for a row the tokenizer drops (its reason recorded by ``ctok``)."""
    messages = list(row["messages"]) + [{"role": "assistant", "content": row["response"]}]
    tok = ctok(messages, sample_name=f"prompt {row.get('prompt_index')} sample {row.get('sample', 0)}")
    if tok is None:
        return [], [], []
    start, n_p = tok.completion_char_start, tok.num_prompt_tokens
    text = tok.text[start:]
    if row["response"]:
        lo, hi = content_ranges(text, [row["response"]], ctok.tokenizer, messages, tok)[0]
    else:
        lo = hi = 0
    to_response = content_offsets(row["response"], text[lo:hi])
    spans = [(to_response[max(0, min(s - start - lo, hi - lo))], to_response[max(0, min(e - start - lo, hi - lo))])
             for s, e in tok.token_char_spans[n_p:]]
    keep = max([j + 1 for j, (s, _) in enumerate(tok.token_char_spans[n_p:]) if s - start < hi], default=0)
    return list(tok.input_ids[:n_p]), list(tok.input_ids[n_p:n_p + keep]), spans[:keep]


def score_responses(model, ctok, rows: Sequence[Dict[str, Any]], *, vocab_size: int,
                    batch_size: int = 64, served=None,
                    pack_length: Optional[int] = None) -> List[Tuple[List[float], List[Tuple[int, int]]]]:
    """Teacher-forced log-probs of each row's response under ``model``, tokenised and rendered
    by ``ctok`` (the model's own :class:`~nemo_kd.data.tokenization.ConversationTokenizer`).

    Returns per row ``(logprobs, spans)`` over the tokens of the response *content* (the
    template's end-of-turn tokens excluded): ``spans`` are character ranges in
    ``row["response"]``, so two models with different tokenizers are compared on the same
    text (divergence-aware selection; the teacher as judge: ``mean(logprobs)``). A row
    longer than ``ctok.max_seq_length`` is scored on its kept tokens (truncated) or,
    with ``overlong="drop"``, gets empty lists. ``served``: a
    :class:`~nemo_kd.generation.served_sampling.ServedPolicy` scores instead of ``model`` (``prompt_logprobs``).
    ``pack_length``: the (prompt, response) pairs packed into rows of that many positions
    (:func:`~nemo_kd.generation.sampling.response_logprobs`; a Megatron-core GPT); a served policy batches on
    its server and ignores it.
    """
    from nemo_kd.generation.sampling import response_logprobs

    prompts, responses, spans_of = [], [], []
    for r in rows:
        p_ids, r_ids, spans = response_content_tokens(ctok, r)
        prompts.append(p_ids), responses.append(r_ids), spans_of.append(spans)
    scored = [i for i, r in enumerate(responses) if r]
    if served is not None:
        lps = served.score([prompts[i] for i in scored], [responses[i] for i in scored],
                           names=[f"prompt {rows[i].get('prompt_index')} sample {rows[i].get('sample', 0)}"
                                  for i in scored]) if scored else []
    else:
        lps = response_logprobs(model, [prompts[i] for i in scored], [responses[i] for i in scored],
                                batch_size=batch_size, vocab_size=vocab_size,
                                pack_length=pack_length) if scored else []
    out: List[Tuple[List[float], List[Tuple[int, int]]]] = [([], []) for _ in rows]
    for i, lp in zip(scored, lps):
        out[i] = (lp.tolist(), spans_of[i])
    return out
