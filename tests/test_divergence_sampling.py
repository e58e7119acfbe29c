"""Divergence-aware sampling (DASD): sentences, token->sentence assignment, p_T vs p_S, selection."""

import math

import pytest
import torch

from nemo_kd.generation.divergence import (
    DivergenceScore,
    SentenceLabel,
    assign_tokens,
    classify_sentences,
    select_candidates,
    sentence_divergence,
    sentence_logprob_means,
    split_sentences,
)

T, S, C, U = (int(SentenceLabel.TEACHER), int(SentenceLabel.STUDENT), int(SentenceLabel.COMMON), int(SentenceLabel.UNSCORED))


def pieces(text, spans):
    return [text[a:b] for a, b in spans]


def spans_of(text, tokens):
    """Character spans of a tokenisation given as strings that concatenate to ``text``."""
    assert "".join(tokens) == text
    out, pos = [], 0
    for t in tokens:
        out.append((pos, pos + len(t)))
        pos += len(t)
    return out


# ----------------------------------------------------------------------------- split_sentences


def test_split_sentences_rules():
    text = (
        "Pi is 3.14, not 3. Really?!  Yes...\n\n"
        "Use e.g. a table (see Fig. 2). "
        '"Quoted." Done\n'
        "1. First step.\n"
        "  2. Second step.\n"
        "The answer is 3. Next"
    )
    assert pieces(text, split_sentences(text)) == [
        "Pi is 3.14, not 3.",  # a decimal point is no boundary; "3. " in mid-line is one
        "Really?!",
        "Yes...",
        "Use e.g. a table (see Fig. 2).",  # abbreviations
        '"Quoted."',  # a closing quote stays with its sentence
        "Done",  # newline ends a sentence without punctuation
        "1. First step.",  # a list number at a line start is no boundary
        "2. Second step.",
        "The answer is 3.",
        "Next",
    ]


def test_split_sentences_cjk_needs_no_space():
    text = "你好。我很好！你呢？好"
    assert pieces(text, split_sentences(text)) == ["你好。", "我很好！", "你呢？", "好"]


@pytest.mark.parametrize("text", ["", " ", "\n\n \t\n"])
def test_split_sentences_whitespace_only(text):
    assert split_sentences(text) == []


def test_split_sentences_spans_are_trimmed_and_cover_every_non_space_character():
    text = "  A b.  C?\n\n D!E. \n 4.5 x\t"
    spans = split_sentences(text)
    assert pieces(text, spans) == ["A b.", "C?", "D!E.", "4.5 x"]
    owner = [None] * len(text)
    for j, (a, b) in enumerate(spans):
        assert not text[a].isspace() and not text[b - 1].isspace()
        for i in range(a, b):
            assert owner[i] is None
            owner[i] = j
    assert all(owner[i] is not None for i, c in enumerate(text) if not c.isspace())


# ----------------------------------------------------------------------------- token -> sentence

TEXT = "The sky is blue. Grass is green. Water is wet."
#       0         1         2         3         4
#       0123456789012345678901234567890123456789012345
SENTENCES = [(0, 16), (17, 32), (33, 46)]


def test_fixture_sentences():
    assert split_sentences(TEXT) == SENTENCES
    assert pieces(TEXT, SENTENCES) == ["The sky is blue.", "Grass is green.", "Water is wet."]


def test_assign_tokens_boundaries_whitespace_and_outside_tokens():
    text = "One.\n\nTwo. Three"
    sents = split_sentences(text)
    assert pieces(text, sents) == ["One.", "Two.", "Three"]
    tokens = [
        (0, 3),  # "One"
        (3, 6),  # ".\n\n" spans the boundary: goes where it starts (sentence 0)
        (6, 9),  # "Two"
        (9, 10),  # "."
        (10, 11),  # " " between sentences: whitespace only, no sentence
        (11, 11),  # zero-width (a special token with empty offsets)
        (10, 13),  # " Th": first non-space character is in sentence 2
        (13, 16),  # "ree"
        (16, 20),  # past the end of the text (e.g. an EOS rendered after it)
        (-5, 0),  # before the text (a prompt token)
        (-2, 2),  # a token straddling the start of the text: its first character in the text is "O"
    ]
    assert assign_tokens(tokens, sents).tolist() == [0, 0, 1, 1, -1, -1, 2, 2, -1, -1, 0]
    # "\n\nTwo": first non-whitespace character "T" -> sentence 1
    assert assign_tokens([(4, 9)], sents).tolist() == [1]
    # a token covering three sentences goes to the first
    assert assign_tokens([(2, 13)], sents).tolist() == [0]


def test_hand_computed_sentence_probabilities_with_different_tokenizers():
    # Teacher: coarse pieces; student: word pieces. Both tile the same text.
    teacher_tokens = ["The sky", " is blue.", " Grass is", " green.", " Water", " is", " wet."]
    student_tokens = ["The", " sky", " is", " blue", ".", " Grass is green", ".", " Water is wet", "."]
    # Sentence 1: teacher  exp((log .64 + log 1)/2)                  = .8
    #             student  (.25 * 1 * .5 * 1 * .25) ** (1/5) = .03125 ** .2 = .5   -> Δ = +.3: TEACHER
    # Sentence 2: teacher  (.25 * 1) ** (1/2)                        = .5
    #             student  (.64 * 1) ** (1/2)                        = .8        -> Δ = -.3: STUDENT
    # Sentence 3: teacher  (.9 * .9 * .9) ** (1/3)                   = .9
    #             student  (.7225 * 1) ** (1/2)                      = .85       -> Δ = +.05: COMMON
    teacher_lp = [math.log(p) for p in [0.64, 1.0, 0.25, 1.0, 0.9, 0.9, 0.9]]
    student_lp = [math.log(p) for p in [0.25, 1.0, 0.5, 1.0, 0.25, 0.64, 1.0, 0.7225, 1.0]]
    t_spans, s_spans = spans_of(TEXT, teacher_tokens), spans_of(TEXT, student_tokens)

    t = sentence_logprob_means(t_spans, teacher_lp, SENTENCES)
    assert t.count.tolist() == [2, 2, 3]
    assert t.mean.exp().tolist() == pytest.approx([0.8, 0.5, 0.9], abs=1e-12)
    s = sentence_logprob_means(s_spans, student_lp, SENTENCES)
    assert s.count.tolist() == [5, 2, 2]
    assert s.mean.exp().tolist() == pytest.approx([0.5, 0.8, 0.85], abs=1e-12)

    d = sentence_divergence(TEXT, t_spans, teacher_lp, s_spans, student_lp, beta=0.1)
    assert d.sentences == SENTENCES
    assert d.labels.tolist() == [T, S, C]
    assert d.teacher_token_counts.tolist() == [2, 2, 3] and d.student_token_counts.tolist() == [5, 2, 2]
    assert sentence_divergence(TEXT, t_spans, teacher_lp, s_spans, student_lp).score == DivergenceScore(1, 1, 1, 0)
    # β = 0.04 turns the third sentence (Δ = .05) into a teacher sentence.
    assert sentence_divergence(TEXT, t_spans, teacher_lp, s_spans, student_lp, beta=0.04).score == DivergenceScore(2, 1, 0, 0)
    # Swapping the roles swaps teacher and student sentences.
    assert sentence_divergence(TEXT, s_spans, student_lp, t_spans, teacher_lp).score == DivergenceScore(1, 1, 1, 0)
    assert sentence_divergence(TEXT, s_spans, student_lp, t_spans, teacher_lp).labels.tolist() == [S, T, C]


def test_same_tokens_same_logprobs_are_all_common():
    spans = spans_of(TEXT, TEXT.split(" ")[:1] + [" " + w for w in TEXT.split(" ")[1:]])
    lp = torch.linspace(-3.0, -0.1, len(spans))
    assert sentence_divergence(TEXT, spans, lp, spans, lp).score == DivergenceScore(0, 0, 3, 0)


def test_tensor_inputs_and_spans_shifted_from_a_full_rendering():
    # Spans over prompt + completion, shifted by -completion_char_start: prompt tokens fall
    # before 0 and are ignored, as is an EOS token after the text.
    prompt = "<user>Describe nature.</user>"
    full = prompt + TEXT + "<eos>"
    # completion tokens "The sky is blue" ". Grass is green" ". Water is wet" "." (boundary
    # tokens go to the sentence where they start: 2, 1, 1 tokens per sentence)
    completion = spans_of(TEXT, ["The sky is blue", ". Grass is green", ". Water is wet", "."])
    tokens = [(0, 6), (6, 29)] + [(a + len(prompt), b + len(prompt)) for a, b in completion]
    tokens.append((len(prompt) + len(TEXT), len(full)))
    assert full[tokens[-1][0] : tokens[-1][1]] == "<eos>"
    shifted = torch.tensor(tokens) - len(prompt)
    lp = torch.full((len(tokens),), math.log(0.5))
    lp[0] = lp[1] = lp[-1] = -50.0  # would drag the means down if they were counted
    res = sentence_logprob_means(shifted, lp, SENTENCES)
    assert res.count.tolist() == [2, 1, 1]
    assert res.mean.exp().tolist() == pytest.approx([0.5, 0.5, 0.5])


def test_sentence_without_tokens_is_nan_and_unscored():
    text = "好。对。"
    sents = split_sentences(text)
    assert pieces(text, sents) == ["好。", "对。"]
    # the teacher's single token "好。对。" starts in sentence 0 and swallows sentence 1
    t = sentence_logprob_means([(0, 4)], [math.log(0.9)], sents)
    assert t.count.tolist() == [1, 0]
    assert t.mean[0].exp().item() == pytest.approx(0.9) and math.isnan(t.mean[1].item())
    d = sentence_divergence(text, [(0, 4)], [math.log(0.9)], [(0, 2), (2, 4)], [math.log(0.5)] * 2)
    assert d.labels.tolist() == [T, U]  # .9 - .5 > .1; no teacher evidence for "对。"
    assert d.score == DivergenceScore(num_teacher=1, num_student=0, num_common=0, num_unscored=1)
    assert d.score.num_sentences == 2


def test_empty_text_and_no_tokens():
    res = sentence_logprob_means([], [], [])
    assert res.mean.shape == (0,) and res.count.shape == (0,)
    assert sentence_divergence("", [], [], [], []).score == DivergenceScore(0, 0, 0, 0)
    assert sentence_divergence("  \n", [(0, 3)], [-1.0], [(0, 1)], [-1.0]).score == DivergenceScore(0, 0, 0, 0)
    # text with sentences but no tokens at all: every sentence unscored
    assert sentence_divergence(TEXT, [], [], [], []).score == DivergenceScore(0, 0, 0, 3)


def test_zero_probability_token():
    # log p = -inf makes the sentence probability 0 (not NaN): a student sentence if the student is sure.
    d = sentence_divergence("A b.", [(0, 1), (1, 4)], [float("-inf"), 0.0], [(0, 4)], [math.log(0.9)])
    assert d.p_teacher.tolist() == [0.0]
    assert d.labels.tolist() == [S]


# ----------------------------------------------------------------------------- classification


def test_classify_strict_threshold_with_exact_binary_numbers():
    # .75 - .5 = .25 exactly in binary floating point: Δ = β is common, not teacher.
    assert classify_sentences([0.75, 0.5], [0.5, 0.75], beta=0.25).tolist() == [C, C]
    assert classify_sentences([0.75, 0.5], [0.5, 0.75], beta=0.125).tolist() == [T, S]
    assert classify_sentences([0.75, 0.5], [0.5, 0.75], beta=0.0).tolist() == [T, S]
    assert classify_sentences([0.5], [0.5], beta=0.0).tolist() == [C]
    assert classify_sentences([0.8, 0.5, float("nan")], [0.5, float("nan"), 0.3]).tolist() == [T, U, U]
    assert classify_sentences([], []).tolist() == []


def test_classify_errors():
    with pytest.raises(ValueError, match="beta"):
        classify_sentences([0.5], [0.5], beta=1.0)
    with pytest.raises(ValueError, match="beta"):
        classify_sentences([0.5], [0.5], beta=-0.1)
    with pytest.raises(ValueError, match="sentences"):
        classify_sentences([0.5, 0.5], [0.5])


def test_input_validation():
    with pytest.raises(ValueError, match="2 token spans but 1 token log-probs"):
        sentence_logprob_means([(0, 1), (1, 2)], [-1.0], [(0, 2)])
    with pytest.raises(ValueError, match="NaN"):
        sentence_logprob_means([(0, 1)], [float("nan")], [(0, 2)])
    with pytest.raises(ValueError, match="end < start"):
        sentence_logprob_means([(3, 1)], [-1.0], [(0, 2)])
    with pytest.raises(ValueError, match="sorted and non-overlapping"):
        sentence_logprob_means([(0, 1)], [-1.0], [(5, 8), (0, 4)])
    with pytest.raises(ValueError, match="non-empty"):
        sentence_logprob_means([(0, 1)], [-1.0], [(0, 0), (0, 4)])


# ----------------------------------------------------------------------------- selection


def test_select_most_teacher_sentences_absolute_count():
    # 5 teacher sentences out of 50 beats 4 out of 4: the count, not the rate, decides.
    scores = [DivergenceScore(4, 0, 0), DivergenceScore(5, 10, 35)]
    assert select_candidates(scores) == 1


def test_select_ties_fewer_student_sentences_then_first():
    scores = [
        DivergenceScore(3, 2, 1),
        DivergenceScore(3, 1, 9),
        DivergenceScore(2, 0, 0),
        DivergenceScore(3, 1, 0),  # same teacher and student counts as 1: the first wins
    ]
    assert select_candidates(scores) == 1
    assert select_candidates([DivergenceScore(0, 0, 4), DivergenceScore(0, 0, 2)]) == 0


def test_select_skips_ineligible_candidates_and_keeps_indices():
    assert select_candidates([None, DivergenceScore(1, 0, 0), None, DivergenceScore(2, 0, 0)]) == 3
    assert select_candidates([None, None]) is None
    assert select_candidates([]) is None


def test_score_to_dict_round_trip():
    s = DivergenceScore(3, 1, 7, 2)
    assert s.to_dict() == {"num_teacher": 3, "num_student": 1, "num_common": 7, "num_unscored": 2}
    assert DivergenceScore(**s.to_dict()) == s and s.num_sentences == 13
    assert DivergenceScore.from_labels(torch.tensor([T, T, S, C, U, C], dtype=torch.int8)) == DivergenceScore(2, 1, 2, 1)
