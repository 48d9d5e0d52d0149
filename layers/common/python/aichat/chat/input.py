"""Request bodies of the chat operations turned into typed, validated values (no I/O)."""

from __future__ import annotations

import base64
import math
import re
from dataclasses import dataclass, field
from typing import Any

from ..config import Settings
from ..errors import ApiError
from ..tools.base import InvalidArguments, parse_arguments
from . import images

DATA_URL_PREFIX = re.compile(r"^data:[\w.+/-]*;base64,", re.IGNORECASE)
WHITESPACE_TEXT = re.compile(r"\s+")
BASE64_TEXT = re.compile(r"[A-Za-z0-9+/]*={0,2}")
# Enough base64 for any header we read (a JPEG's size can follow 64 KiB of EXIF); a multiple of 4.
HEAD_CHARS = 256 * 1024
# Sampling parameters: name -> (type, inclusive low, high, low exclusive?).
PARAMS: dict[str, tuple[type, float, float, bool]] = {
    "temperature": (float, 0.0, 2.0, False),
    "top_p": (float, 0.0, 1.0, True),
    "max_tokens": (int, 1, 8192, False),
    "presence_penalty": (float, -2.0, 2.0, False),
    "frequency_penalty": (float, -2.0, 2.0, False),
}
SETTING_NAMES = (*PARAMS, "thinking_enabled", "model")
CONVERSATION_ID = re.compile(r"[0-9a-f]{24}")
TITLE_MAX_CHARS = 100
MAX_ID = 2**63 - 1  # BIGINT / SQLite INTEGER


@dataclass(frozen=True)
class ChatImage:
    """A validated image: its type by magic bytes and its canonical base64."""

    mime_type: str
    base64_data: str
    size: int

    @property
    def data_url(self) -> str:
        """The `data:` URL an OpenAI-compatible vision model takes."""
        return f"data:{self.mime_type};base64,{self.base64_data}"


@dataclass(frozen=True)
class Target:
    """Which conversation a request is about: a role's default one, or one by id (then role_code may be absent)."""

    role_code: str | None
    conversation_id: str | None


@dataclass(frozen=True)
class TurnInput:
    """The user's side of one turn: text, image, and the settings that override the conversation's."""

    text: str
    image: ChatImage | None
    overrides: dict[str, Any] = field(default_factory=dict)
    raw_image: str | None = None  # as sent, until decode_image() has checked it


def target(body: Any, *, source: str = "body") -> Target:
    """The role_code and conversation_id of a body or query; the role is required when no id is given."""
    conversation_id = conversation_id_of(body.get("conversation_id"), required=False)
    role_code = body.get("role_code")
    if role_code is None or role_code == "":
        if conversation_id is None:
            raise ApiError("InvalidInput", "缺少必填参数 role_code")
        role_code = None
    elif not isinstance(role_code, str):
        raise ApiError("InvalidInput", "参数 role_code 必须是字符串")
    return Target(role_code=role_code, conversation_id=conversation_id)


def conversation_id_of(value: Any, *, required: bool = True) -> str | None:
    """A conversation id as the client sent it; a malformed one names no conversation (404, not 400)."""
    if value is None or value == "":
        if required:
            raise ApiError("InvalidInput", "缺少必填参数 conversation_id")
        return None
    if not isinstance(value, str):
        raise ApiError("InvalidInput", "参数 conversation_id 必须是字符串")
    if not CONVERSATION_ID.fullmatch(value):
        raise ApiError("ConversationNotFound")
    return value


def turn(body: dict[str, Any], settings: Settings) -> TurnInput:
    """A /chat/stream body's text, image and overrides, in the contract's order of checks."""
    text = _text(body, settings)
    raw_image = body.get("image_base64")
    if raw_image is not None and not isinstance(raw_image, str):
        raise ApiError("InvalidImage", "image_base64 必须是字符串")
    if not text.strip() and not raw_image:
        raise ApiError("InvalidInput", "缺少 message 或 image_base64")
    overrides = turn_overrides(body, settings)
    mime_hint = body.get("image_mime_type")
    if mime_hint is not None and not isinstance(mime_hint, str):
        raise ApiError("InvalidInput", "参数 image_mime_type 必须是字符串")
    # The image is checked later, once the user's limits and stream slot are taken (decode_image): many
    # large images at once from one token must not cost memory before they are refused.
    return TurnInput(text=text, image=None, overrides=overrides, raw_image=raw_image or None)


def turn_overrides(body: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """The per-turn settings a body carries (sampling parameters, thinking_enabled, model)."""
    overrides = params(body)
    for name in ("thinking_enabled", "model"):
        if body.get(name) is not None:
            overrides[name] = _setting(name, body[name], settings)
    return overrides


def _text(body: dict[str, Any], settings: Settings) -> str:
    # `message` wins; `prompt` is the legacy name for the same thing.
    for name in ("message", "prompt"):
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise ApiError("InvalidInput", f"参数 {name} 必须是字符串")
        if value.strip():
            if len(value) > settings.message_max_chars:
                raise ApiError("InvalidInput", f"消息不能超过 {settings.message_max_chars} 个字符")
            return value
    return ""


def params(body: dict[str, Any]) -> dict[str, Any]:
    """The sampling parameters a body sets, range-checked."""
    return {name: _param(name, body[name]) for name in PARAMS if body.get(name) is not None}


def _param(name: str, value: Any) -> int | float:
    kind, low, high, low_exclusive = PARAMS[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError("InvalidInput", f"参数 {name} 类型不正确")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ApiError("InvalidInput", f"参数 {name} 类型不正确")
        if kind is int:
            if not value.is_integer():  # JSON Schema counts 5.0 as an integer; 5.5 is not
                raise ApiError("InvalidInput", f"参数 {name} 必须是整数")
            value = int(value)
    # Compared as Python numbers: a 400-digit integer is simply out of range (no float overflow).
    if value > high or value < low or (low_exclusive and value == low):
        raise ApiError("InvalidInput", f"参数 {name} 超出范围")
    return value


def _setting(name: str, value: Any, settings: Settings) -> Any:
    if name in PARAMS:
        return _param(name, value)
    if name == "thinking_enabled":
        if not isinstance(value, bool):
            raise ApiError("InvalidInput", "参数 thinking_enabled 必须是布尔值")
        return value
    if not isinstance(value, str) or value not in settings.llm_models:
        raise ApiError("InvalidInput", f"参数 model 必须是以下之一: {', '.join(settings.llm_models)}")
    return value


def conversation_settings(value: Any, settings: Settings) -> dict[str, Any]:
    """A conversation's `settings` object: every key checked; a null value means "back to the default"."""
    if not isinstance(value, dict):
        raise ApiError("InvalidInput", "参数 settings 必须是对象")
    unknown = sorted(set(value) - set(SETTING_NAMES))
    if unknown:
        raise ApiError("InvalidInput", f"settings 不支持的字段: {', '.join(unknown)[:100]}")
    return {name: None if raw is None else _setting(name, raw, settings) for name, raw in value.items()}


def title(value: Any) -> str | None:
    """A conversation title set by the user (trimmed), or None when the body does not set one."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ApiError("InvalidInput", "参数 title 必须是字符串")
    value = " ".join(value.split())
    if len(value) > TITLE_MAX_CHARS:
        raise ApiError("InvalidInput", f"标题不能超过 {TITLE_MAX_CHARS} 个字符")
    return value


def message_id(value: Any, *, required: bool = True) -> int | None:
    """A message id: a JSON integer (5 or 5.0); 400 for any other type, 404 for one no row can have."""
    if value is None and not required:
        return None
    number = integer(value)
    if number is None:
        raise ApiError("InvalidInput", "参数 message_id 必须是整数")
    if not 1 <= number <= MAX_ID:
        raise ApiError("MessageNotFound")  # no row can have it; the database could not even bind it
    return number


def integer(value: Any) -> int | None:
    """A JSON integer (5 or 5.0, as JSON Schema counts them), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value if isinstance(value, int) else None


def query_int(args: Any, name: str, *, low: int, high: int) -> int | None:
    """An optional integer query parameter within [low, high], else 400 InvalidInput."""
    raw = args.get(name)
    if raw is None or raw == "":
        return None
    if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
        raise ApiError("InvalidInput", f"参数 {name} 必须是 {low} 到 {high} 之间的整数")
    return int(raw)


def decode_image(raw: str, settings: Settings) -> ChatImage:
    """A base64 image checked without decoding it whole: alphabet and padding, size from the length, type
    by magic bytes and dimensions from the header (a 100000x100000 PNG is refused before anything decodes it).

    The base64 text itself is kept (it becomes the data URL as it is): one copy fewer per image.
    """
    text = DATA_URL_PREFIX.sub("", raw.strip(), count=1)
    if WHITESPACE_TEXT.search(text):
        text = WHITESPACE_TEXT.sub("", text)
    padding = 2 if text.endswith("==") else 1 if text.endswith("=") else 0
    size = len(text) * 3 // 4 - padding
    if size > settings.image_max_bytes:
        raise ApiError("InvalidImage", f"图片不能超过 {settings.image_max_bytes // (1024 * 1024)} MiB")
    if not text or len(text) % 4 or not text.isascii() or not BASE64_TEXT.fullmatch(text):
        raise ApiError("InvalidImage")
    head = base64.b64decode(text[:HEAD_CHARS])
    mime_type = images.sniff_image_type(head)
    if mime_type is None:
        raise ApiError("InvalidImage", "图片格式不支持，仅支持 jpeg/png/webp/gif")
    problem = images.check_dimensions(images.image_size(head, mime_type))
    if problem is not None:
        raise ApiError("InvalidImage", problem)
    return ChatImage(mime_type=mime_type, base64_data=text, size=size)


def tool_arguments(body: dict[str, Any], parameters: dict[str, Any]) -> dict[str, Any]:
    """A request's `arguments` for a tool (/chat/skill, /chat/tool/execute): an object valid for the tool's
    parameters, else 400 InvalidInput naming what is wrong."""
    raw = body.get("arguments")
    if raw is not None and not isinstance(raw, dict):
        raise ApiError("InvalidInput", "参数 arguments 必须是对象")
    try:
        return parse_arguments(raw or {}, parameters)
    except InvalidArguments as exc:
        raise ApiError("InvalidInput", f"arguments：{exc}") from exc
