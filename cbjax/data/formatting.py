"""Chat formatting and tokenization of (prompt, completion) pairs, split where truncation may cut.

A conversation is rendered with the tokenizer's own chat template (a user turn, then an assistant
turn), or with plain-text tags when the tokenizer has none. The rendered text falls into five
segments: prefix (system prompt and user tag), user text, middle (end of the user turn and the
assistant tag), completion and suffix (end of the assistant turn). Only user text and the response
(completion plus suffix) are ever truncated, so the template around them stays intact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jinja2

from cbjax.data.config import PlainTextTags
from cbjax.data.sources import Example

# Stand-ins for the message contents while the template is rendered. Their positions in the
# output show where the template puts the contents, whatever the real text is.
_USER_SENTINEL = "\x00cbjax-user-content\x00"
_ASSISTANT_SENTINEL = "\x00cbjax-assistant-content\x00"

_PREFIX, _USER, _MIDDLE, _RESPONSE = range(4)


@dataclasses.dataclass(frozen=True)
class ConversationTemplate:
    """Text that surrounds the user and assistant contents of one exchange."""

    prefix: str
    middle: str
    suffix: str
    # Plain-text rows let the tokenizer add its own special tokens (a BOS, for example). A chat
    # template writes them into its text, so nothing is added to what it renders.
    add_special_tokens: bool


@dataclasses.dataclass(frozen=True)
class Conversation:
    """Token ids of one exchange, by segment."""

    prefix: tuple[int, ...]
    user: tuple[int, ...]
    middle: tuple[int, ...]
    # The completion followed by the template's end of the assistant turn.
    response: tuple[int, ...]

    def request(self, budget: int) -> tuple[list[int], bool]:
        """Return the request within `budget` tokens and whether user text was cut.

        User text is dropped from its front, because the instruction is usually at its end.
        Raises ValueError when the template alone does not leave room for one token of user text.
        """
        template_length = len(self.prefix) + len(self.middle)
        if template_length >= budget:
            raise ValueError(
                f"request budget of {budget} tokens is too small: the chat template alone takes "
                f"{template_length} tokens; raise request_length (and retain_length) above that"
            )
        user = self.user[max(0, len(self.user) - (budget - template_length)) :]
        return [*self.prefix, *user, *self.middle], len(user) < len(self.user)

    def truncated_response(self, budget: int) -> tuple[list[int], bool]:
        """Return the response cut at its end to `budget` tokens, and whether it was cut."""
        return list(self.response[:budget]), len(self.response) > budget


def conversation_template(tokenizer, tags: PlainTextTags) -> ConversationTemplate:
    """Find the text around the message contents in the tokenizer's chat template.

    Falls back to `tags` when the tokenizer has no chat template. Raises ValueError when the
    template does not place each content exactly once, user before assistant.
    """
    if not getattr(tokenizer, "chat_template", None):
        return ConversationTemplate(
            prefix=tags.system + tags.user, middle=tags.assistant, suffix=tags.separator, add_special_tokens=True
        )

    messages = [
        {"role": "user", "content": _USER_SENTINEL},
        {"role": "assistant", "content": _ASSISTANT_SENTINEL},
    ]
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    except jinja2.TemplateError as err:
        raise ValueError(f"the tokenizer's chat template failed on a user and assistant exchange: {err}") from err

    if rendered.count(_USER_SENTINEL) != 1 or rendered.count(_ASSISTANT_SENTINEL) != 1:
        raise ValueError(
            "the tokenizer's chat template does not place each message's content exactly once, "
            f"so it cannot be split for truncation; rendered: {rendered!r}"
        )
    prefix, rest = rendered.split(_USER_SENTINEL)
    if _ASSISTANT_SENTINEL not in rest:
        raise ValueError(f"the tokenizer's chat template puts the assistant turn before the user turn: {rendered!r}")
    middle, suffix = rest.split(_ASSISTANT_SENTINEL)
    return ConversationTemplate(prefix=prefix, middle=middle, suffix=suffix, add_special_tokens=False)


def tokenize_conversations(
    tokenizer, template: ConversationTemplate, examples: Sequence[Example]
) -> list[Conversation]:
    """Tokenize each example as one rendered text and split its tokens into segments.

    Tokenizing the whole text, not each segment alone, gives the same ids as tokenizing the
    rendered chat template. A token that crosses a segment boundary belongs to the segment of its
    last character.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"{type(tokenizer).__name__} is not a fast (Rust `tokenizers`) tokenizer, so it returns no "
            "offset mapping to split a conversation by segment; load it with AutoTokenizer, which "
            "prefers the fast class"
        )
    texts, boundaries = [], []
    for example in examples:
        user_start = len(template.prefix)
        middle_start = user_start + len(example.prompt)
        response_start = middle_start + len(template.middle)
        texts.append(template.prefix + example.prompt + template.middle + example.completion + template.suffix)
        boundaries.append((user_start, middle_start, response_start))

    encoded = tokenizer(texts, add_special_tokens=template.add_special_tokens, return_offsets_mapping=True)
    return [
        _split_segments(ids, offsets, starts)
        for ids, offsets, starts in zip(encoded["input_ids"], encoded["offset_mapping"], boundaries)
    ]


def pad_token_id(tokenizer) -> int:
    """Return the pad token id, or the EOS id for tokenizers without a pad token.

    Padded positions are masked out, so the id only has to exist in the vocabulary, and no
    token is ever added to it.
    """
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ValueError(f"{type(tokenizer).__name__} has neither a pad token nor an EOS token to pad with")


def _split_segments(
    ids: Sequence[int], offsets: Sequence[tuple[int, int]], starts: tuple[int, int, int]
) -> Conversation:
    user_start, middle_start, response_start = starts
    segments: list[list[int]] = [[], [], [], []]
    segment = _PREFIX
    for token_id, (start, end) in zip(ids, offsets):
        # A zero-width token (one the tokenizer adds, such as BOS) stays in the current segment.
        if end > start:
            last = end - 1
            if last >= response_start:
                segment = _RESPONSE
            elif last >= middle_start:
                segment = _MIDDLE
            elif last >= user_start:
                segment = _USER
            else:
                segment = _PREFIX
        segments[segment].append(int(token_id))
    return Conversation(*(tuple(tokens) for tokens in segments))
