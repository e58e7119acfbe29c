"""Response filters (DASD "Response Filtering"): each rule triggered and not triggered."""

import random
import re

import pytest

from nemo_kd.generation.filters import (
    DEFAULT_FORBID_PATTERNS,
    REASONING_REQUIRE_PATTERNS,
    FilterReport,
    FilterVerdict,
    ResponseFilterConfig,
    filter_response,
    filter_responses,
    has_consecutive_repeat,
    repeated_ngram_fraction,
)

REASONING = (
    "<think>\nWe need 17 * 23. 17 * 20 = 340 and 17 * 3 = 51, so the product is 391. "
    "Check: 391 / 17 = 23. Good.\n</think>\n"
    "17 * 23 = 340 + 51 = 391, so the answer is 391."
)


def verdict(text, **kw):
    cfg = kw.pop("cfg", ResponseFilterConfig())
    return filter_response(text, cfg=cfg, **kw)


def test_defaults_keep_a_normal_reasoning_response():
    assert verdict(REASONING) == FilterVerdict(True, None)
    assert verdict(REASONING, cfg=ResponseFilterConfig(require_patterns=REASONING_REQUIRE_PATTERNS)).keep


@pytest.mark.parametrize("text", ["", "   ", "\n\t \n"])
def test_empty(text):
    assert verdict(text) == FilterVerdict(False, "empty")


def test_min_chars_counts_stripped_characters():
    cfg = ResponseFilterConfig(min_chars=5)
    assert verdict("  abcd  ", cfg=cfg) == FilterVerdict(False, "too_short")
    assert verdict("  abcde  ", cfg=cfg).keep


def test_unfinished():
    assert verdict(REASONING, finished=False) == FilterVerdict(False, "unfinished")
    assert verdict(REASONING, finished=False, cfg=ResponseFilterConfig(require_finished=False)).keep


def test_too_long_in_student_tokens():
    cfg = ResponseFilterConfig(max_tokens=100)
    assert verdict(REASONING, num_tokens=101, cfg=cfg) == FilterVerdict(False, "too_long")
    assert verdict(REASONING, num_tokens=100, cfg=cfg).keep  # the limit itself is allowed
    with pytest.raises(ValueError, match="num_tokens"):
        verdict(REASONING, cfg=cfg)  # silently skipping the rule would let long samples through
    # no limit configured: the length is not needed
    assert verdict(REASONING, num_tokens=10**6).keep


def test_a_truncated_response_is_reported_as_unfinished_not_too_long():
    cfg = ResponseFilterConfig(max_tokens=100)
    assert verdict(REASONING, num_tokens=500, finished=False, cfg=cfg).reason == "unfinished"


@pytest.mark.parametrize(
    "marker, pattern",
    [
        ('<tool_call>\n{"name": "search"}\n</tool_call>', r"<tool_call>"),
        ('{"role": "assistant", "tool_calls": [{"id": 1}]}', r'"tool_calls"\s*:'),
        ('<|python_tag|>brave_search.call(query="x")', r"<\|python_tag\|>"),
        ('to=functions.get_weather<|message|>{"city": "Paris"}<|call|>', r"<\|call\|>"),
        ('[TOOL_CALLS] [{"name": "f"}]', r"\[TOOL_CALLS\]"),
        ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function", r"<｜tool▁calls?▁begin｜>"),
    ],
)
def test_default_forbidden_tool_call_markers(marker, pattern):
    assert pattern in DEFAULT_FORBID_PATTERNS
    assert verdict(REASONING + "\n" + marker) == FilterVerdict(False, f"forbidden:{pattern}")


def test_talking_about_tools_is_not_a_tool_call():
    text = 'Use a tool call here; the API returns a field named "tool_calls" and a python tag.'
    assert verdict(text).keep


def test_forbid_patterns_can_be_switched_off_or_replaced():
    text = REASONING + "<tool_call>"
    assert verdict(text, cfg=ResponseFilterConfig(forbid_patterns=[])).keep
    cfg = ResponseFilterConfig(forbid_patterns=[r"(?i)as an ai"])
    assert verdict("As an AI, I cannot.", cfg=cfg) == FilterVerdict(False, "forbidden:(?i)as an ai")
    assert verdict(text, cfg=cfg).keep


def test_require_patterns_thinking_and_answer():
    cfg = ResponseFilterConfig(require_patterns=REASONING_REQUIRE_PATTERNS)
    reason = f"missing:{REASONING_REQUIRE_PATTERNS[0]}"
    assert verdict("The answer is 391.", cfg=cfg) == FilterVerdict(False, reason)  # no thinking
    assert verdict("<think>17 * 23 = 391</think>\n  ", cfg=cfg) == FilterVerdict(False, reason)  # no answer
    assert verdict("<think>\n</think> 391", cfg=cfg) == FilterVerdict(False, reason)  # empty thinking
    assert verdict("<think>\n17*23\n= 391\n</think>\n391", cfg=cfg).keep  # (?s): thinking spans lines


def test_require_patterns_all_must_match_first_missing_is_reported():
    cfg = ResponseFilterConfig(require_patterns=[r"</think>", r"\\boxed\{"])
    assert verdict("<think>x</think> \\boxed{3}", cfg=cfg).keep
    assert verdict("<think>x</think> 3", cfg=cfg).reason == r"missing:\\boxed\{"
    assert verdict("3", cfg=cfg).reason == "missing:</think>"


# ----------------------------------------------------------------------------- repetition

NO_NGRAM = dict(max_repeated_ngram_fraction=None)
NO_SUBSTRING = dict(max_consecutive_repeats=None)


def test_repeated_substring_threshold():
    unit = "Wait, let me check that again. "  # 31 characters >= min_repeat_chars (20)
    cfg = ResponseFilterConfig(**NO_NGRAM)  # max_consecutive_repeats = 10: 11 in a row drop
    head, tail = "So x = 4. ", "Therefore x = 4."
    assert verdict(head + unit * 11 + tail, cfg=cfg) == FilterVerdict(False, "repeated_substring")
    assert verdict(head + unit * 10 + tail, cfg=cfg).keep
    assert verdict(head + unit * 11 + tail, cfg=ResponseFilterConfig(max_consecutive_repeats=11, **NO_NGRAM)).keep


def test_repeated_substring_needs_min_repeat_chars():
    cfg = ResponseFilterConfig(**NO_NGRAM)
    # A 1- or 2-character unit is shorter than min_repeat_chars (20), but periodic text
    # repeats its 20-character multiples too: 11 * 20 = 220 characters are needed.
    assert verdict("-" * 219, cfg=cfg).keep  # a ruler
    assert verdict("-" * 220, cfg=cfg).reason == "repeated_substring"
    assert verdict("ab" * 110, cfg=cfg).reason == "repeated_substring"
    assert verdict("ab" * 109 + "a", cfg=cfg).keep
    # A unit longer than max_repeat_chars is left to the n-gram rule.
    para = "".join(chr(0x4E00 + i) for i in range(50))  # 50 distinct CJK characters: period 50 only
    assert verdict(para * 11, cfg=ResponseFilterConfig(max_repeat_chars=49, **NO_NGRAM)).keep
    assert verdict(para * 11, cfg=ResponseFilterConfig(max_repeat_chars=50, **NO_NGRAM)).reason == "repeated_substring"


def test_cjk_loop_is_caught_by_substring_rule_but_not_by_word_ngrams():
    loop = "我再检查一下这个答案是否正确。" * 30  # no spaces: a single "word"
    assert repeated_ngram_fraction(loop, 10) == 0.0
    assert verdict(loop) == FilterVerdict(False, "repeated_substring")
    assert verdict(loop, cfg=ResponseFilterConfig(**NO_SUBSTRING)).keep


def test_has_consecutive_repeat_equals_the_backreference_regex():
    rng = random.Random(0)
    for trial in range(400):
        m = rng.randint(1, 4)
        big = rng.randint(m, 8)
        k = rng.randint(1, 4)
        # small alphabet and planted repeats so both answers occur often
        s = "".join(rng.choice("ab") for _ in range(rng.randint(0, 30)))
        if trial % 2:
            pos = rng.randint(0, len(s))
            unit = "".join(rng.choice("abc") for _ in range(rng.randint(1, 8)))
            s = s[:pos] + unit * rng.randint(1, 5) + s[pos:]
        expected = re.search(rf"(?s)(.{{{m},{big}}}?)\1{{{k}}}", s) is not None
        assert has_consecutive_repeat(s, m, big, k) == expected, (s, m, big, k)


def test_repeated_ngram_fraction_hand_computed():
    # words a b c a b c, n = 3: (a,b,c) (b,c,a) (c,a,b) (a,b,c) -> 4 n-grams, 3 distinct
    assert repeated_ngram_fraction("a b c a b c", 3) == pytest.approx(1 - 3 / 4)
    assert repeated_ngram_fraction("a b", 3) == 0.0  # no n-gram at all
    assert repeated_ngram_fraction("a  b\nc", 1) == 0.0  # any whitespace separates words


def test_repetitive_ngrams_threshold_is_strict():
    text = "a b c a b c"  # fraction 0.25
    cfg = dict(ngram_size=3, **NO_SUBSTRING)
    assert verdict(text, cfg=ResponseFilterConfig(max_repeated_ngram_fraction=0.2, **cfg)) == FilterVerdict(
        False, "repetitive_ngrams"
    )
    assert verdict(text, cfg=ResponseFilterConfig(max_repeated_ngram_fraction=0.25, **cfg)).keep


def test_word_loop_with_varying_numbers_is_caught_by_ngrams():
    # Not one exact substring (the counter changes), so only the n-gram rule sees it.
    sentence = (
        "Wait, let me recompute the sum of the first n terms of the sequence once more, carefully adding "
        "each term to the running total and comparing it with the formula, attempt {}."
    )  # 31 fixed words + a counter: 22 of its 32 10-grams recur in every sentence
    loop = " ".join(sentence.format(i) for i in range(40))
    assert verdict(loop, cfg=ResponseFilterConfig(**NO_NGRAM)).keep
    assert repeated_ngram_fraction(loop, 10) > 0.5
    assert verdict(loop) == FilterVerdict(False, "repetitive_ngrams")


def test_answer_restating_the_thinking_survives_the_default_ngram_threshold():
    thinking = " ".join(f"Step {i}: multiply {i} by {i + 1} to get {i * (i + 1)}." for i in range(30))
    text = f"<think>{thinking}</think>\n{thinking}"  # the answer copies the thinking verbatim
    assert 0.4 < repeated_ngram_fraction(text, 10) <= 0.5
    assert verdict(text).keep


# ----------------------------------------------------------------------------- config errors


def test_invalid_regex_names_the_option():
    with pytest.raises(ValueError, match=r"require_patterns\[1\]: invalid regular expression '\(unclosed'"):
        ResponseFilterConfig(require_patterns=["ok", "(unclosed"])
    with pytest.raises(ValueError, match=r"ResponseFilterConfig.forbid_patterns\[0\]"):
        ResponseFilterConfig(forbid_patterns=["[a-"])


def test_pattern_options_must_be_lists_of_strings():
    with pytest.raises(TypeError, match="require_patterns must be a list"):
        ResponseFilterConfig(require_patterns="<think>")
    with pytest.raises(TypeError, match=r"forbid_patterns\[0\] must be a string"):
        ResponseFilterConfig(forbid_patterns=[3])
    cfg = ResponseFilterConfig(require_patterns=["a"], forbid_patterns=["b"])
    assert cfg.require_patterns == ("a",) and cfg.forbid_patterns == ("b",)  # lists normalised


@pytest.mark.parametrize(
    "kw, option",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(ngram_size=0), "ngram_size"),
        (dict(max_repeated_ngram_fraction=1.5), "max_repeated_ngram_fraction"),
        (dict(max_consecutive_repeats=0), "max_consecutive_repeats"),
        (dict(min_repeat_chars=0), "min_repeat_chars"),
        (dict(min_repeat_chars=30, max_repeat_chars=20), "max_repeat_chars"),
        (dict(min_chars=-1), "min_chars"),
    ],
)
def test_invalid_numbers_name_the_option(kw, option):
    with pytest.raises(ValueError, match=f"ResponseFilterConfig.{option} must be"):
        ResponseFilterConfig(**kw)


# ----------------------------------------------------------------------------- report


def test_filter_responses_keeps_order_and_counts_reasons():
    rows = [
        {"response": REASONING, "finish_reason": "stop", "n": 50},
        {"response": "", "finish_reason": "stop", "n": 0},
        {"response": REASONING, "finish_reason": "length", "n": 400},
        {"response": REASONING + "<tool_call>", "finish_reason": "stop", "n": 60},
        {"response": REASONING, "finish_reason": "stop", "n": 300},
        {"response": REASONING + " Done.", "finish_reason": "stop", "n": 52},
        {"response": "  ", "finish_reason": "stop", "n": 1},
    ]
    kept, report = filter_responses(
        rows,
        ResponseFilterConfig(max_tokens=256),
        get_text=lambda r: r["response"],
        get_num_tokens=lambda r: r["n"],
        get_finished=lambda r: r["finish_reason"] != "length",
    )
    assert kept == [rows[0], rows[5]]
    assert report.kept == 2 and report.num_dropped == 5 and report.total == 7
    assert report.dropped == {"empty": 2, "unfinished": 1, "forbidden:<tool_call>": 1, "too_long": 1}
    lines = report.table().splitlines()
    assert lines[0].split() == ["reason", "count", "share"]
    assert lines[1].split() == ["kept", "2", "28.6%"]
    assert lines[2].split() == ["dropped", "5", "71.4%"]
    assert lines[3].split() == ["empty", "2", "28.6%"]  # most frequent reason first, then by name
    assert [ln.split()[0] for ln in lines[4:7]] == ["forbidden:<tool_call>", "too_long", "unfinished"]
    assert lines[-1].split() == ["total", "7", "100.0%"]
    assert str(report) == report.table()


def test_reports_add_up_and_empty_report_prints():
    a, b = FilterReport(), FilterReport()
    a.add(FilterVerdict(True)), a.add(FilterVerdict(False, "empty"))
    b.add(FilterVerdict(False, "empty")), b.add(FilterVerdict(False, "too_long"))
    c = a + b
    assert c.kept == 1 and c.dropped == {"empty": 2, "too_long": 1}
    assert FilterReport().table().splitlines()[-1].split() == ["total", "0", "-"]


def test_filter_responses_strings_and_type_error():
    kept, report = filter_responses(["ok text", "", "fine too"], ResponseFilterConfig())
    assert kept == ["ok text", "fine too"] and report.dropped == {"empty": 1}
    with pytest.raises(TypeError, match="get_text"):
        filter_responses([{"response": "x"}], ResponseFilterConfig())
