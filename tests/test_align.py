"""Cross-tokenizer alignment: byte spans, groups, vocabulary map, loss (CPU, small).

Genuinely different tokenizers are trained on the fly: a byte-level BPE with the
ChatML template (Qwen style), a SentencePiece unigram with byte fallback and the
Llama-2 ``[INST]`` template (Llama-2 / Mistral style), a SentencePiece-style BPE whose
whitespace runs ``▁▁`` … are *added* tokens and whose template trims contents (Gemma-3
style), and the byte-level BPE with an NFC normaliser (Qwen's), fed decomposed text.
The real tokenizers are in ``test_align_real_tokenizers.py``.
"""

import json
import unicodedata

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from nemo_kd.align import (
    AlignmentGroups,
    align_conversation,
    build_cross_tokenizer_batch,
    build_vocab_map,
    completion_byte_spans,
    cross_tokenizer_kd_loss,
    get_token_bytes,
    token_byte_spans,
)
from nemo_kd.align.groups import B_END, B_START, S_END, S_START, T_END, T_START, content_coordinates
from nemo_kd.align.spans import _spans_from_offsets
from nemo_kd.data.sentencepiece_builder import train_sentencepiece_unigram
from nemo_kd.data.tokenization import ConversationTokenizer, split_prompt_completion
from nemo_kd.data.tokenizer_builder import train_byte_level_bpe
from nemo_kd.losses.kd import KDSettings, topk_kd_loss

CORPUS = [
    "What is 12 plus 30? The answer is 42. Then the answer is the number.",
    "Reverse the word cat: tac. Unicode: café, naïve, 日本語, emoji 🙂.",
    "def f(x):\n    return x * 2\n\nclass A:\n    pass\n",
    "The quick brown fox jumps over the lazy dog.  Two  spaces, tabs\tand newlines\n\nhere.",
    "Hello world! How are you today? I am fine, thank you for asking.",
] * 40

TRICKY = [
    "Hello world",
    "  leading spaces and trailing   ",
    "emoji 🙂🚀 family 👨‍👩‍👧 flags 🇫🇷 done",
    "日本語のテキストと中文混合 text",
    "digits 1234567890 3.14159 -42 1e-9",
    "line one\nline two\n\n\nline five\r\nend",
    "def f(x):\n    return {'a': [x ** 2 for x in range(10)]}  # code\n",
    "repeated     spaces\t\ttabs   and ünïcödé ß ø Ω ≈ ∑",
    "\n\nstarts with newlines",
    "x",
]


# Decomposed (NFD) text, which an NFC normaliser composes: the tokens' bytes are not the text's.
NFD_TEXTS = [unicodedata.normalize("NFD", t) for t in (
    "Cafe\u0301 and cre\u0300me", "a n\u0303 ñandú", "한국어 텍스트", "naïve café, Zürich: Ångström")]

# Gemma-3's chat template, reduced: a "model" role, contents trimmed, <end_of_turn>\n after each turn.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
GEMMA_WHITESPACE = ["▁" * k for k in (2, 4, 8)]


def _gemma_style(texts, vocab_size=400):
    """A Gemma-3-style tokenizer: BPE with byte fallback on text whose spaces the *normaliser* writes
    as ``▁`` (decoder: ``▁`` → space), runs of ``▁`` both model pieces and non-special added tokens
    (as Gemma-3's ids 138–167), special ``<start_of_turn>`` / ``<end_of_turn>``."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tok.train_from_iterator(list(texts), trainer=trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                                     show_progress=False))
    spec = json.loads(tok.to_str())
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    for piece in [f"<0x{b:02X}>" for b in range(256)] + ["▁"] + GEMMA_WHITESPACE:
        vocab.setdefault(piece, len(vocab))
    # the whitespace runs are reachable from spaces, first (Gemma's model pieces)
    merges[:0] = [["▁", "▁"], ["▁▁", "▁▁"], ["▁▁▁▁", "▁▁▁▁"]]
    spec["added_tokens"] += [{"id": vocab[w], "content": w, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": False} for w in GEMMA_WHITESPACE]
    spec["decoder"] = json.loads(decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                                    decoders.Fuse()]).__getstate__())
    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<bos>",
                                 eos_token="<eos>", unk_token="<unk>", pad_token="<pad>")
    hf.chat_template = GEMMA_TEMPLATE
    return hf


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    d1, d2 = tmp_path_factory.mktemp("bpe"), tmp_path_factory.mktemp("spm")
    train_byte_level_bpe(CORPUS, vocab_size=400, template="chatml", save_dir=str(d1))
    train_sentencepiece_unigram(CORPUS, vocab_size=400, save_dir=str(d2))
    return AutoTokenizer.from_pretrained(str(d1)), AutoTokenizer.from_pretrained(str(d2))


@pytest.fixture(scope="module")
def family(toks):
    """Every tokenizer by name: ``bpe``, ``spm``, ``gemma`` (Gemma-3 style), ``bpe_nfc`` (Qwen's NFC)."""
    nfc = train_byte_level_bpe(CORPUS + NFD_TEXTS * 10, vocab_size=400, template="chatml")
    nfc.backend_tokenizer.normalizer = normalizers.NFC()
    return {"bpe": toks[0], "spm": toks[1], "gemma": _gemma_style(CORPUS), "bpe_nfc": nfc}


def _conv(text):
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say: " + text[:20]},
            {"role": "assistant", "content": text}]


def _chat_ids(tok, msgs):
    out = tok.apply_chat_template(msgs, tokenize=True)
    return list(out["input_ids"] if not isinstance(out, list) else out)


# ----------------------------------------------------------------------------- spans


@pytest.mark.parametrize("which", [0, 1])
def test_token_byte_spans_tile_and_match_token_bytes(toks, which):
    tok = toks[which]
    tb = get_token_bytes(tok)
    assert tb.style == ("byte_level", "sentencepiece")[which]
    for text in TRICKY:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        sp = token_byte_spans(tok, ids, text)
        raw = text.encode()
        assert sp[0, 0] == 0 and sp[-1, 1] == len(raw)
        assert (sp[1:, 0] == sp[:-1, 1]).all() and (sp[:, 1] >= sp[:, 0]).all()
        for (a, b), i in zip(sp, ids):  # each token's span holds exactly its bytes (a dummy "▁" prefix: none)
            if b > a:
                assert raw[a:b] == tb.table[i] or (a == 0 and b" " + raw[a:b] == tb.table[i])


def test_split_characters_get_byte_subspans(toks):
    bpe, spm = toks
    text = "a 🚀"
    ids = bpe(text, add_special_tokens=False)["input_ids"]
    sp = token_byte_spans(bpe, ids, text)
    assert len(ids) > 2 and (sp[:, 1] - sp[:, 0]).sum() == len(text.encode())  # the emoji is split, bytes tile
    ids = spm(text, add_special_tokens=False)["input_ids"]
    pieces = spm.convert_ids_to_tokens(ids)
    assert pieces[-4:] == ["<0xF0>", "<0x9F>", "<0x9A>", "<0x80>"]  # byte fallback, 1 byte each
    sp = token_byte_spans(spm, ids, text)
    assert (sp[-4:, 1] - sp[-4:, 0] == 1).all() and sp[-1, 1] == len(text.encode())


@pytest.mark.parametrize("which", [0, 1])
def test_offset_path_agrees_with_exact_path(toks, which):
    tok = toks[which]
    for text in TRICKY:
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        exact = token_byte_spans(tok, enc["input_ids"], text)
        via = _spans_from_offsets(get_token_bytes(tok), np.asarray(enc["input_ids"]), text, enc["offset_mapping"])
        # Same boundaries wherever a token has bytes (a dummy-prefix "▁" may differ in where it is zero-width).
        assert via[-1, 1] == exact[-1, 1]
        assert set(via[:, 1][via[:, 1] > via[:, 0]]) <= set(exact[:, 1]) | {0}


def check_unit_spans(tok, text, ids, offs, sp):
    """Spans of ``ids`` (offsets ``offs``) in ``text``: they tile its bytes; each *unit* (a run of
    tokens sharing characters; mostly one token) covers whole characters of the original text; those
    characters, normalised as the tokenizer normalises, are what the unit's tokens stand for (a
    composed ``é`` covers ``e`` + U+0301; an end-of-turn token after it covers only itself); with
    bytes that reproduce the text, each span holds its token's bytes. Shared with the real-tokenizer
    tests."""
    raw = text.encode()
    pos = np.concatenate([[0], np.cumsum([len(c.encode()) for c in text])]).astype(np.int64)
    at_char = {int(p): c for c, p in enumerate(pos)}
    assert sp[0, 0] == 0 and (sp[1:, 0] == sp[:-1, 1]).all() and (sp[:, 1] >= sp[:, 0]).all()
    assert sp[-1, 1] == len(raw)
    tb = get_token_bytes(tok)
    norm = tok.backend_tokenizer.normalizer
    normalise = norm.normalize_str if norm is not None else (lambda x: x)
    if b"".join(tb.table[i] for i in ids) == raw:
        assert [raw[a:b] for a, b in sp] == [tb.table[i] for i in ids]
    n, i = len(ids), 0
    while i < n:  # walk the units
        j, end = i, offs[i][1]
        while j + 1 < n and offs[j + 1][0] < end:
            j += 1
            end = max(end, offs[j][1])
        lo, hi = int(sp[i, 0]), int(sp[j, 1])
        assert lo in at_char and hi in at_char, (text, i, j)  # whole characters
        own = b"".join(tb.table[k] for k in ids[i:j + 1])
        if i == 0 and own[:1] == b" " and not text.startswith(" "):
            own = own[1:]  # a SentencePiece dummy prefix
        assert normalise(raw[lo:hi].decode()) == normalise(own.decode("utf-8", "replace")), (text, i, j)
        if i == j and offs[i][1] > offs[i][0]:
            assert hi > lo
        i = j + 1


@pytest.mark.parametrize("which", ["bpe", "spm", "gemma", "bpe_nfc"])
def test_spans_hold_the_original_bytes(family, which):
    tok = family[which]
    for text in TRICKY + NFD_TEXTS:
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        check_unit_spans(tok, text, enc["input_ids"], enc["offset_mapping"],
                         token_byte_spans(tok, enc["input_ids"], text))


def test_nfc_normaliser_spans_cover_the_decomposed_characters(family):
    """Byte-level BPE + NFC on NFD text: the offset path; a composed character's token covers all of
    the original (decomposed) bytes, no token is zero-width, equal tokenizers align one-to-one."""
    tok = family["bpe_nfc"]
    text = NFD_TEXTS[0]  # "Cafe\u0301 and cre\u0300me"
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    sp = token_byte_spans(tok, enc["input_ids"], text)
    raw = text.encode()
    assert b"".join(get_token_bytes(tok).table[i] for i in enc["input_ids"]) != raw  # composed: offset path
    pieces = [raw[a:b].decode("utf-8", "replace") for a, b in sp]
    assert "e\u0301" in pieces and all(pieces)  # the composed é (a token of its own) covers e + U+0301
    check_unit_spans(tok, text, enc["input_ids"], enc["offset_mapping"], sp)
    ct = ConversationTokenizer(tok, max_seq_length=4096)
    for text in NFD_TEXTS:
        _, _, g = align_conversation(_conv(text), ct, ct)
        assert g.fraction_one_to_one == 1.0 and g.num_aligned_student_tokens == g.num_student_tokens


def test_gemma_style_added_whitespace_tokens(family):
    """Added (non-special) ``▁▁`` … tokens stand for spaces, as the normaliser/decoder round trip says:
    exact spans, and they map to the byte-level space runs in both directions."""
    gemma, bpe = family["gemma"], family["bpe"]
    tb, gv, bv = get_token_bytes(gemma), gemma.get_vocab(), bpe.get_vocab()
    added = {t.content: i for i, t in gemma.added_tokens_decoder.items()}
    for w in GEMMA_WHITESPACE:
        assert w in added and tb.table[added[w]] == b" " * len(w) and not tb.special[added[w]]
    assert tb.table[gv["<end_of_turn>"]] == b"<end_of_turn>" and tb.special[gv["<end_of_turn>"]]
    text = "a        b    c  d"
    ids = gemma(text, add_special_tokens=False)["input_ids"]
    assert {added[w] for w in GEMMA_WHITESPACE} <= set(ids)
    sp = token_byte_spans(gemma, ids, text, char_offsets=[(0, 0)] * len(ids))  # exact path: offsets unused
    assert [text.encode()[a:b] for a, b in sp] == [tb.table[i] for i in ids]
    assert build_vocab_map(bpe, gemma).teacher_to_student[added["▁▁"]] == bv["ĠĠ"]
    assert build_vocab_map(gemma, bpe).teacher_to_student[bv["ĠĠ"]] == added["▁▁"]


# ----------------------------------------------------------------------------- groups


def _check_groups(s, t, g, s_tok, t_tok, content):
    g.validate()
    raw = content.encode()
    assert g.content_bytes == len(raw)
    assert g.num_student_tokens == sum(s.loss_mask) == len(s.input_ids) - s.num_prompt_tokens
    assert g.num_teacher_tokens == sum(t.loss_mask) == len(t.input_ids) - t.num_prompt_tokens
    if not s.truncated and not t.truncated:
        assert g.aligned_bytes == len(raw)  # groups tile the whole shared content, each byte once
    for sample, tok, lo, hi in ((s, s_tok, S_START, S_END), (t, t_tok, T_START, T_END)):
        text, spans = completion_byte_spans(sample, tok)
        # content located the same way align_samples does (verbatim, else stripped on both sides)
        start = text.encode().find(raw)
        cc = content_coordinates(spans, [(start, start + len(raw))])
        width = cc[:, 1] - cc[:, 0]
        covered = np.zeros(len(raw), dtype=int)
        in_group = np.zeros(len(spans), dtype=bool)
        for row in g.array:
            tokens = np.arange(row[lo], row[hi])
            in_group[tokens] = True
            pos = tokens[width[tokens] > 0]
            assert cc[pos[0], 0] == row[B_START] and cc[pos[-1], 1] == row[B_END]  # tokens tile the group
            assert (cc[pos[1:], 0] == cc[pos[:-1], 1]).all()
            for a, b in cc[pos]:
                covered[a:b] += 1
        assert (covered[: g.aligned_bytes] == 1).all() and (covered[g.aligned_bytes:] == 0).all()
        if not s.truncated and not t.truncated:
            assert (width[~in_group] == 0).all()  # only template tokens stay unaligned


@pytest.mark.parametrize("direction", ["bpe->spm", "spm->bpe", "gemma->bpe", "bpe->gemma", "bpe_nfc->spm",
                                       "gemma->bpe_nfc"])
def test_groups_cover_shared_content_exactly_once(family, direction):
    s_tok, t_tok = (family[name] for name in direction.split("->"))
    s_ct, t_ct = ConversationTokenizer(s_tok, max_seq_length=4096), ConversationTokenizer(t_tok, max_seq_length=4096)
    kinds = {"one_to_one": 0, "one_to_many": 0, "many_to_one": 0, "many_to_many": 0}
    for text in TRICKY + NFD_TEXTS:
        s, t, g = align_conversation(_conv(text), s_ct, t_ct)
        _check_groups(s, t, g, s_tok, t_tok, text.strip())  # Llama-2's and Gemma's templates strip the content
        for k, v in g.kinds().items():
            kinds[k] += v
        assert 0 < g.fraction_aligned and 0 <= g.fraction_one_to_one <= g.fraction_aligned <= 1
        assert AlignmentGroups.from_numpy(g.to_numpy()).array.tolist() == g.array.tolist()
    assert all(v > 0 for v in kinds.values()), kinds  # every group kind is exercised


def test_groups_with_truncation(toks):
    bpe, spm = toks
    text = TRICKY[6] * 3
    s_ct = ConversationTokenizer(bpe, max_seq_length=4096)
    full = s_ct(_conv(text))
    t_ct = ConversationTokenizer(spm, max_seq_length=4096)
    t_full = t_ct(_conv(text))
    t_ct = ConversationTokenizer(spm, max_seq_length=t_full.num_prompt_tokens + 17)
    s, t, g = align_conversation(_conv(text), s_ct, t_ct)
    assert t.truncated and g.num_teacher_tokens == 17 and g.num_student_tokens == sum(full.loss_mask)
    _check_groups(s, t, g, bpe, spm, text.strip())
    assert 0 < g.aligned_bytes < len(text.strip().encode())
    assert g.array[-1, T_END] <= 17


@pytest.mark.parametrize("which", [0, 1])
def test_teacher_ids_equal_own_apply_chat_template(toks, which):
    """The teacher's rendering (prompt and completion tokenised separately) gives exactly
    ``teacher_tokenizer.apply_chat_template(conversation, tokenize=True)``."""
    tok = toks[which]
    ct = ConversationTokenizer(tok, max_seq_length=4096)
    for text in TRICKY:
        msgs = _conv(text)
        smp = ct(msgs)
        assert smp.text == tok.apply_chat_template(msgs, tokenize=False)
        assert smp.input_ids == _chat_ids(tok, msgs)
        comp = smp.text[smp.completion_char_start:]
        assert smp.input_ids[smp.num_prompt_tokens:] == tok(comp, add_special_tokens=False)["input_ids"]
    assert ("[INST]" in smp.text) == (which == 1) and ("<|im_start|>" in smp.text) == (which == 0)


# ----------------------------------------------------------------------------- vocabulary map


def test_vocab_map_exact_surface_matches(toks):
    bpe, spm = toks
    vm = build_vocab_map(bpe, spm)  # teacher = spm
    tb_s, tb_t = get_token_bytes(bpe), get_token_bytes(spm)
    t2s = vm.teacher_to_student
    mapped = np.flatnonzero(t2s >= 0)
    assert len(mapped) > 100
    for t in mapped:
        assert tb_t.table[t] == tb_s.table[t2s[t]] and not tb_t.special[t]
    # word markers and byte tokens normalised: "▁the" ↔ "Ġthe", "<0x0A>" / "\n" ↔ "Ċ"
    sv, tv = bpe.get_vocab(), spm.get_vocab()
    if "▁the" in tv and "Ġthe" in sv:
        assert t2s[tv["▁the"]] == sv["Ġthe"]
    assert t2s[tv["<0x0A>"]] == sv["Ċ"] and t2s[tv["<0xF0>"]] == sv["ð"]
    assert t2s[tv["</s>"]] == -1 and not vm.injective  # specials never match text; bytes duplicate pieces
    assert 0 < vm.teacher_coverage < 1 and 0 < vm.student_coverage < 1
    vm2 = build_vocab_map(spm, bpe)
    assert vm2.teacher_to_student[sv["Ċ"]] == tv.get("\n", tv["<0x0A>"])  # canonical: a piece before <0x0A>
    assert vm2.teacher_to_student[sv["<|im_end|>"]] == -1


def test_vocab_map_padded_identity(tmp_path):
    d = tmp_path / "t300"
    train_byte_level_bpe(CORPUS, vocab_size=300, template="chatml", save_dir=str(d))
    a, b = AutoTokenizer.from_pretrained(str(d)), AutoTokenizer.from_pretrained(str(d))
    real = len(a)
    vm = build_vocab_map(a, b, student_vocab_size=384, teacher_vocab_size=512)
    assert vm.is_identity and vm.injective and vm.teacher_vocab_size == 512 and vm.student_vocab_size == 384
    assert (vm.teacher_to_student[:real] == np.arange(real)).all() and (vm.teacher_to_student[real:] == -1).all()
    assert vm.teacher_coverage == 1.0
    ids = torch.tensor([[0, real - 1, real, 511]])
    assert vm.map_ids(ids).tolist() == [[0, real - 1, -1, -1]]
    with pytest.raises(ValueError):
        build_vocab_map(a, b, student_vocab_size=real - 1)


# ChatML with Qwen3's empty think block in front of the last answer (its template text contains "<", "k", ...).
THINK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and loop.last %}<think>\n\n</think>\n\n{% endif %}"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize("answer", ["<", ">", "/", "k", "n", "think", "\n"])
def test_content_also_in_the_template_text_is_located_after_it(family, answer):
    """An answer that also occurs in the template text before it is aligned where it is, after the
    template's think block; the block is unaligned (no teacher counterpart) and so is not in any group."""
    think = train_byte_level_bpe(CORPUS, vocab_size=400, template="chatml")
    think.chat_template = THINK_TEMPLATE
    s_ct, t_ct = ConversationTokenizer(family["spm"], max_seq_length=4096), ConversationTokenizer(think, max_seq_length=4096)
    s, t, g = align_conversation(_conv(answer), s_ct, t_ct)
    text, spans = completion_byte_spans(t, think)
    block = len("<think>\n\n</think>\n\n")
    assert text[:block] == "<think>\n\n</think>\n\n" and text[block:block + len(answer)] == answer
    g.validate()
    if answer.strip():  # Llama-2's template strips a "\n" answer away: nothing shared then
        assert g.content_bytes == len(answer) == g.aligned_bytes
        t_tok = np.arange(g.array[0, T_START], g.array[-1, T_END])
        assert spans[t_tok[0], 0] <= block and spans[t_tok[-1], 1] >= block + len(answer)
        assert (spans[t_tok, 1] > block).all()  # no token of the think block is in a group
    assert (g.teacher_group_index()[spans[:, 1] <= block] == -1).all()


# ----------------------------------------------------------------------------- loss


def _identity_setup(tok, texts):
    ct = ConversationTokenizer(tok, max_seq_length=4096)
    samples, groups = [], []
    for text in texts:
        s, t, g = align_conversation(_conv(text), ct, ct)
        assert s.input_ids == t.input_ids and g.fraction_one_to_one == 1.0
        samples.append(s)
        groups.append(g)
    return samples, groups


@pytest.mark.parametrize("convention", ["renormalized", "exact_tail"])
@pytest.mark.parametrize("loss_type", ["forward_kl", "reverse_kl", "jsd", "akl"])
@pytest.mark.parametrize("which", ["bpe", "bpe_nfc", "gemma"])
def test_identity_equals_same_tokenizer_loss(family, which, convention, loss_type):
    """Equal tokenizers and templates: every token one-to-one, the same-tokenizer loss. Also on decomposed
    text under an NFC normaliser (offset path) and across Gemma-style added whitespace tokens."""
    bpe = family[which]
    samples, groups = _identity_setup(bpe, TRICKY[:4] + (NFD_TEXTS if which == "bpe_nfc" else []))
    # same tokenizer, padded vocabularies (bpe: 512 student and teacher rows)
    v_student = v_teacher = 128 * (len(bpe) // 128 + 1)
    k = 8
    vm = build_vocab_map(bpe, bpe, student_vocab_size=v_student, teacher_vocab_size=v_teacher)
    g = torch.Generator().manual_seed(0)
    n = sum(len(s.input_ids) for s in samples)
    student = torch.randn(n, v_student, generator=g, dtype=torch.float32, requires_grad=True)
    teacher_full = torch.randn(n, v_teacher, generator=g) * 2
    teacher_full[:, len(bpe):] = float("-inf")  # padding rows
    # Same-tokenizer layout: row r predicts token r+1; completion token c of a sample at row start+npr-1+c.
    offs, rows, mask = [], [], torch.zeros(n, dtype=torch.bool)
    at = 0
    for s in samples:
        r0 = at + s.num_prompt_tokens - 1
        offs.append(r0)
        mask[r0:r0 + s.num_completion_tokens] = True
        at += len(s.input_ids)
    tz, ti = teacher_full.topk(k, dim=-1)
    lse = torch.logsumexp(teacher_full, -1)
    # reference: the same-tokenizer loss on all rows, masked to the completion rows
    ref = topk_kd_loss(student, torch.where(mask[:, None], tz, torch.full_like(tz, float("-inf"))), ti,
                       KDSettings(loss_type=loss_type, topk_convention=convention), teacher_lse=lse)
    (ref * mask).sum().backward()
    ref_grad = student.grad.clone()
    student.grad = None
    # cross path: the teacher store holds only completion rows (teacher ids), aligned through the groups
    t_rows = torch.cat([torch.arange(o, o + s.num_completion_tokens) for o, s in zip(offs, samples)])
    t_offs = np.concatenate([[0], np.cumsum([s.num_completion_tokens for s in samples])[:-1]])
    comp = [s.input_ids[s.num_prompt_tokens:] for s in samples]
    batch = build_cross_tokenizer_batch(groups, comp, comp, vm, offs, t_offs)
    assert batch.num_chain_groups == 0 and batch.stats["fraction_mapped_one_to_one"] == 1.0
    out = cross_tokenizer_kd_loss(student, tz[t_rows], ti[t_rows], batch, vm,
                                  KDSettings(loss_type=loss_type, topk_convention=convention), teacher_lse=lse[t_rows])
    assert torch.equal(out.aligned_mask, mask)
    torch.testing.assert_close(out.per_token * mask, ref * mask, rtol=1e-6, atol=1e-7)
    (out.per_token * mask).sum().backward()
    torch.testing.assert_close(student.grad, ref_grad, rtol=1e-6, atol=1e-7)
    assert float(out.metrics["topk_mapped_mass"]) == pytest.approx(1.0)


def _reference_loss(student, t_logits, t_ids, lse, t_tgt_lp, t2s, o2o, chains, s_tgt, convention, floor=1e-7):
    """Float64 reference written from the docstring formulas (forward KL), per group."""
    s64 = student.double()
    logq = torch.log_softmax(s64, -1)
    total = []
    for s_row, t_row in o2o:
        p = {}  # student id -> teacher prob (merged)
        z = t_logits[t_row].double()
        for zi, vi in zip(z, t_ids[t_row]):
            m = int(t2s[int(vi)])
            if m >= 0 and torch.isfinite(zi):
                p[m] = p.get(m, 0.0) + torch.exp(zi - lse[t_row].double())
        ids = sorted(p)
        pt = torch.stack([p[i] for i in ids])
        qs = torch.exp(logq[s_row, ids])
        if convention == "renormalized":
            pt, qs = pt / pt.sum(), qs / qs.sum()
        else:
            pt = torch.cat([pt, (1 - pt.sum()).clamp(min=floor)[None]])
            qs = torch.cat([qs, (1 - qs.sum()).clamp(min=floor)[None]])
        total.append((pt * (pt.log() - qs.log())).sum())
    for s_rows, t_rows in chains:
        lq = sum(logq[r, s_tgt[r]] for r in s_rows)
        lp = sum(t_tgt_lp[r].double() for r in t_rows)
        P = torch.stack([lp.exp(), (1 - lp.exp()).clamp(min=floor)])
        Q = torch.stack([lq.exp(), (1 - lq.exp()).clamp(min=floor)])
        total.append((P * (P.log() - Q.log())).sum())
    return torch.stack(total).sum()


@pytest.mark.parametrize("convention", ["renormalized", "exact_tail"])
def test_loss_against_float64_reference(convention):
    # student vocab 5, teacher vocab 6: teacher ids 4 and 5 both map to student 3 (merged), 3 is unmapped
    t2s = np.array([0, 1, 2, -1, 3, 3])

    class _VM:  # a hand-built map with the VocabMap interface the loss uses
        from nemo_kd.align.vocab_map import VocabMap
    vm = _VM.VocabMap(t2s, 5, 6, 5, 6)
    # one sample: student completion [1, 3, 2, 0, 4] (5 tokens), teacher completion [1, 4, 3, 0, 2, 5] (6)
    # groups: s0:t0 (1:1 mapped), s1:t1 (1:1 via the merged id 4→3), s2:t2 (1:1 unmapped: teacher 3),
    #         s3:t3-5 (one-to-many), s4: unaligned
    arr = [[0, 1, 0, 1, 0, 1], [1, 2, 1, 2, 1, 2], [2, 3, 2, 3, 2, 3], [3, 4, 3, 6, 3, 6]]
    al = AlignmentGroups(np.array(arr), num_student_tokens=5, num_teacher_tokens=6, content_bytes=7)
    s_ids, t_ids = [1, 3, 2, 0, 4], [1, 4, 3, 0, 2, 5]
    batch = build_cross_tokenizer_batch([al], [s_ids], [t_ids], vm, [1], [0])  # student rows 1..5 of 7
    assert batch.o2o_student_rows.tolist() == [1, 2] and batch.num_chain_groups == 2
    g = torch.Generator().manual_seed(3)
    student = torch.randn(7, 5, generator=g, dtype=torch.float32, requires_grad=True)
    tfull = torch.randn(6, 6, generator=g, dtype=torch.float64) * 1.5
    lse = torch.logsumexp(tfull, -1)
    tz, ti = tfull.topk(4, dim=-1)
    t_tgt = torch.log_softmax(tfull, -1)[torch.arange(6), torch.tensor(t_ids)]
    out = cross_tokenizer_kd_loss(student, tz.float(), ti, batch, vm, KDSettings(topk_convention=convention),
                                  teacher_lse=lse.float(), teacher_target_logprobs=t_tgt.float())
    assert out.aligned_mask.tolist() == [False, True, True, True, True, False, False]
    loss = out.per_token.sum()
    loss.backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    s64 = student.detach().double().requires_grad_(True)
    s_tgt = {1 + i: s for i, s in enumerate(s_ids)}
    ref = _reference_loss(s64, tz, ti, lse, t_tgt, t2s, [(1, 0), (2, 1)], [([3], [2]), ([4], [3, 4, 5])],
                          s_tgt, convention)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(student.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)


def test_cross_family_loss_end_to_end_finite(toks):
    """bpe student / spm teacher on tricky texts: shapes consistent, loss and grads finite, metrics sane."""
    bpe, spm = toks
    s_ct, t_ct = ConversationTokenizer(bpe, max_seq_length=4096), ConversationTokenizer(spm, max_seq_length=4096)
    vm = build_vocab_map(bpe, spm, student_vocab_size=512, teacher_vocab_size=512)
    groups, s_comp, t_comp, s_offs, t_offs = [], [], [], [], []
    ns = nt = 0
    for text in TRICKY:
        s, t, g = align_conversation(_conv(text), s_ct, t_ct)
        groups.append(g)
        s_comp.append(s.input_ids[s.num_prompt_tokens:])
        t_comp.append(t.input_ids[t.num_prompt_tokens:])
        s_offs.append(ns + s.num_prompt_tokens - 1)
        t_offs.append(nt)
        ns += len(s.input_ids)
        nt += len(t_comp[-1])
    batch = build_cross_tokenizer_batch(groups, s_comp, t_comp, vm, s_offs, t_offs)
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(ns, 512, generator=gen, requires_grad=True)
    tfull = torch.randn(nt, 512, generator=gen) * 2
    tfull[:, len(spm):] = float("-inf")
    tz, ti = tfull.topk(16, -1)
    lse = torch.logsumexp(tfull, -1)
    t_tgt = torch.log_softmax(tfull, -1)[torch.arange(nt), torch.tensor(sum(t_comp, []))]
    for conv in ("renormalized", "exact_tail"):
        out = cross_tokenizer_kd_loss(student, tz, ti, batch, vm, KDSettings(topk_convention=conv, loss_type="jsd"),
                                      teacher_lse=lse, teacher_target_logprobs=t_tgt)
        assert out.per_token.shape == (ns,) and torch.isfinite(out.per_token).all()
        assert int(out.aligned_mask.sum()) == batch.num_aligned_student_tokens
        out.per_token.sum().backward()
        assert torch.isfinite(student.grad).all()
        student.grad = None
        m = {k: float(v) for k, v in out.metrics.items()}
        assert 0 < m["fraction_mapped_one_to_one"] <= m["fraction_one_to_one"] <= m["fraction_aligned"] <= 1
        assert 0 < m["topk_mapped_mass"] <= 1 and m["kl_aligned"] > 0
    # content messages only: the helper used by align_conversation
    assert split_prompt_completion(_conv("x"))[1][0]["content"] == "x"


def test_chain_group_row_paths_agree():
    """The chain part's two student paths (row subset copy / one pass over all rows) agree."""
    from nemo_kd.align.vocab_map import VocabMap
    vm = VocabMap(np.array([0, 1, 2, -1, 3, 3]), 5, 6, 5, 6)
    arr = np.array([[0, 1, 0, 1, 0, 1], [1, 2, 1, 2, 1, 2], [2, 3, 2, 3, 2, 3], [3, 4, 3, 6, 3, 6]])
    s_ids, t_ids = [1, 3, 2, 0], [1, 4, 3, 0, 2, 5]
    g = torch.Generator().manual_seed(3)
    student = torch.randn(7, 5, generator=g)
    tfull = torch.randn(6, 6, generator=g) * 1.5
    tz, ti = tfull.topk(4, dim=-1)
    t_tgt = torch.log_softmax(tfull, -1)[torch.arange(6), torch.tensor(t_ids)]
    res = []
    for rows, off in ((slice(0, 7), 1), (slice(1, 5), 0)):  # 2 chain rows of 7 (subset) / of 4 (all rows)
        st = student[rows].clone().requires_grad_(True)
        batch = build_cross_tokenizer_batch([AlignmentGroups(arr, 4, 6, 6)], [s_ids], [t_ids], vm, [off], [0])
        out = cross_tokenizer_kd_loss(st, tz, ti, batch, vm, KDSettings(), teacher_lse=torch.logsumexp(tfull, -1),
                                      teacher_target_logprobs=t_tgt)
        out.per_token.sum().backward()
        res.append((out.per_token[off:off + 4].detach(), st.grad[off:off + 4]))
    torch.testing.assert_close(res[0][0], res[1][0])
    torch.testing.assert_close(res[0][1], res[1][1])


def test_boundary_map_carries_the_first_token_across_templates(toks):
    """SentencePiece student (Llama-2 template: the answer's first piece carries the space, ``▁The``)
    vs byte-level ChatML teacher (the answer starts bare, ``The``): the first group is one-to-one over
    the content, carried by the "student adds a space" boundary map; the loss at that row equals the
    plain top-k loss against the teacher's candidates with a space put in front (a hand-built map)."""
    from nemo_kd.align.vocab_map import BOUNDARY_PREFIXES

    bpe, spm = toks
    s_ct, t_ct = ConversationTokenizer(spm, max_seq_length=4096), ConversationTokenizer(bpe, max_seq_length=4096)
    s, t, g = align_conversation(_conv("The answer is the number"), s_ct, t_ct)
    s_comp, t_comp = s.input_ids[s.num_prompt_tokens:], t.input_ids[t.num_prompt_tokens:]
    s_bytes, t_bytes = get_token_bytes(spm).table, get_token_bytes(bpe).table
    assert s_bytes[s_comp[0]] == b" " + t_bytes[t_comp[0]]  # the premise: ▁The vs The
    vm = build_vocab_map(spm, bpe)
    assert BOUNDARY_PREFIXES[0] == b" " and vm.boundary_maps.shape == (2, len(bpe))
    batch = build_cross_tokenizer_batch([g], [s_comp], [t_comp], vm, [0], [0])
    first = (batch.o2o_student_rows == 0).nonzero()
    assert len(first) == 1 and int(batch.o2o_table[first[0, 0]]) == 1  # table 1: "student adds b' '"
    assert int(batch.o2o_teacher_rows[first[0, 0]]) == 0

    # the teacher's top-k at its first row, mapped by hand: candidate x -> student id of b" " + x
    s_by_bytes = {}
    for i, b in enumerate(s_bytes):
        if i < len(spm) and not get_token_bytes(spm).special[i]:
            s_by_bytes.setdefault(b, i)
    gen = torch.Generator().manual_seed(0)
    v_s, v_t = len(spm), len(bpe)
    student = torch.randn(len(s_comp), v_s, generator=gen)
    tfull = torch.randn(len(t_comp), v_t, generator=gen) * 2
    # a teacher that, at the first position, prefers words the student also has with a leading space
    spaced = [i for i in range(v_t) if not get_token_bytes(bpe).special[i] and b" " + t_bytes[i] in s_by_bytes]
    tfull[0, spaced[:9]] += 6.0
    tz, ti = tfull.topk(12, -1)
    lse = torch.logsumexp(tfull, -1)
    t_tgt = torch.log_softmax(tfull, -1)[torch.arange(len(t_comp)), torch.tensor(t_comp)]
    out = cross_tokenizer_kd_loss(student, tz, ti, batch, vm, KDSettings(topk_convention="exact_tail"),
                                  teacher_lse=lse, teacher_target_logprobs=t_tgt)
    hand_ids = torch.tensor([s_by_bytes.get(b" " + t_bytes[int(i)], -1) for i in ti[0]])
    keep = hand_ids >= 0
    assert keep.sum() >= 6  # most first-token candidates exist with a leading space
    z = torch.where(keep, tz[0], torch.full_like(tz[0], float("-inf")))[None]
    ids = torch.where(keep, hand_ids, torch.zeros_like(hand_ids))[None]
    ref = topk_kd_loss(student[:1].double(), z.double(), ids, KDSettings(topk_convention="exact_tail"),
                       teacher_lse=lse[:1].double())
    torch.testing.assert_close(out.per_token[0].double(), ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.mapped_topk_ids[0][keep], hand_ids[keep])


def test_end_of_completion_group():
    """Tokens after fully aligned content (each side's end of turn) become one group: a chain group when
    they do not map (▁ </s> vs <|im_end|>); none when the content was truncated."""
    from nemo_kd.align.vocab_map import VocabMap

    vm = VocabMap(np.array([0, 1, 2, -1, -1]), 6, 5, 6, 5)  # teacher 3 (end of turn) maps to nothing
    # content: 2 one-to-one groups over 4 bytes; then the student has 2 more tokens, the teacher 1
    arr = np.array([[0, 1, 0, 1, 0, 2], [1, 2, 1, 2, 2, 4]])
    full = AlignmentGroups(arr, 4, 3, 4)
    batch = build_cross_tokenizer_batch([full], [[0, 1, 4, 5]], [[0, 1, 3]], vm, [10], [20])
    assert batch.o2o_student_rows.tolist() == [10, 11] and batch.num_chain_groups == 1
    assert batch.chain_student_rows.tolist() == [12, 13] and batch.chain_teacher_rows.tolist() == [22]
    assert batch.num_aligned_student_tokens == full.num_aligned_student_tokens + 2
    truncated = AlignmentGroups(arr, 4, 3, 6)  # 2 content bytes were never aligned: no end group
    assert build_cross_tokenizer_batch([truncated], [[0, 1, 4, 5]], [[0, 1, 3]], vm, [10], [20]).num_chain_groups == 0
