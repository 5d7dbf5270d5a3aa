"""Chat examples: the tokenizer's chat template renders the conversation; only the assistant's
replies carry loss.

Templates only render whole conversations, so where a reply starts and ends is found by
rendering prefixes: the conversation up to a reply with the generation prompt (what the model
sees at inference time before it answers), then up to and including the reply. The difference
is what the model must learn to produce: the reply and the template's end-of-turn marker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kubetune.trainer.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def chat_segments(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], where: str) -> list[tuple[str, bool]]:
    """The rendered conversation as ``(text, trained)`` pieces that add up to the whole.

    ``trained`` is true exactly for assistant replies (with their end-of-turn marker).
    ``where`` ("s3://... line 3") prefixes errors.
    """
    full = _render(tokenizer, messages, where)
    pieces: list[tuple[str, bool]] = []
    cursor = 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        through = _render(tokenizer, messages[: index + 1], where)
        if index:
            before = _render(tokenizer, messages[:index], where, add_generation_prompt=True)
        else:
            # Templates refuse an empty conversation; a reply that opens one starts at its text.
            start = through.find(message["content"]) if message["content"] else -1
            before = through[:start] if start >= 0 else through
        if not (through.startswith(before) and full.startswith(through) and len(before) >= cursor):
            raise DataError(
                f"{where}: the tokenizer's chat template does not render this conversation "
                f"incrementally (message {index + 1}, the assistant's, changes the text before it), "
                "so the assistant's tokens cannot be told apart: use a template that appends each "
                "message, or dataset.format instruction"
            )
        pieces.append((full[cursor : len(before)], False))
        pieces.append((full[len(before) : len(through)], True))
        cursor = len(through)
    pieces.append((full[cursor:], False))
    return [(text, trained) for text, trained in pieces if text]


def _render(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], where: str, *, add_generation_prompt: bool = False
) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    # A template is the model author's code: it raises its own errors (raise_exception()) or
    # trips over a message it did not expect.
    except (TemplateError, ValueError, TypeError, KeyError, IndexError) as exc:
        raise DataError(f"{where}: the tokenizer's chat template failed on this conversation: {exc}") from None
