"""Train small Hugging Face tokenizers on the fly (no hub access on these machines).

Used by the embedded main job and by the tests: a byte-level BPE (GPT-2 / Llama-3 /
Qwen style) wrapped as a ``transformers.PreTrainedTokenizerFast`` with a chat
template, saved as an ordinary tokenizer directory that ``AutoTokenizer`` loads
without ``trust_remote_code``.
"""

from __future__ import annotations

from typing import Iterable, Optional

# ChatML (Qwen-style) template: every turn is <|im_start|>role\ncontent<|im_end|>\n.
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Llama-3-style template: header tokens around the role, <|eot_id|> ends a turn.
LLAMA3_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
LLAMA3_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

TEMPLATES = {
    "chatml": (CHATML_TEMPLATE, CHATML_SPECIAL_TOKENS, "<|im_end|>", "<|endoftext|>"),
    "llama3": (LLAMA3_TEMPLATE, LLAMA3_SPECIAL_TOKENS, "<|eot_id|>", "<|end_of_text|>"),
}


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int = 512, template: str = "chatml",
                         save_dir: Optional[str] = None):
    """Train a byte-level BPE on ``texts`` and return a ``PreTrainedTokenizerFast``.

    ``template`` picks the chat template and its special tokens (``chatml`` or
    ``llama3``). The end-of-turn token is the EOS, so a model learns to stop.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose from {sorted(TEMPLATES)}")
    chat_template, specials, eos, pad = TEMPLATES[template]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad)
    hf.chat_template = chat_template
    if save_dir is not None:
        hf.save_pretrained(save_dir)
    return hf
