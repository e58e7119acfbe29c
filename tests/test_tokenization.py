"""Chat rendering, completion-only masks, truncation, and the tokenizer fingerprint."""

import pytest
from transformers import AutoTokenizer

from nemo_kd.data.tokenization import ConversationTokenizer, TokenizationError, tokenizer_hash
from nemo_kd.data.tokenizer_builder import train_byte_level_bpe

CORPUS = [
    "What is 12 plus 30? The answer is 42.",
    "Reverse the word cat: tac. Unicode: café, naïve, 日本語, emoji 🙂.",
    "def f(x):\n    return x * 2\n",
] * 20


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    train_byte_level_bpe(CORPUS, vocab_size=400, template="chatml", save_dir=str(d))
    return AutoTokenizer.from_pretrained(str(d))  # loads as a plain directory, no remote code


def test_chat_rendering_mask_and_spans(chatml):
    msgs = [{"role": "user", "content": "What is 12 plus 30?"}, {"role": "assistant", "content": " 42 🙂"}]
    ct = ConversationTokenizer(chatml, "chat", max_seq_length=256)
    s = ct(msgs)
    prompt = "<|im_start|>user\nWhat is 12 plus 30?<|im_end|>\n<|im_start|>assistant\n"
    assert s.text == prompt + " 42 🙂<|im_end|>\n"
    assert s.completion_char_start == len(prompt)
    # The masked tokens decode to exactly the completion text; the prompt tokens to the prompt.
    comp_ids = [t for t, m in zip(s.input_ids, s.loss_mask) if m]
    assert chatml.decode(comp_ids) == " 42 🙂<|im_end|>\n"
    assert chatml.decode(s.input_ids[: s.num_prompt_tokens]) == prompt
    assert s.loss_mask == [0] * s.num_prompt_tokens + [1] * (len(s.input_ids) - s.num_prompt_tokens)
    # Token character spans tile the text (offsets of special tokens included).
    assert s.token_char_spans[0][0] == 0 and s.token_char_spans[-1][1] == len(s.text)
    # The whole conversation tokenised by the template itself has the same text.
    assert chatml.apply_chat_template(msgs, tokenize=False) == s.text


def test_truncate_and_drop_are_counted(chatml):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 50}]
    ct = ConversationTokenizer(chatml, "chat", max_seq_length=20, overlong="truncate")
    s = ct(msgs)
    assert len(s.input_ids) == 20 and s.truncated and ct.stats.truncated == 1
    ct2 = ConversationTokenizer(chatml, "chat", max_seq_length=20, overlong="drop")
    assert ct2(msgs) is None and ct2.stats.dropped == 1 and ct2.stats.dropped_indices == [0]


def test_plain_format_appends_eos(chatml):
    ct = ConversationTokenizer(chatml, "plain", max_seq_length=64)
    s = ct([{"role": "user", "content": "Reverse cat"}, {"role": "assistant", "content": "tac"}])
    assert s.text == "Reverse cat\ntac" + chatml.eos_token


def test_bad_conversations_name_the_sample(chatml):
    ct = ConversationTokenizer(chatml, "chat")
    with pytest.raises(TokenizationError, match="data.jsonl:7.*does not end with an assistant"):
        ct([{"role": "user", "content": "x"}], sample_name="data.jsonl:7")
    with pytest.raises(TokenizationError, match="no prompt"):
        ct([{"role": "assistant", "content": "x"}])


def test_tokenizer_hash_changes_with_template(chatml, tmp_path):
    h1 = tokenizer_hash(chatml)
    assert h1 == tokenizer_hash(chatml)
    other = train_byte_level_bpe(CORPUS, vocab_size=400, template="llama3")
    assert tokenizer_hash(other) != h1
