"""ChatService over real HTTP against upstreams that frame their SSE differently (line endings, BOM,
multi-line data, gzip, comments): the client always gets the same reply, and history stores it whole."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.helpers import chat_once, frame_text, history, sse_events, stream

MODES: dict[str, dict[str, Any]] = {
    "cr": {"line_ending": "\r"},
    "crlf": {"line_ending": "\r\n"},
    "bom": {"bom": True},
    "multiline": {"multiline": True},
    "gzip": {"gzip": True},
    "comments": {"comments": True},
    "gzip+cr+multiline": {"gzip": True, "line_ending": "\r", "multiline": True},
    "everything": {"gzip": True, "line_ending": "\r\n", "multiline": True, "bom": True, "comments": True},
}


@pytest.mark.parametrize("mode", list(MODES))
def test_reply_is_the_same_whatever_the_framing(user, fake_llm, mode: str) -> None:
    fake_llm.enqueue(chunks=["一", "二", "三"], **MODES[mode])
    payloads = chat_once(user, {"role_code": "naitang", "message": f"framing {mode}"})
    assert payloads[-1] == "[DONE]"
    assert frame_text(payloads) == "一二三"
    # The upstream was really asked (once) and answered in this mode, not a default reply.
    assert len(fake_llm.requests) == 1
    last = history(user)[-1]
    assert (last["sender_role"], last["content"], last["is_partial"]) == ("assistant", "一二三", False)


def test_gzip_frames_still_arrive_incrementally(user, fake_llm) -> None:
    fake_llm.enqueue(chunks=["一", "二", "三", "四"], delay=0.3, gzip=True)
    start = time.monotonic()
    res = stream(user, {"role_code": "naitang", "message": "数数"})
    assert res.status_code == 200
    arrivals = list(sse_events(res))
    first_content = next(t for t, p in arrivals if p != "[DONE]" and frame_text([p]))
    # The first frame is relayed as soon as its sync-flushed gzip block arrives, not when the body ends.
    assert first_content - start < 0.8
    assert arrivals[-1][0] - first_content > 0.6
    assert arrivals[-1][1] == "[DONE]" and frame_text([p for _, p in arrivals]) == "一二三四"
