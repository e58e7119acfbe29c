"""Turn a conversation into model tokens with a completion-only loss mask.

A sample is a list of chat messages (``{"role", "content"}``); its *completion* is
the trailing assistant turn(s) after the last non-assistant message, everything
before is the prompt. Rendering goes through the tokenizer's own chat template
(Hugging Face Jinja ``chat_template``) or, for tokenizers without one, a plain
completion format (prompt text, then the response and EOS).

Prompt and completion are rendered as text first and tokenised separately, then
concatenated. That keeps an exact token boundary at the start of the completion
(the loss mask never straddles a token that is half prompt, half answer) and gives
every token a character span in the rendered text, which cross-tokenizer alignment
uses to pair student and teacher tokens. Samples over ``max_seq_length`` are
truncated (completion cut at the end) or dropped, by config, and always counted.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from nemo_kd.data.records import completion_start


class TokenizationError(ValueError):
    """A sample that cannot be rendered/tokenised; the message names the sample."""


@dataclass
class TokenizedSample:
    input_ids: List[int]
    loss_mask: List[int]  # 1 on completion tokens (the tokens to be predicted), 0 on the prompt
    num_prompt_tokens: int
    text: str  # prompt_text + completion_text as rendered
    completion_char_start: int  # == len(prompt_text)
    token_char_spans: List[Tuple[int, int]]  # [start, end) of each token in ``text``
    truncated: bool = False

    @property
    def num_completion_tokens(self) -> int:
        return sum(self.loss_mask)


@dataclass
class TokenizationStats:
    samples: int = 0
    truncated: int = 0
    dropped: int = 0
    dropped_indices: List[int] = field(default_factory=list)
    dropped_reasons: List[str] = field(default_factory=list)  # one per dropped index, said to the user


def split_prompt_completion(messages: Sequence[Dict[str, str]]) -> Tuple[list, list]:
    """Prompt messages and the trailing assistant messages (the completion)."""
    n = len(messages)
    start = completion_start(messages)
    if start == n:
        raise TokenizationError("the conversation does not end with an assistant turn")
    if start == 0:
        raise TokenizationError("the conversation has no prompt before the assistant turn")
    return list(messages[:start]), list(messages[start:])


def tokenizer_hash(tokenizer) -> str:
    """A stable fingerprint of what the tokenizer maps text to (vocab, merges, template, specials)."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # fast tokenizer: the serialised model covers vocab, merges, normaliser
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update((getattr(tokenizer, "chat_template", None) or "").encode())
    h.update(json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str).encode())
    return h.hexdigest()


class ConversationTokenizer:
    """Render + tokenise conversations for one model (student or teacher).

    Args:
        tokenizer: a Hugging Face fast tokenizer (``PreTrainedTokenizerFast``); NeMo's
            ``AutoTokenizer`` wrapper is accepted via its ``.tokenizer`` attribute.
        prompt_format: ``"chat"`` (the tokenizer's own chat template, required to exist)
            or ``"plain"`` (prompt messages' contents joined by newlines, then the
            response followed by EOS).
        max_seq_length: maximum tokens per sample (prompt + completion).
        overlong: ``"truncate"`` (cut the completion's end) or ``"drop"``.
    """

    def __init__(self, tokenizer, prompt_format: str = "chat", max_seq_length: int = 2048, overlong: str = "truncate"):
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        if not getattr(tokenizer, "is_fast", False):
            raise TokenizationError(
                "a fast (Rust) tokenizer is required: character offsets are needed for masks and alignment"
            )
        if prompt_format not in ("chat", "plain"):
            raise ValueError(f"prompt_format must be 'chat' or 'plain', got {prompt_format!r}")
        if prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
            raise TokenizationError("prompt_format='chat' but the tokenizer has no chat_template; use 'plain'")
        if overlong not in ("truncate", "drop"):
            raise ValueError(f"overlong must be 'truncate' or 'drop', got {overlong!r}")
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format
        self.max_seq_length = int(max_seq_length)
        self.overlong = overlong
        self.stats = TokenizationStats()

    @property
    def hash(self) -> str:
        return tokenizer_hash(self.tokenizer) + f":{self.prompt_format}"

    def render(self, messages: Sequence[Dict[str, str]]) -> Tuple[str, str]:
        """``(prompt_text, completion_text)`` exactly as this model should see them."""
        prompt_msgs, completion_msgs = split_prompt_completion(messages)
        prompt = self.render_prompt(prompt_msgs)
        if self.prompt_format == "plain":
            completion = "".join(m["content"] for m in completion_msgs) + (self.tokenizer.eos_token or "")
            return prompt, completion
        full = self.tokenizer.apply_chat_template(list(prompt_msgs) + completion_msgs, tokenize=False)
        if not full.startswith(prompt):
            raise TokenizationError(
                "the chat template does not render the prompt as a prefix of the full conversation "
                "(add_generation_prompt output differs); cannot locate the completion"
            )
        return prompt, full[len(prompt):]

    def render_prompt(self, prompt_messages: Sequence[Dict[str, str]]) -> str:
        """The text a model reads before it answers (the generation prompt included): what
        :meth:`render` puts before the completion, and what sampling starts from."""
        if self.prompt_format == "plain":
            return "\n".join(m["content"] for m in prompt_messages) + "\n"
        return self.tokenizer.apply_chat_template(list(prompt_messages), tokenize=False, add_generation_prompt=True)

    def _encode(self, text: str, char_offset: int) -> Tuple[List[int], List[Tuple[int, int]]]:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        spans = [(s + char_offset, e + char_offset) for s, e in enc["offset_mapping"]]
        return list(enc["input_ids"]), spans

    def __call__(self, messages: Sequence[Dict[str, str]], sample_name: str = "sample") -> Optional[TokenizedSample]:
        """Tokenise one conversation; ``None`` if it was dropped as over-long."""
        try:
            prompt, completion = self.render(messages)
        except TokenizationError as e:
            raise TokenizationError(f"{sample_name}: {e}") from None
        p_ids, p_spans = self._encode(prompt, 0)
        c_ids, c_spans = self._encode(completion, len(prompt))
        if not c_ids:
            raise TokenizationError(f"{sample_name}: the completion renders to no tokens")
        self.stats.samples += 1
        truncated = False
        if len(p_ids) + len(c_ids) > self.max_seq_length:
            keep = self.max_seq_length - len(p_ids)
            if self.overlong == "drop" or keep < 1:
                self.stats.dropped += 1
                self.stats.dropped_indices.append(self.stats.samples - 1)
                self.stats.dropped_reasons.append(
                    f"the prompt alone is {len(p_ids)} tokens, max_seq_length={self.max_seq_length}" if keep < 1 else
                    f"{len(p_ids) + len(c_ids)} tokens > max_seq_length={self.max_seq_length} (overlong=drop)")
                return None
            c_ids, c_spans = c_ids[:keep], c_spans[:keep]
            truncated = True
            self.stats.truncated += 1
        return TokenizedSample(
            input_ids=p_ids + c_ids,
            loss_mask=[0] * len(p_ids) + [1] * len(c_ids),
            num_prompt_tokens=len(p_ids),
            text=prompt + completion,
            completion_char_start=len(prompt),
            token_char_spans=p_spans + c_spans,
            truncated=truncated,
        )
