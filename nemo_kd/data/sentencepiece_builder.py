"""Train a small SentencePiece unigram tokenizer on the fly (Llama-2 / Mistral / Gemma style).

The counterpart of :mod:`nemo_kd.data.tokenizer_builder` (byte-level BPE) for the
other big tokenizer family, used by the cross-tokenizer tests and benchmarks:

* the model is trained with the ``sentencepiece`` library (unigram, ``byte_fallback``:
  characters outside the learned pieces become ``<0xXX>`` byte tokens, one per UTF-8
  byte), ``<unk>``/``<s>``/``</s>`` at ids 0/1/2 and the 256 byte pieces at 3..258,
  exactly the Llama-2 layout;
* it is wrapped as a ``transformers.PreTrainedTokenizerFast`` through the
  ``tokenizers`` library (``models.Unigram`` with the trained pieces and scores,
  ``byte_fallback=True``; a ``Metaspace`` pre-tokenizer that turns spaces into the
  ``▁`` word marker and prepends one to the first word, ``prepend_scheme="first"``,
  without splitting, as Llama-2's "non-legacy" fast tokenizer does);
* it carries a Llama-2 ``[INST]`` chat template (the system prompt folded into the
  first user turn, assistant content ``strip()``-ped, ``</s>`` after each answer)
  and is saved as an ordinary tokenizer directory (``tokenizer.json`` +
  ``tokenizer.model``) that ``AutoTokenizer`` loads without remote code.
"""

from __future__ import annotations

import io
import os
from typing import Iterable, Optional

# Llama-2 chat template (as in meta-llama/Llama-2-*-chat-hf, system prompt folded into turn 1).
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)


def train_sentencepiece_unigram(texts: Iterable[str], vocab_size: int = 600, save_dir: Optional[str] = None,
                                character_coverage: float = 0.9995):
    """Train a SentencePiece unigram (byte fallback) on ``texts``; a ``PreTrainedTokenizerFast``.

    ``character_coverage < 1`` leaves rare characters (emoji, most CJK in a small
    corpus) out of the pieces so they exercise the ``<0xXX>`` byte fallback.
    """
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    texts = [t for t in texts if t]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=buf,
        model_type="unigram",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=character_coverage,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        hard_vocab_limit=False,
        train_extremely_large_corpus=False,
        minloglevel=2,
    )
    proto = buf.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=proto)
    vocab = [(sp.id_to_piece(i), float(sp.get_score(i))) for i in range(sp.get_piece_size())]
    tok = Tokenizer(models.Unigram(vocab, unk_id=sp.unk_id(), byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    hf.chat_template = LLAMA2_TEMPLATE
    if save_dir is not None:
        hf.save_pretrained(save_dir)
        with open(os.path.join(save_dir, "tokenizer.model"), "wb") as f:
            f.write(proto)
    return hf
