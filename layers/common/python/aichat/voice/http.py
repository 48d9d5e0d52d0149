"""The HTTP answer for a clip: the bytes (ETag, Range, Content-Length) or a redirect to a signed URL."""

from __future__ import annotations

from typing import Any

from flask import Response, request

from .audio import CONTENT_TYPE


def clip_response(kind: str, value: Any) -> Response:
    """302 to OSS, or the MP3 itself: conditional (If-None-Match → 304) and ranged (206, 416)."""
    if kind == "redirect":
        return Response(status=302, headers={"Location": value, "Cache-Control": "no-store"})
    data, etag = value
    response = Response(data, mimetype=CONTENT_TYPE)
    response.set_etag(etag)
    # The user's own audio: kept by their client only, and revalidated (a 304 by ETag) each time, since a
    # continued reply keeps its URL but not its audio.
    response.headers["Cache-Control"] = "private, no-cache"
    return response.make_conditional(request, accept_ranges=True, complete_length=len(data))
