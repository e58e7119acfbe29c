"""Cross-tokenizer distillation: byte spans, token-group alignment, vocabulary map, loss.

* :mod:`nemo_kd.align.spans` – UTF-8 byte spans of tokens for byte-level BPE and
  SentencePiece tokenizers (split characters, ``▁``, ``<0xXX>``, special tokens);
* :mod:`nemo_kd.align.groups` – student/teacher completion tokens grouped by shared
  content bytes (:class:`AlignmentGroups`, compact int32 arrays for the store);
* :mod:`nemo_kd.align.vocab_map` – teacher → student ids by exact normalised bytes,
  identity for the same tokenizer with different padded vocabularies;
* :mod:`nemo_kd.align.loss` – the KD loss over aligned groups.
"""

from nemo_kd.align.groups import (
    ALIGNMENT_ALGORITHM,
    ALIGNMENT_VERSION,
    alignment_version_notice,
    AlignmentGroups,
    align_conversation,
    align_rendered,
    align_samples,
    align_token_spans,
    completion_byte_spans,
    completion_contents,
    content_coordinates,
)
from nemo_kd.align.loss import (
    CrossTokenizerBatch,
    CrossTokenizerKDOutput,
    CrossTokenizerTeacher,
    build_cross_tokenizer_batch,
    cross_tokenizer_kd_loss,
    teacher_target_logprobs_from_logits,
)
from nemo_kd.align.spans import AlignmentError, TokenBytes, get_token_bytes, token_byte_spans, tokenizer_style
from nemo_kd.align.vocab_map import VocabMap, build_vocab_map

__all__ = [
    "ALIGNMENT_ALGORITHM",
    "ALIGNMENT_VERSION",
    "alignment_version_notice",
    "AlignmentError",
    "AlignmentGroups",
    "CrossTokenizerBatch",
    "CrossTokenizerKDOutput",
    "CrossTokenizerTeacher",
    "TokenBytes",
    "VocabMap",
    "align_conversation",
    "align_rendered",
    "align_samples",
    "align_token_spans",
    "build_cross_tokenizer_batch",
    "build_vocab_map",
    "completion_byte_spans",
    "completion_contents",
    "content_coordinates",
    "cross_tokenizer_kd_loss",
    "get_token_bytes",
    "teacher_target_logprobs_from_logits",
    "token_byte_spans",
    "tokenizer_style",
]
