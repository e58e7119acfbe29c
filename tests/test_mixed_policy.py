"""Mixed-policy distillation data (DASD): budgets, cut points, clean prefixes and the teacher's
continuation of a student prefix, with toy models whose next-token distributions are known."""

import math

import pytest
import torch

from nemo_kd.generation.mixed_policy import (
    MixedPolicyConfig,
    clean_prefix,
    continuation_prompt_ids,
    cut_point,
    mixed_policy_samples,
    student_token_budget,
)
from nemo_kd.generation.sampling import SamplingConfig, generate


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from nemo_kd.data.tokenizer_builder import train_byte_level_bpe

    texts = ["a b c d e f g h é ü ß", "abc def ghi", "x y z"] * 20
    return train_byte_level_bpe(texts, vocab_size=300, save_dir=str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def ctok(tok):
    from nemo_kd.data.tokenization import ConversationTokenizer

    return ConversationTokenizer(tok, "chat", 256)


class Favourite(torch.nn.Module):
    """Logits that put (almost) all mass on ``favourite``, or on ``eos`` once the last input
    token is already ``favourite`` when ``stop_after_one``: a deterministic toy policy."""

    def __init__(self, vocab, favourite, eos=None, stop_after_one=False):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.vocab, self.fav, self.eos, self.stop = vocab, favourite, eos, stop_after_one

    def forward(self, tokens, position_ids, mask):
        logits = torch.full((*tokens.shape, self.vocab), -30.0)
        logits[..., self.fav] = 30.0
        if self.stop:
            at_fav = tokens == self.fav
            logits[at_fav] = -30.0
            logits[at_fav, self.eos] = 30.0
        return logits + self.w


class RandomLM(torch.nn.Module):
    """A fixed random bigram model: sampled rollouts exercise the per-row randomness."""

    def __init__(self, vocab, eos):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=g))
        self.table.data[:, eos] -= 4.0  # long rollouts: most hit the budget

    def forward(self, tokens, position_ids, mask):
        return self.table[tokens]


def test_budget_and_cut_point():
    cfg = MixedPolicyConfig(length_ratio=1.5, min_cut_fraction=0.5, seed=3)
    assert student_token_budget(10, cfg) == 15 and student_token_budget(7, cfg) == 11  # ⌈10.5⌉
    cuts = [cut_point(10, cfg, i) for i in range(400)]
    assert min(cuts) == 5 and max(cuts) == 9  # uniform on {⌈0.5·10⌉, …, 10−1}, every value drawn
    assert all(abs(cuts.count(c) / 400 - 0.2) < 0.08 for c in range(5, 10))
    assert cuts == [cut_point(10, cfg, i) for i in range(400)]  # depends on (seed, index) only
    assert cuts != [cut_point(10, MixedPolicyConfig(seed=4), i) for i in range(400)]
    assert cut_point(1, cfg, 0) == 1 and cut_point(2, cfg, 0) == 1 and cut_point(3, cfg, 0) == 2
    with pytest.raises(ValueError, match="min_cut_fraction"):
        MixedPolicyConfig(min_cut_fraction=1.0).validate()


def test_clean_prefix_never_splits_a_character(tok):
    ids = tok("é ü ß", add_special_tokens=False)["input_ids"]
    for cut in range(len(ids) + 1):
        c, text = clean_prefix(tok, ids, cut)
        assert c >= cut and "\ufffd" not in text and "é ü ß".startswith(text)
        assert text == tok.decode(ids[:c])


def test_continuation_prompt_is_teacher_template_plus_prefix(tok, ctok):
    from nemo_kd.data.tokenization import ConversationTokenizer

    msgs = [{"role": "user", "content": "abc"}]
    rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert tok.decode(continuation_prompt_ids(ctok, msgs, "def g")) == rendered + "def g"
    plain = ConversationTokenizer(tok, "plain", 256)  # a base model's plain rendering
    assert tok.decode(continuation_prompt_ids(plain, msgs, "def g")) == "abc\ndef g"


def test_mixed_policy_samples_cut_student_and_continue_with_teacher(tok, ctok):
    vocab, eos = len(tok), tok.eos_token_id
    a = tok("a", add_special_tokens=False)["input_ids"][0]
    z = tok("z", add_special_tokens=False)["input_ids"][0]
    student = Favourite(vocab, a)  # never stops: every rollout runs out of budget
    teacher = Favourite(vocab, z, eos=eos, stop_after_one=True)  # says "z" then stops
    prompts = [[{"role": "user", "content": "abc"}], [{"role": "user", "content": "x y"}]]
    cfg = MixedPolicyConfig(length_ratio=1.5, seed=1)
    samples, counts = mixed_policy_samples(
        student, teacher, ctok, ctok, prompts, teacher_lengths=[4, 6], cfg=cfg,
        student_sampling=SamplingConfig(temperature=0.0), teacher_sampling=SamplingConfig(temperature=0.0,
                                                                                         max_new_tokens=5),
        student_vocab_size=vocab, teacher_vocab_size=vocab, sample_offset=10)
    assert counts == {"finished_within_budget": 0, "truncated": 2, "continued": 2}
    for s, n_teacher in zip(samples, [4, 6]):
        budget = math.ceil(1.5 * n_teacher)
        assert s.student_tokens == budget and s.cut == cut_point(budget, cfg, s.index)
        assert s.prefix == tok.decode([a] * s.cut) and s.continuation == "z" and s.finished
        assert s.response == s.prefix + "z"
    assert [s.index for s in samples] == [10, 11]


def test_rollout_cut_at_budget_equals_rollout_with_that_budget(tok, ctok):
    """One rollout to the largest budget, cut per row, is what per-row budgets would sample."""
    vocab, eos = len(tok), tok.eos_token_id
    lm = RandomLM(vocab, eos)
    prompts = [[{"role": "user", "content": c}] for c in ("abc", "x y", "def", "g h")]
    lengths = [2, 5, 3, 8]
    cfg = MixedPolicyConfig(seed=2)
    sampling = SamplingConfig(temperature=1.0, seed=9)
    samples, counts = mixed_policy_samples(lm, lm, ctok, ctok, prompts, lengths, cfg, sampling,
                                           SamplingConfig(temperature=1.0, seed=9, max_new_tokens=3),
                                           student_vocab_size=vocab, teacher_vocab_size=vocab)
    by_index = {s.index: s for s in samples}
    assert counts["truncated"] + counts["finished_within_budget"] == 4 and counts["truncated"] >= 2
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        budget = student_token_budget(n, cfg)
        direct = generate(lm, [continuation_prompt_ids(ctok, p, "")], SamplingConfig(temperature=1.0, seed=9,
                                                                                    max_new_tokens=budget),
                          eos_id=eos, pad_id=eos, vocab_size=vocab, sample_offset=i)[0]
        if direct.finished:
            assert i not in by_index
        else:
            s = by_index[i]
            assert s.student_tokens == len(direct.token_ids) == budget
            assert s.prefix == clean_prefix(tok, direct.token_ids, cut_point(budget, cfg, i))[1]
