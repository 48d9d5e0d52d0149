"""What the model is sent: a token estimate and the message list within the budget (pure, no I/O)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .input import ChatImage

# Chat templates wrap each message in a few tokens of markup.
MESSAGE_OVERHEAD_TOKENS = 4
# What a vision model charges for an image varies with its size; this is a safe middle estimate.
IMAGE_TOKENS = 1024
IMAGE_ONLY_PLACEHOLDER = "[图片]"


def estimate_tokens(text: str) -> int:
    """A tokenizer-free estimate suited to Qwen-style vocabularies: about one token per CJK character
    (and other non-ASCII symbols such as emoji) and one per four ASCII characters, rounded up."""
    wide = sum(1 for ch in text if ord(ch) > 0x7F)
    return wide + -(-(len(text) - wide) // 4)


def message_tokens(message: dict[str, Any]) -> int:
    """Estimated tokens of one chat message, with the per-message overhead of the chat template."""
    content = message["content"]
    calls = sum(
        estimate_tokens(c["function"]["name"]) + estimate_tokens(c["function"]["arguments"])
        for c in message.get("tool_calls") or ()
    )
    if isinstance(content, str):
        return MESSAGE_OVERHEAD_TOKENS + estimate_tokens(content) + calls
    total = MESSAGE_OVERHEAD_TOKENS
    for part in content:
        total += estimate_tokens(part.get("text", "")) if part.get("type") == "text" else IMAGE_TOKENS
    return total


def stored_text(row: dict[str, Any]) -> str:
    """A stored message as context: its text, or a placeholder for an image sent without text."""
    return row["content"] or (IMAGE_ONLY_PLACEHOLDER if row["has_image"] else "")


def user_turn(text: str, image: ChatImage | None) -> dict[str, Any]:
    """The new user message: plain text, or text and image parts for a vision model."""
    if image is None:
        return {"role": "user", "content": text}
    parts: list[dict[str, Any]] = []
    if text.strip():
        parts.append({"type": "text", "text": text})
    parts.append({"type": "image_url", "image_url": {"url": image.data_url}})
    return {"role": "user", "content": parts}


def build_messages(
    *,
    system_prompt: str,
    opening_message: str,
    history: Sequence[dict[str, Any]],
    turn: dict[str, Any],
    context_tokens: int,
    reserve_tokens: int,
    with_tools: bool = False,
) -> list[dict[str, Any]]:
    """The upstream context within the token budget.

    Always: the role's hidden prompt (one system message), its opening message (what the user saw
    first), and the new turn. Then as many of the newest history rows (oldest first, as stored) as fit
    in what is left after reserving room for the reply. With `with_tools`, a reply that used tools comes
    with its calls and their results before its text (so a follow-up question can build on them); they
    go or stay together with the reply.
    """
    from .tooluse import parse_trace, replay

    head: list[dict[str, Any]] = [{"role": "system", "content": system_prompt}]
    if opening_message:
        head.append({"role": "assistant", "content": opening_message})
    budget = context_tokens - reserve_tokens - sum(message_tokens(m) for m in (*head, turn))
    picked: list[dict[str, Any]] = []
    for row in reversed(history):  # newest first, so the budget keeps the most recent turns
        content = stored_text(row)
        if not content:
            continue
        message = {"role": "assistant" if row["sender_role"] == "assistant" else "user", "content": content}
        unit = [message]
        if with_tools and row["sender_role"] == "assistant" and row.get("tool_calls"):
            unit = [*replay(parse_trace(row["tool_calls"])), message]
        cost = sum(message_tokens(m) for m in unit)
        if cost > budget:
            break
        budget -= cost
        picked.extend(reversed(unit))
    picked.reverse()
    return [*head, *picked, turn]
