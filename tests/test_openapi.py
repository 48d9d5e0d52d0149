"""docs/openapi.yaml: valid OpenAPI 3.1, in step with the route tables and the contract, honoured by the services."""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
import yaml
from aichat.chat.idempotency import BODY_FIELD, KEY_RE
from aichat.chat.images import MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE
from aichat.chat.turn import FALLBACK_MESSAGES
from aichat.config import ENV_VARS
from aichat.errors import CATALOG
from aichat.gunicorn_worker import error_bytes
from aichat.tokens import issue_token
from aichat.web import NO_STORE_OPERATIONS
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi
from openapi_spec_validator.validation import OpenAPIV31SpecValidator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from schemathesis.specs.openapi import checks as openapi_checks

from dev.fake_llm import FakeLLM
from dev.fake_tools import FakeTools
from dev.fake_tts import FakeTts
from tests.conftest import BACKENDS, IN_CI, chat_env, fresh_mysql_database
from tests.helpers import LAYER, ROOT, TEST_SECRET, ServerProcess, random_phone

SPEC_PATH = ROOT / "docs" / "openapi.yaml"
CONTRACT_PATH = ROOT.parent / "shared" / "contract" / "aichat-api.md"
SERVICES = {"login": "LoginService", "chat": "ChatService"}
LOCAL_URLS = {"login": "http://127.0.0.1:9000", "chat": "http://127.0.0.1:9001"}
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
# Codes that the code answers with a status other than their CATALOG default (errors.py, llm.py, web.py:
# a Range /chat/voice cannot serve is Werkzeug's 416, answered as InvalidInput).
EXTRA_STATUSES = {("SendCodeFailed", 400), ("NetworkError", 504), ("InvalidInput", 416)}
TEST_ACCOUNT = {"phone_number": "10086", "country_code": "86", "verify_code": "1234"}
# The operations the services serve beyond the contract's catalog; the document marks each `x-extension: true`.
EXTENSIONS = {
    "me",
    "logout",
    "account_delete",
    "register",
    "login_password",
    "token_refresh",
    "password_set",
    "logout_all",
    "sessions",
    "session_revoke",
    "me_update",
    "chat_delete_message",
    "chat_regenerate",
    "chat_edit",
    "chat_continue",
    "chat_send",
    "chat_conversation_create",
    "chat_conversations",
    "chat_conversation",
    "chat_conversation_update",
    "chat_conversation_delete",
    "chat_role_skills",
    "chat_skill",
    "chat_tools",
    "chat_tool",
    "chat_tool_execute",
    "chat_voice",
}
# The operations whose 200 is an event stream and nothing else (chat_skill's is a stream or, with stream=0, JSON).
STREAMED = ("chat_stream", "chat_regenerate", "chat_edit", "chat_continue")
# The turn operations: they take an idempotency key (the Idempotency-Key header or client_message_id).
TURNS = ("chat_stream", "chat_send", "chat_regenerate", "chat_edit", "chat_skill", "chat_continue")
SERVER_ERRORS = {"DatabaseError", "MissingDatabaseConfig", "InternalError"}
# Every streamed reply (chat_stream, chat_regenerate, chat_edit) and chat_send, its JSON counterpart, can
# answer these before its first frame (a conversation_id that is unknown or another user's: ConversationNotFound;
# an idempotency key still running: RequestInProgress, or used for another body: IdempotencyKeyReused).
STREAM_ERRORS = {
    "400": {"InvalidInput", "InvalidImage"},
    "401": {"Unauthorized"},
    "404": {"RoleNotFound", "ConversationNotFound"},
    "409": {"RequestInProgress"},
    "413": {"PayloadTooLarge"},
    "422": {"IdempotencyKeyReused"},
    "429": {"RateLimited"},
    "500": {"MissingApiKey"} | SERVER_ERRORS,
    "502": {"UpstreamHTTPError", "NetworkError"},
    "504": {"NetworkError"},
}
# The local frames a stream may carry between its first and its last (a tool call's start and end).
TOOL_EVENTS = ("tool.start", "tool.end")
LOOPBACK = "http://127.0.0.1:"


def load_spec() -> dict[str, Any]:
    """The OpenAPI document as plain data."""
    return yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8"))


def spec_operations(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every documented operation by operation_id: method, path, auth, the operation and its path item."""
    operations: dict[str, dict[str, Any]] = {}
    for path, item in spec["paths"].items():
        for method in HTTP_METHODS:
            if method not in item:
                continue
            operation = item[method]
            security = operation.get("security", spec.get("security", []))
            auth = "bearer_jwt" if any("bearerAuth" in requirement for requirement in security) else "none"
            assert operation["operationId"] not in operations, f"duplicate operationId {operation['operationId']}"
            operations[operation["operationId"]] = {
                "method": method.upper(),
                "path": path,
                "auth": auth,
                "operation": operation,
                "item": item,
            }
    return operations


def resolve(spec: dict[str, Any], node: Any) -> Any:
    """Follow a local $ref (repeatedly) to the object it names."""
    while isinstance(node, dict) and "$ref" in node:
        target: Any = spec
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


@functools.cache
def document_registry() -> Registry:
    """The document as the one resource of a JSON Schema registry (its $refs resolve in it)."""
    return Registry().with_resource("urn:openapi", Resource(contents=load_spec(), specification=DRAFT202012))


@functools.cache
def pointer_validator(pointer: str) -> Draft202012Validator:
    """A JSON Schema validator of the schema at a JSON pointer of the document (its $refs resolved in it)."""
    return Draft202012Validator({"$ref": f"urn:openapi#{pointer}"}, registry=document_registry())


def schema_validator(name: str) -> Draft202012Validator:
    """A JSON Schema validator of one of the document's components/schemas."""
    return pointer_validator(f"/components/schemas/{name}")


def response_validator(name: str) -> Draft202012Validator:
    """A JSON Schema validator of the JSON body of one of the document's components/responses."""
    return pointer_validator(f"/components/responses/{name}/content/application~1json/schema")


def sse_events(text: str) -> list[str]:
    """The events of an event-stream body, comment lines (`: ping`) left out as every SSE client does."""
    return [event for event in text.split("\n\n") if not event.startswith(":")]


def stream_chunks(payloads: list[str]) -> list[dict[str, Any]]:
    """The chunks of a complete stream's payloads ([DONE] left out), checked against StreamChunk and the framing.

    Every chunk has `choices[0].delta.content` as a string; the first is the local `stream.meta` frame,
    the last the `done` frame or the fallback frame (`error`, with empty content and an `error` object that
    `x_event` repeats). Between them only a tool call's local frames carry an `x_event` (`tool.start`, then
    its `tool.end`, both with empty content and no finish_reason). A repeat of an idempotency key
    (`replayed: true` on the first and the last frame) repeats no tool frames; a continuation's first frame
    (a repeat's too) names the reply it continues (`continues`, with no user message) and its last frame
    names that reply.
    """
    chunks = [json.loads(payload) for payload in payloads]
    assert len(chunks) >= 2, f"a stream has at least its stream.meta and its last frame: {payloads!r}"
    for chunk in chunks:
        schema_validator("StreamChunk").validate(chunk)
        assert isinstance(chunk["choices"][0]["delta"]["content"], str), chunk
    first, last = chunks[0], chunks[-1]
    meta = first["x_event"]
    assert meta["type"] == "stream.meta", first
    assert first["choices"][0]["delta"]["content"] == "", first
    started: list[str] = []
    ended: list[str] = []
    for chunk in chunks[1:-1]:
        if "x_event" not in chunk:
            continue
        tool = chunk["x_event"]
        assert tool["type"] in TOOL_EVENTS, f"x_event {tool['type']!r} between the first and the last frame"
        assert chunk["choices"][0]["delta"]["content"] == "", chunk
        assert chunk["choices"][0]["finish_reason"] is None, chunk
        if tool["type"] == "tool.start":
            started.append(tool["tool_call_id"])
        else:
            assert tool["tool_call_id"] in started and tool["tool_call_id"] not in ended, chunk
            ended.append(tool["tool_call_id"])
    assert sorted(ended) == sorted(started), f"a tool.start without its tool.end: {started} vs {ended}"
    event = last["x_event"]
    assert event["type"] in ("done", "error"), last
    assert event["conversation_id"] == meta["conversation_id"], (first, last)
    assert last["choices"][0]["delta"]["content"] == "", last
    if event["type"] == "done":
        assert "error" not in last, last
        assert last["choices"][0]["finish_reason"] == event["finish_reason"], last
    else:
        assert last["choices"][0]["finish_reason"] == "error", last
        assert (last["error"]["code"], last["error"]["message"]) == (event["code"], event["message"]), last
    assert meta.get("replayed") is event.get("replayed"), "replayed is on both the first and the last frame, or neither"
    if meta.get("replayed"):
        assert not started, "a repeat shows no tool frames"
    if "continues" in meta:
        assert meta["message_id"] is None, "a continuation stores no user message"
        assert event["message_id"] in (meta["continues"], None), "the last frame names the continued reply"
        assert not started, "no tools on a continuation"
    else:
        assert meta["message_id"] is not None, first
    return chunks


def reply_text(chunks: list[dict[str, Any]]) -> str:
    """The reply a stream spelled out: its frames' `choices[0].delta.content`, concatenated."""
    return "".join(chunk["choices"][0]["delta"]["content"] for chunk in chunks)


def documented_codes(spec: dict[str, Any], response: dict[str, Any]) -> set[str]:
    """The error codes a documented error response allows (its `code` enum, narrowed by allOf)."""
    schema = resolve(spec, response["content"]["application/json"]["schema"])
    parts = [resolve(spec, part) for part in schema.get("allOf", [schema])]
    assert parts[0] is resolve(spec, {"$ref": "#/components/schemas/ErrorResponse"}), "errors use ErrorResponse"
    codes = set(resolve(spec, parts[0]["properties"]["code"])["enum"])
    for part in parts[1:]:
        codes &= set(part.get("properties", {}).get("code", {}).get("enum", codes))
    return codes


# -- the document itself ---------------------------------------------------------------------------


def test_document_is_valid_openapi_3_1() -> None:
    """The document parses and validates as OpenAPI 3.1."""
    spec = load_spec()
    assert str(spec["openapi"]).startswith("3.1.")
    validate_openapi(spec, cls=OpenAPIV31SpecValidator)


def test_error_schema_matches_the_code_table() -> None:
    """ErrorResponse is the contract's error shape and its code enum is exactly errors.CATALOG."""
    spec = load_spec()
    error = spec["components"]["schemas"]["ErrorResponse"]
    assert sorted(error["required"]) == ["code", "message", "success"]
    assert error["properties"]["success"] == {"const": False}
    assert error["properties"]["message"]["type"] == "string"
    assert set(resolve(spec, error["properties"]["code"])["enum"]) == set(CATALOG)


def test_every_documented_error_has_the_status_the_code_uses() -> None:
    """Each error response lists only codes the services answer with that status, in the shared shape."""
    spec = load_spec()
    allowed = {(code, status) for code, (status, _) in CATALOG.items()} | EXTRA_STATUSES
    for name, response in spec["components"]["responses"].items():
        assert "X-Content-Type-Options" in response["headers"], f"components/responses/{name}: no nosniff header"
        if name != "RefusedRequest":  # answered by gunicorn before the app: no request id
            assert "X-Request-Id" in response["headers"], f"components/responses/{name}: no X-Request-Id header"
        if list(response["content"]) == ["text/event-stream"]:
            continue  # the success answer the streamed operations share
        assert documented_codes(spec, response), f"components/responses/{name}: no error code"
    for op in spec_operations(spec).values():
        for status, response in op["operation"]["responses"].items():
            where = f"{op['method']} {op['path']} {status}"
            response = resolve(spec, response)
            assert "X-Request-Id" in response["headers"], f"{where}: no X-Request-Id header"
            if int(status) < 400:
                continue  # a success, or /chat/voice's 302 and 304 (no body)
            codes = documented_codes(spec, response)
            assert codes, f"{where}: no error code"
            for code in codes:
                assert (code, int(status)) in allowed, f"{where}: {code} is never answered with HTTP {status}"


def test_operations_document_the_errors_the_code_can_produce() -> None:
    """Every operation lists the errors its route can answer: auth, body cap, validation and server errors."""
    spec = load_spec()
    operations = spec_operations(spec)
    expected = {
        "login_health": {"500": {"InternalError"}},
        "send_code": {
            "400": {"InvalidInput", "InvalidPhoneNumber", "SendCodeFailed"},
            "413": {"PayloadTooLarge"},
            "415": {"UnsupportedMediaType"},
            "429": {"RateLimited"},
            "500": {"SendCodeFailed", "DatabaseError", "MissingDatabaseConfig", "InternalError"},
        },
        "login": {
            "400": {"InvalidInput", "InvalidPhoneNumber", "InvalidVerifyCode"},
            "401": {"VerifyFailed"},
            "413": {"PayloadTooLarge"},
            "415": {"UnsupportedMediaType"},
            "500": {"DatabaseError", "MissingDatabaseConfig", "InternalError"},
        },
        "me": {"401": {"Unauthorized"}, "500": SERVER_ERRORS},
        "logout": {"401": {"Unauthorized"}, "413": {"PayloadTooLarge"}, "500": SERVER_ERRORS},
        "account_delete": {"401": {"Unauthorized"}, "413": {"PayloadTooLarge"}, "500": SERVER_ERRORS},
        "register": {
            "400": {"InvalidInput"},
            "409": {"AccountExists"},
            "413": {"PayloadTooLarge"},
            "415": {"UnsupportedMediaType"},
            "500": SERVER_ERRORS,
        },
        "login_password": {
            "400": {"InvalidInput"},
            "401": {"InvalidCredentials"},
            "413": {"PayloadTooLarge"},
            "415": {"UnsupportedMediaType"},
            "429": {"RateLimited"},
            "500": SERVER_ERRORS,
        },
        "token_refresh": {
            "400": {"InvalidInput"},
            "401": {"Unauthorized"},
            "413": {"PayloadTooLarge"},
            "415": {"UnsupportedMediaType"},
            "500": SERVER_ERRORS,
        },
        "password_set": {
            "400": {"InvalidInput"},
            "401": {"Unauthorized", "InvalidCredentials"},
            "413": {"PayloadTooLarge"},
            "500": SERVER_ERRORS,
        },
        "logout_all": {"401": {"Unauthorized"}, "413": {"PayloadTooLarge"}, "500": SERVER_ERRORS},
        "sessions": {"401": {"Unauthorized"}, "500": SERVER_ERRORS},
        "session_revoke": {
            "400": {"InvalidInput"},
            "401": {"Unauthorized"},
            "404": {"SessionNotFound"},
            "413": {"PayloadTooLarge"},
            "500": SERVER_ERRORS,
        },
        "me_update": {
            "400": {"InvalidInput"},
            "401": {"Unauthorized"},
            "413": {"PayloadTooLarge"},
            "500": SERVER_ERRORS,
        },
        "chat_roles": {"500": {"DatabaseError", "MissingDatabaseConfig", "InternalError"}},
        "chat_stream": STREAM_ERRORS,
        "chat_history": {
            "400": {"InvalidInput"},
            "401": {"Unauthorized"},
            "404": {"RoleNotFound", "ConversationNotFound"},
            "500": {"DatabaseError", "MissingDatabaseConfig", "InternalError"},
        },
        "chat_clear": {
            "400": {"InvalidInput"},
            "401": {"Unauthorized"},
            "404": {"RoleNotFound", "ConversationNotFound"},
            "413": {"PayloadTooLarge"},
            "500": {"DatabaseError", "MissingDatabaseConfig", "InternalError"},
        },
        "chat_delete_message": {
            "400": {"InvalidInput"},
            "401": {"Unauthorized"},
            "404": {"MessageNotFound"},
            "413": {"PayloadTooLarge"},
            "500": SERVER_ERRORS,
        },
        # Regenerating takes no new message or image, so it has no InvalidImage.
        "chat_regenerate": {**STREAM_ERRORS, "400": {"InvalidInput"}},
        "chat_edit": STREAM_ERRORS,
        "chat_send": STREAM_ERRORS,
        # A continuation names a message, not a conversation or role, and carries no image.
        "chat_continue": {
            **{status: codes for status, codes in STREAM_ERRORS.items() if status != "404"},
            "400": {"InvalidInput"},
            "404": {"MessageNotFound"},
        },
        "chat_conversation_create": {
            "400": {"InvalidInput"},
            "401": {"Unauthorized"},
            "404": {"RoleNotFound"},
            "413": {"PayloadTooLarge"},
            "500": SERVER_ERRORS,
        },
        "chat_conversations": {
            "400": {"InvalidInput"},
            "401": {"Unauthorized"},
            "404": {"RoleNotFound"},
            "500": SERVER_ERRORS,
        },
        "chat_conversation": {
            "400": {"InvalidInput"},
            "401": {"Unauthorized"},
            "404": {"ConversationNotFound"},
            "500": SERVER_ERRORS,
        },
        "chat_conversation_update": {
            "400": {"InvalidInput"},
            "401": {"Unauthorized"},
            "404": {"ConversationNotFound"},
            "413": {"PayloadTooLarge"},
            "500": SERVER_ERRORS,
        },
        "chat_conversation_delete": {
            "400": {"InvalidInput"},
            "401": {"Unauthorized"},
            "404": {"ConversationNotFound"},
            "413": {"PayloadTooLarge"},
            "500": SERVER_ERRORS,
        },
        "chat_role_skills": {"400": {"InvalidInput"}, "404": {"RoleNotFound"}, "500": SERVER_ERRORS},
        # The tool's own arguments replace the message and image; the stream starts before the tool runs and
        # the upstream is called only after it, so a timeout is never a 504 (with stream=0 it is a 502).
        "chat_skill": {
            **{status: codes for status, codes in STREAM_ERRORS.items() if status != "504"},
            "400": {"InvalidInput"},
            "404": {"RoleNotFound", "SkillNotFound", "ConversationNotFound"},
        },
        "chat_tools": {"500": {"InternalError"}},
        "chat_tool": {"400": {"InvalidInput"}, "404": {"ToolNotFound"}, "500": {"InternalError"}},
        "chat_tool_execute": {
            "400": {"InvalidInput"},
            "401": {"Unauthorized"},
            "404": {"ToolNotFound"},
            "413": {"PayloadTooLarge"},
            "429": {"RateLimited"},
            "500": SERVER_ERRORS,
            "502": {"ToolFailed"},
        },
        "chat_voice": {
            "400": {"InvalidInput"},
            "401": {"Unauthorized"},
            "404": {"MessageNotFound"},
            "416": {"InvalidInput"},
            "429": {"RateLimited"},
            "500": SERVER_ERRORS,
            "502": {"UpstreamHTTPError", "NetworkError"},
        },
    }
    assert set(operations) == set(expected)
    for operation_id, errors in expected.items():
        responses = operations[operation_id]["operation"]["responses"]
        documented = {
            status: documented_codes(spec, resolve(spec, response))
            for status, response in responses.items()
            if int(status) >= 400
        }
        assert documented == errors, operation_id
    for operation_id, op in operations.items():  # every 429, and a 409 of a key still running, says when to retry
        for status, response in op["operation"]["responses"].items():
            codes = expected[operation_id].get(status, set())
            if status == "429" or "RequestInProgress" in codes:
                waiting = resolve(spec, response)
                assert resolve(spec, waiting["headers"]["Retry-After"])["required"] is True, (operation_id, status)
    for operation_id in TURNS:
        parameters = [resolve(spec, p) for p in operations[operation_id]["operation"].get("parameters", [])]
        assert any((p["in"], p["name"]) == ("header", "Idempotency-Key") for p in parameters), operation_id
        assert {"409", "422"} <= set(operations[operation_id]["operation"]["responses"]), operation_id
        body = resolve(spec, operations[operation_id]["operation"]["requestBody"]["content"]["application/json"])
        assert "client_message_id" in resolve(spec, body["schema"])["properties"], operation_id
    for name in ("NotFound", "MethodNotAllowed"):
        assert name in spec["components"]["responses"]
    assert "Allow" in spec["components"]["responses"]["MethodNotAllowed"]["headers"]


@pytest.mark.parametrize("operation_id", STREAMED)
def test_streamed_operations_answer_server_sent_events(operation_id: str) -> None:
    """A streamed 200 is text/event-stream, a string whose frames are StreamChunk, ending with [DONE]."""
    spec = load_spec()
    ok = resolve(spec, spec_operations(spec)[operation_id]["operation"]["responses"]["200"])
    assert list(ok["content"]) == ["text/event-stream"]
    stream = ok["content"]["text/event-stream"]
    assert stream["schema"]["type"] == "string"
    assert {"reply", "fallback"} <= set(stream["examples"])
    assert {"reply", "fallback", "length"} <= set(stream["examples"])
    for name, example in stream["examples"].items():
        frames = sse_events(example["value"])
        assert frames[-2:] == ["data: [DONE]", ""], "frames end with data: [DONE]"
        for frame in frames[:-2]:
            assert frame.startswith("data: ")
            assert "choices" in json.loads(frame.removeprefix("data: "))
        chunks = stream_chunks([frame.removeprefix("data: ") for frame in frames[:-2]])
        assert chunks[-1]["x_event"]["type"] == ("error" if name == "fallback" else "done"), name
    assert ": ping" in stream["examples"]["length"]["value"].split("\n\n")
    assert (
        stream_chunks([f.removeprefix("data: ") for f in sse_events(stream["examples"]["length"]["value"])[:-2]])[-1][
            "x_event"
        ]["finish_reason"]
        == "length"
    )
    assert stream["x-sse-event-schema"] == {"$ref": "#/components/schemas/StreamEvent"}
    fallback = spec["components"]["schemas"]["StreamChunk"]["properties"]["error"]
    assert resolve(spec, fallback)["required"] == ["code", "message"]


def test_send_answers_json() -> None:
    """chat_send is the streamed turn's JSON counterpart: the body of /chat/stream, one ChatSendResponse."""
    spec = load_spec()
    operations = spec_operations(spec)
    operation = operations["chat_send"]["operation"]
    for operation_id in ("chat_stream", "chat_send"):
        body = operations[operation_id]["operation"]["requestBody"]["content"]["application/json"]
        assert body["schema"] == {"$ref": "#/components/schemas/ChatStreamRequest"}, operation_id
    ok = resolve(spec, operation["responses"]["200"])
    assert list(ok["content"]) == ["application/json"]
    assert ok["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ChatSendResponse"}


@pytest.mark.parametrize(
    "operation_id",
    [
        "chat_history",
        "chat_send",
        "chat_conversation_create",
        "chat_conversations",
        "chat_conversation",
        "chat_conversation_update",
        "chat_conversation_delete",
    ],
)
def test_conversation_examples_match_their_schemas(operation_id: str) -> None:
    """The request and success examples of the conversation operations are valid instances of their schemas."""
    spec = load_spec()
    operation = spec_operations(spec)[operation_id]["operation"]
    media = [operation["requestBody"]["content"]["application/json"]] if "requestBody" in operation else []
    media.append(resolve(spec, operation["responses"]["200"])["content"]["application/json"])
    for each in media:
        schema = resolve(spec, each["schema"])
        name = next(key for key, value in spec["components"]["schemas"].items() if value is schema)
        examples = [example["value"] for example in each.get("examples", {}).values()]
        if "example" in each:
            examples.append(each["example"])
        assert examples, f"{operation_id}: no example for {name}"
        for example in examples:
            schema_validator(name).validate(example)


def json_pointer(*parts: str) -> str:
    """A JSON pointer into the document (RFC 6901: `~` and `/` escaped)."""
    return "".join("/" + part.replace("~", "~0").replace("/", "~1") for part in parts)


def json_media(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """Every application/json media object the operations use: (where, JSON pointer of its schema, media)."""
    found = []
    for path, item in spec["paths"].items():
        for method in HTTP_METHODS:
            if method not in item:
                continue
            operation = item[method]
            at = ("paths", path, method)
            if "requestBody" in operation:
                media = operation["requestBody"]["content"].get("application/json")
                if media is not None:
                    found.append(
                        (
                            f"{method} {path} body",
                            json_pointer(*at, "requestBody", "content", "application/json"),
                            media,
                        )
                    )
            for status, response in operation["responses"].items():
                where = json_pointer(*at, "responses", status)
                if "$ref" in response:
                    where = json_pointer(*response["$ref"].removeprefix("#/").split("/"))
                    response = resolve(spec, response)
                media = response.get("content", {}).get("application/json")
                if media is not None:
                    found.append(
                        (f"{method} {path} {status}", where + json_pointer("content", "application/json"), media)
                    )
    return found


def test_every_json_example_matches_its_schema() -> None:
    """Each example of a JSON body, success or error, request or response, is an instance of its schema."""
    spec = load_spec()
    checked = 0
    for where, media_pointer, media in json_media(spec):
        examples = [example["value"] for example in media.get("examples", {}).values()]
        if "example" in media:
            examples.append(media["example"])
        for example in examples:
            errors = list(pointer_validator(media_pointer + "/schema").iter_errors(example))
            assert not errors, f"{where}: {errors[0].message} in {example!r}"
            checked += 1
    assert checked > 100  # the document has examples almost everywhere


def test_skill_stream_examples_follow_the_framing() -> None:
    """/chat/skill's own stream example: its tool's start and end frames between the first and the last."""
    spec = load_spec()
    ok = spec_operations(spec)["chat_skill"]["operation"]["responses"]["200"]
    stream = ok["content"]["text/event-stream"]
    assert stream["x-sse-event-schema"] == {"$ref": "#/components/schemas/StreamEvent"}
    for example in stream["examples"].values():
        frames = sse_events(example["value"])
        assert frames[-2:] == ["data: [DONE]", ""]
        chunks = stream_chunks([frame.removeprefix("data: ") for frame in frames[:-2]])
        assert [c["x_event"]["type"] for c in chunks if "x_event" in c][1:3] == list(TOOL_EVENTS)


# -- the route tables and the contract -------------------------------------------------------------


def route_table(function: str, db_path: Path) -> list[dict[str, str]]:
    """The ROUTES of one function's app.py, read in a subprocess (both modules are named `app`)."""
    script = (
        "import json\nfrom app import ROUTES\n"
        "print(json.dumps([dict(operation_id=r.operation_id, method=r.method, path=r.path, auth=r.auth,"
        " response_type=r.response_type, json_only=r.json_only) for r in ROUTES]))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AICHAT_", "ALIBABA_CLOUD_", "DASHSCOPE_"))}
    env.update(
        {
            "PYTHONPATH": str(LAYER),
            "AICHAT_ENV": "test",
            "AICHAT_JWT_SECRET": TEST_SECRET,
            "AICHAT_DB_URL": f"sqlite:///{db_path}",
        }
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT / "functions" / function,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"importing functions/{function}/app.py failed:\n{result.stderr}"
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def route_tables(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, str]]]:
    """Both services' route tables, by function name."""
    db_dir = tmp_path_factory.mktemp("routes-db")
    return {function: route_table(function, db_dir / f"{function}.db") for function in SERVICES}


def contract_catalog() -> dict[str, Any]:
    """The contract's machine-readable catalog (the JSON block of section 9)."""
    text = CONTRACT_PATH.read_text(encoding="utf-8")
    section = text[text.index("9. Machine-Readable API Catalog") :]
    start = section.index("{")
    catalog, _ = json.JSONDecoder().raw_decode(section[start:])
    return catalog


def test_route_tables_match_the_document(route_tables: dict[str, list[dict[str, str]]]) -> None:
    """Both apps serve exactly the documented operations, with the documented auth, tag and server."""
    spec = load_spec()
    documented = spec_operations(spec)
    served = {route["operation_id"]: (function, route) for function, routes in route_tables.items() for route in routes}
    assert {(op_id, r["method"], r["path"]) for op_id, (_, r) in served.items()} == {
        (op_id, op["method"], op["path"]) for op_id, op in documented.items()
    }
    for operation_id, (function, route) in served.items():
        operation = documented[operation_id]
        assert route["auth"] == operation["auth"], f"{operation_id}: auth {route['auth']} vs {operation['auth']}"
        assert operation["operation"]["tags"] == [SERVICES[function]], operation_id
        urls = [server["url"] for server in operation["item"]["servers"]]
        assert LOCAL_URLS[function] in urls, f"{operation_id} does not point at the local {function} service"
        other = next(name for name in SERVICES if name != function)
        assert LOCAL_URLS[other] not in urls, f"{operation_id} points at the {other} service"
        bearer = operation["operation"]["security"] == [{"bearerAuth": []}]
        assert bearer == (route["auth"] == "bearer_jwt"), operation_id
        if route["auth"] == "bearer_jwt":
            assert "401" in operation["operation"]["responses"], f"{operation_id} does not document 401"


@functools.cache
def clip_cache_controls() -> dict[str, str]:
    """What voice/http.py's clip_response sends as Cache-Control: with the audio ("bytes") and with a redirect."""
    from aichat.voice.http import clip_response
    from flask import Flask

    with Flask("openapi-probe").test_request_context("/chat/voice"):
        return {
            kind: clip_response(kind, value).headers["Cache-Control"]
            for kind, value in (("bytes", (b"ID3", "etag")), ("redirect", "https://oss.example.com/a.mp3"))
        }


def voice_cache_control() -> str:
    """The Cache-Control of the user's own audio (200, 206 and 304 alike)."""
    return clip_cache_controls()["bytes"]


def cache_controls_sent(operation_id: str, private: bool, status: str, media: set[str]) -> set[str]:
    """The Cache-Control values the app sends with one documented response, by what the response is.

    web.py: a stream says `no-cache, no-transform`; a JSON answer of a private operation (bearer, or a
    token-bearing one of NO_STORE_OPERATIONS) `no-store`. voice/http.py (asked, not copied): the audio
    and its 304 say what clip_response sends with the bytes, the redirect to a signed URL what it sends
    with a redirect.
    """
    sent = set()
    if "text/event-stream" in media:
        sent.add("no-cache, no-transform")
    if "application/json" in media and private:
        sent.add("no-store")
    if operation_id == "chat_voice" and ("audio/mpeg" in media or status == "304"):
        sent.add(clip_cache_controls()["bytes"])
    if operation_id == "chat_voice" and status == "302":
        sent.add(clip_cache_controls()["redirect"])
    return sent


def test_responses_document_the_headers_the_app_adds(route_tables: dict[str, list[dict[str, str]]]) -> None:
    """nosniff on every answer; each response documents the Cache-Control the app sends with it, and only that."""
    spec = load_spec()
    routes = {route["operation_id"]: route for table in route_tables.values() for route in table}
    for operation_id, op in spec_operations(spec).items():
        route = routes[operation_id]
        private = route["auth"] == "bearer_jwt" or operation_id in NO_STORE_OPERATIONS
        for status, response in op["operation"]["responses"].items():
            where = f"{operation_id} {status}"
            resolved = resolve(spec, response)
            headers = resolved["headers"]
            nosniff = resolve(spec, headers["X-Content-Type-Options"])
            assert (nosniff["required"], nosniff["schema"]) == (True, {"const": "nosniff"}), where
            cache = resolve(spec, headers.get("Cache-Control", {}))
            sent = cache_controls_sent(operation_id, private, status, set(resolved.get("content", {})))
            if not sent:
                assert not cache.get("required"), f"{where}: the app sends no Cache-Control here"
                continue
            schema = cache.get("schema", {})
            documented = {schema["const"]} if "const" in schema else set(schema.get("enum", []))
            assert documented == sent, f"{where}: Cache-Control {sorted(documented)} documented, {sorted(sent)} sent"
            # A response component shared with an operation that sends no no-store cannot require it.
            assert cache["required"] is True or ("$ref" in response and sent == {"no-store"}), f"{where}: not required"


def test_only_the_login_operations_are_json_only(route_tables: dict[str, list[dict[str, str]]]) -> None:
    """Exactly the json_only routes document 415 UnsupportedMediaType (the bearer ones accept any type)."""
    spec = load_spec()
    operations = spec_operations(spec)
    json_only = {route["operation_id"] for table in route_tables.values() for route in table if route["json_only"]}
    assert json_only == {"send_code", "login", "register", "login_password", "token_refresh"}
    assert json_only <= NO_STORE_OPERATIONS  # each answers a token, or takes a password
    assert {op_id for op_id, op in operations.items() if "415" in op["operation"]["responses"]} == json_only


def test_refused_request_response_is_what_the_http_server_answers() -> None:
    """components/responses/RefusedRequest describes exactly the answers of gunicorn_worker.error_bytes."""
    spec = load_spec()
    refused = spec["components"]["responses"]["RefusedRequest"]
    named = {int(status) for status in re.findall(r"\b(4\d\d)\b", refused["description"])}
    answered = set()
    # gunicorn's own statuses for a refused request; 403 only arises with TLS or the PROXY protocol (both off).
    for gunicorn_status in (400, 408, 414, 417, 431, 501):
        head, _, body = error_bytes(gunicorn_status).partition(b"\r\n\r\n")
        status = int(head.split(b" ")[1])
        answered.add(status)
        response_validator("RefusedRequest").validate(json.loads(body))
        assert b"\r\nX-Content-Type-Options: nosniff\r\n" in head
        assert b"X-Request-Id" not in head  # as documented: gunicorn answers before any request id exists
    assert named == answered
    for item in spec["paths"].values():  # listed on no operation: schemathesis would expect it everywhere
        for method in HTTP_METHODS:
            for response in item.get(method, {}).get("responses", {}).values():
                assert response != {"$ref": "#/components/responses/RefusedRequest"}


def test_stream_fallback_codes_and_image_limits_match_the_code() -> None:
    """The fallback frame's codes are turn.FALLBACK_MESSAGES; ImageBase64 names images.py's limits."""
    spec = load_spec()
    schemas = spec["components"]["schemas"]
    assert set(schemas["StreamError"]["properties"]["code"]["enum"]) == set(FALLBACK_MESSAGES)
    error_event = next(s for s in schemas["StreamXEvent"]["oneOf"] if s["title"] == "error")
    assert set(error_event["properties"]["code"]["enum"]) == set(FALLBACK_MESSAGES)
    description = schemas["ImageBase64"]["description"]
    assert f"{MAX_IMAGE_SIDE} px on a side" in description
    assert f"{MAX_IMAGE_PIXELS:,} px in all" in description


def test_lifecycle_hooks_are_not_in_the_document() -> None:
    """FC's /initialize and /pre-stop are served outside the route tables and stay out of `paths`."""
    spec = load_spec()
    assert not {"/initialize", "/pre-stop"} & set(spec["paths"])
    assert "x-fc-control-path" in spec["info"]["description"]


def test_extensions_are_marked() -> None:
    """Exactly the operations beyond the contract carry `x-extension: true`; the contract's carry no marker."""
    marked = {}
    for operation_id, op in spec_operations(load_spec()).items():
        if "x-extension" in op["operation"]:
            marked[operation_id] = op["operation"]["x-extension"]
    assert marked == dict.fromkeys(EXTENSIONS, True)


@pytest.mark.skipif(
    not CONTRACT_PATH.exists() and not IN_CI, reason=f"{CONTRACT_PATH} is absent (it is required in CI)"
)
def test_contract_catalog_matches_the_document_and_the_routes(route_tables: dict[str, list[dict[str, str]]]) -> None:
    """The contract's catalog, the document and the route tables agree on operation_id, method, path and auth."""
    catalog = contract_catalog()
    spec = load_spec()
    documented = spec_operations(spec)
    listed = {}
    for service, entry in catalog["services"].items():
        for endpoint in entry["endpoints"]:
            listed[endpoint["operation_id"]] = (service, entry["base_url"], endpoint)
    keys = ("operation_id", "method", "path", "auth")
    in_contract = {tuple(endpoint[k] for k in keys) for _, _, endpoint in listed.values()}
    in_document = {(op_id, op["method"], op["path"], op["auth"]) for op_id, op in documented.items()}
    in_routes = {tuple(route[k] for k in keys) for routes in route_tables.values() for route in routes}
    # Every contract operation is served and documented exactly as the catalog lists it...
    assert in_contract <= in_document, "contract catalog vs docs/openapi.yaml"
    assert in_contract <= in_routes, "contract catalog vs the route tables"
    assert in_routes == in_document, "route tables vs docs/openapi.yaml"
    # ... and the rest are exactly the operations the document marks as extensions.
    extensions = {op_id for op_id, op in documented.items() if op["operation"].get("x-extension") is True}
    assert {entry[0] for entry in in_document - in_contract} == extensions
    assert not extensions & set(listed), "a contract operation is marked x-extension"
    for operation_id, (service, base_url, _) in listed.items():
        operation = documented[operation_id]
        assert operation["operation"]["tags"] == [service]
        assert base_url in [server["url"] for server in operation["item"]["servers"]], operation_id
    for operation_id in extensions:  # an extension lives on its service's production URL as well
        operation = documented[operation_id]
        (service,) = operation["operation"]["tags"]
        assert catalog["services"][service]["base_url"] in [server["url"] for server in operation["item"]["servers"]]
    assert set(catalog["services"]) == {tag["name"] for tag in spec["tags"]}
    top_level = {server["url"] for server in spec["servers"]}
    assert {entry["base_url"] for entry in catalog["services"].values()} | set(LOCAL_URLS.values()) == top_level


# -- the live services -----------------------------------------------------------------------------


@dataclass
class LiveServices:
    """Both services running on one database, and a bearer token of the test account."""

    login: ServerProcess
    chat_url: str
    token: str
    uid: str
    bearer_paths: frozenset[tuple[str, str]]
    operation_ids: dict[tuple[str, str], str]
    roles: frozenset[str]
    addresses: itertools.count

    @property
    def login_url(self) -> str:
        """LoginService's base URL."""
        return self.login.base_url

    def base_url(self, path: str) -> str:
        """The service a path belongs to."""
        return self.chat_url if path.startswith("/chat/") else self.login_url

    def headers(self, method: str, path: str, token: str | None = None) -> dict[str, str]:
        """Per-request headers: a fresh client address (abuse limits count per IP) and the bearer token."""
        n = next(self.addresses)
        headers = {"X-Forwarded-For": f"198.18.{n // 250 % 250}.{n % 250 + 1}"}
        if (method.upper(), path) in self.bearer_paths:
            headers["Authorization"] = f"Bearer {token or self.token}"
        return headers

    def fresh_test_account_token(self) -> str:
        """A new token of the test account (its own jti: revoking it leaves every other token alone)."""
        answer = requests.post(
            f"{self.login_url}/login", json=TEST_ACCOUNT, headers=self.headers("POST", "/login"), timeout=30
        )
        assert answer.status_code == 200, answer.text
        return answer.json()["access_token"]

    def new_account(self, phone: str | None = None, country_code: str = "86") -> tuple[str, str]:
        """Sign a user up through the real flow (the console SMS provider logs the code); (uid, token)."""
        phone = phone or random_phone()
        body = {"phone_number": phone, "country_code": country_code}
        sent = requests.post(
            f"{self.login_url}/send_code", json=body, headers=self.headers("POST", "/send_code"), timeout=30
        )
        assert sent.status_code == 200, sent.text
        codes = re.findall(rf"SMS code for {phone}: ([0-9]+)", self.login.log())
        assert codes, f"no code for {phone} in LoginService's log"
        answer = requests.post(
            f"{self.login_url}/login",
            json={**body, "verify_code": codes[-1]},
            headers=self.headers("POST", "/login"),
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        return answer.json()["user"]["uid"], answer.json()["access_token"]

    def seed(self, role_code: str = "naitang", token: str | None = None, message: str = "在吗？") -> None:
        """One complete exchange (a user message and its reply) in a conversation, via /chat/stream."""
        answer = requests.post(
            f"{self.chat_url}/chat/stream",
            json={"role_code": role_code, "message": message},
            headers=self.headers("POST", "/chat/stream", token),
            timeout=30,
        )
        assert answer.status_code == 200, answer.text[:300]
        assert answer.text.endswith("data: [DONE]\n\n"), answer.text[-300:]


@pytest.fixture(scope="module", params=BACKENDS)
def live_db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh database of the services' own on each backend (MySQL only with AICHAT_TEST_MYSQL_URL)."""
    if request.param == "mysql":
        with fresh_mysql_database("aichat_openapi") as url:
            yield url
    else:
        yield f"sqlite:///{tmp_path_factory.mktemp('openapi-db') / 'aichat.db'}"


@pytest.fixture(scope="module")
def live(
    start_server,
    fake_llm_server,
    fake_tools_server: FakeTools,
    fake_tts_server: FakeTts,
    live_db_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> LiveServices:
    """LoginService (console SMS) and ChatService on a fresh database, every provider a loopback fake.

    The model is FakeLLM, the tools' providers FakeTools, text-to-speech FakeTts, and the audio store a
    directory of the test's own (LoginService sees it too, to erase a deleted account's audio): no request,
    generated or not, leaves the machine. The test account's naitang conversation is seeded with one
    exchange, so regenerate and edit have a user message to work on from the start.
    """
    db_url = live_db_url
    audio_dir = str(tmp_path_factory.mktemp("openapi-audio"))  # one per backend: message ids overlap
    fake_llm_server.reset()  # no scripted failure left over from another test
    fake_tools_server.reset()
    fake_tts_server.reset()
    login = start_server("login", AICHAT_DB_URL=db_url, AICHAT_AUDIO_DIR=audio_dir)
    # The per-user limits would turn most generated requests into 429s: lift them so the operations get tested.
    limits = {
        "AICHAT_CHAT_MESSAGES_PER_MINUTE": 1_000_000,
        "AICHAT_CHAT_MAX_CONCURRENT_STREAMS": 1_000,
        "AICHAT_TOOL_EXECUTE_PER_MINUTE": 1_000_000,
        "AICHAT_VOICE_PER_MINUTE": 1_000_000,
        "AICHAT_VOICE_CHARS_PER_DAY": 1_000_000_000,
    }
    providers = {
        **fake_tools_server.env(),
        "AICHAT_DASHSCOPE_BASE_URL": fake_tts_server.base_url,
        "AICHAT_AUDIO_STORE": "local",
        "AICHAT_AUDIO_DIR": audio_dir,
        "AICHAT_TOOL_TIMEOUT": "5",
        "AICHAT_TTS_TIMEOUT": "5",
    }
    env = chat_env(fake_llm_server, db_url, **limits, **providers)
    # Every provider the settings can name (ENV_VARS lists them all, a new one included) is on loopback.
    provider_urls = {name for name, (field, _) in ENV_VARS.items() if field.endswith("_base_url")}
    outside = {name: env.get(name) for name in provider_urls if not str(env.get(name, "")).startswith(LOOPBACK)}
    assert not outside, f"providers a generated request could reach outside this machine: {outside}"
    chat = start_server("chat", **env)
    answer = requests.post(f"{login.base_url}/login", json=TEST_ACCOUNT, timeout=30)
    assert answer.status_code == 200, answer.text
    operations = spec_operations(load_spec())
    roles = requests.get(f"{chat.base_url}/chat/roles", timeout=30).json()["roles"]
    services = LiveServices(
        login=login,
        chat_url=chat.base_url,
        token=answer.json()["access_token"],
        uid=answer.json()["user"]["uid"],
        bearer_paths=frozenset((op["method"], op["path"]) for op in operations.values() if op["auth"] == "bearer_jwt"),
        operation_ids={(op["method"], op["path"]): op_id for op_id, op in operations.items()},
        roles=frozenset(role["role_code"] for role in roles),
        addresses=itertools.count(),
    )
    services.seed("naitang")
    return services


def error_shape(ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case) -> None:
    """Every 4xx and 5xx answer is the contract's error JSON with a known code and the status that code uses.

    (A 2xx is a success; /chat/voice's 302 and 304 have no body.)
    """
    assert response.headers.get("x-request-id"), "no X-Request-Id header"
    if response.status_code < 400:
        assert response.status_code < 300 or not response.content, "a redirect or 304 with a body"
        return
    content_type = (response.headers.get("content-type") or [""])[0]
    assert content_type.startswith("application/json"), f"error answered as {content_type!r}: {response.text[:200]!r}"
    body = json.loads(response.text)
    assert isinstance(body, dict), f"error body is not an object: {body!r}"
    assert set(body) == {"success", "code", "message"}, f"error body keys {sorted(body)}"
    assert body["success"] is False
    assert isinstance(body["message"], str) and body["message"], "error message is empty"
    assert body["code"] in CATALOG, f"unknown error code {body['code']!r}"
    allowed = {CATALOG[body["code"]][0]} | {status for code, status in EXTRA_STATUSES if code == body["code"]}
    assert response.status_code in allowed, f"{body['code']} answered with HTTP {response.status_code}"


def not_a_server_error(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> None:
    """With healthy fakes no request may end in a 5xx (500, 502 and 504 are documented but never expected).

    Except a tool run by hand that fails on what it was given: a city or a time zone nobody knows is the
    tool's 502 `ToolFailed` however healthy its provider is.
    """
    if response.status_code == 502 and case.operation.path == "/chat/tool/execute":
        body = json.loads(response.text)
        assert body["code"] == "ToolFailed", body
        arguments = case.body.get("arguments") if isinstance(case.body, dict) else None
        assert isinstance(arguments, dict) and {"city", "timezone"} & set(arguments), (case.body, body)
        return
    assert response.status_code < 500, f"server error {response.status_code}: {response.text[:300]!r}"


def sse_frames(ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case) -> None:
    """A stream is `data: <JSON chunk>` events with choices, ending with exactly one `data: [DONE]`."""
    content_type = (response.headers.get("content-type") or [""])[0]
    if response.status_code != 200 or not content_type.startswith("text/event-stream"):
        return
    events = sse_events(response.text)
    if response.stream_cut_short:  # schemathesis stopped reading at max-stream-events: no [DONE] to see
        events = [*events[:-1], "data: [DONE]", ""]
    assert events[-2:] == ["data: [DONE]", ""], f"the stream does not end with data: [DONE]: {response.text[-200:]!r}"
    for event in events[:-2]:
        assert event.startswith("data: "), f"not a data event: {event[:200]!r}"
        chunk = json.loads(event.removeprefix("data: "))
        assert isinstance(chunk, dict) and isinstance(chunk.get("choices"), list), f"not a chunk: {event[:200]!r}"
        assert "error" not in chunk, f"fallback frame from a healthy upstream: {event[:300]!r}"
    if not response.stream_cut_short:
        stream_chunks([event.removeprefix("data: ") for event in events[:-2]])


CHECKS = [
    not_a_server_error,
    error_shape,
    sse_frames,
    *(
        getattr(openapi_checks, name)
        for name in (
            "status_code_conformance",
            "content_type_conformance",
            "response_headers_conformance",
            "response_schema_conformance",
            "unsupported_method",
            "missing_required_header",
            "ignored_auth",
        )
    ),
]


def per_event_document() -> dict[str, Any]:
    """The document with each event stream's `schema` replaced by the schema of one event."""
    # The document keeps `type: string` for the whole text/event-stream body and names one event's schema
    # in `x-sse-event-schema` (OpenAPI 3.2's `itemSchema`). schemathesis reads a pre-3.2 stream `schema`
    # as one event's, so handing it that schema makes it validate every event of every stream.
    spec = load_spec()
    responses = list(spec["components"]["responses"].values())
    for item in spec["paths"].values():
        for method in HTTP_METHODS:
            responses.extend(item.get(method, {}).get("responses", {}).values())
    for response in responses:  # a $ref entry has no content: the component it names is in the list
        media = response.get("content", {}).get("text/event-stream")
        if media is not None:
            media["schema"] = media.pop("x-sse-event-schema")
    return spec


SCHEMA = schemathesis.openapi.from_dict(
    per_event_document(),
    config=schemathesis.Config.from_dict(
        {
            "seed": 20260326,
            "max-stream-events": 10_000,  # read every stream to its end
            "generation": {"max-examples": 30, "database": "none", "deterministic": False},
            "phases": {"stateful": {"enabled": False}},
            "suppress-health-check": ["all"],  # generator health is not what this test is about
        }
    ),
)


def spread_idempotency_keys(case: schemathesis.Case, n: int) -> None:
    """Make a generated turn case's well-formed idempotency key its own (header and body alike).

    The generator draws keys from a small space, so without this most cases of a turn operation would
    reuse an earlier case's key with another body and answer 422; malformed keys are left as generated
    (400), and repeats of one key are pinned by the hand-written tests below.
    """
    fresh: dict[str, str] = {}

    def own(key: Any) -> Any:
        return fresh.setdefault(key, f"{key[:40]}-{n}") if isinstance(key, str) and KEY_RE.fullmatch(key) else key

    for name, value in (case.headers or {}).items():
        if name.lower() == "idempotency-key":
            case.headers[name] = own(value)
    if isinstance(case.body, dict) and BODY_FIELD in case.body:
        case.body[BODY_FIELD] = own(case.body[BODY_FIELD])


@SCHEMA.parametrize()
def test_live_services_conform_to_the_document(case: schemathesis.Case, live: LiveServices) -> None:
    """Generated requests (examples, coverage, fuzzing) get documented, well-formed answers and never a 5xx.

    Every case runs as the test account, except those that end sessions or change the account: `logout`
    gets a fresh token of its own per case (it ends the session of the token it is sent), and
    `account_delete` (it erases the user), `logout_all` (it ends every session of the user) and
    `password_set` (a change ends the user's other sessions) a freshly signed-up throwaway user per case,
    so none disturbs the cases after it. Before each `chat_regenerate`/`chat_edit` case for a real role,
    one exchange is seeded into that conversation so the happy path is reachable whatever
    `chat_clear`/`chat_delete_message` cases ran before. A turn case's idempotency key is made its own
    (`spread_idempotency_keys`).
    """
    # The operation's own method: the coverage phase also sends other methods to its path (expecting 405).
    operation_id = live.operation_ids[(case.operation.method.upper(), case.operation.path)]
    token = None
    if operation_id == "logout":
        token = live.fresh_test_account_token()
    elif operation_id in ("account_delete", "logout_all", "password_set"):
        _, token = live.new_account()
    elif operation_id in ("chat_regenerate", "chat_edit"):
        role_code = case.body.get("role_code") if isinstance(case.body, dict) else None
        if isinstance(role_code, str) and role_code in live.roles:
            live.seed(role_code)
    if operation_id in TURNS:
        spread_idempotency_keys(case, next(live.addresses))
    headers = live.headers(case.method, case.path, token)
    case.call_and_validate(base_url=live.base_url(case.path), headers=headers, checks=CHECKS, timeout=30)


# -- hand-written hostile requests -----------------------------------------------------------------
# Generated data never holds these (schemathesis sends valid UTF-8, small numbers, shallow JSON), so they
# are spelled out; each is checked like a generated case, plus its expected status where one is certain.

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAAAAAAAA="  # a 2x2 PNG header (signature, IHDR), then zeros
DEEP_JSON = "[" * 30_000 + "]" * 30_000  # under LoginService's 64 KiB cap, far over json's recursion limit


HOSTILE = [
    pytest.param("login", {"data": b'{"phone_number":"\xff"}'}, 400, id="login-body-not-utf8"),
    pytest.param("login", {"data": '{"phone_number":"' + "1" * 70_000 + '"}'}, 413, id="login-body-over-cap"),
    pytest.param("chat_clear", {"body": {"role_code": "\ud800"}}, 400, id="clear-lone-surrogate-role"),
    pytest.param("chat_stream", {"body": {"role_code": "naitang", "image_base64": PNG}}, 200, id="stream-image-only"),
    pytest.param("login", {"data": DEEP_JSON}, 400, id="login-deeply-nested-json"),
    pytest.param("chat_stream", {"data": DEEP_JSON}, 400, id="stream-deeply-nested-json"),
    pytest.param(
        "send_code",
        {"body": {"phone_number": "13900000001", "source_ip": "\ud800"}},
        None,
        id="send-code-lone-surrogate-source-ip",
    ),
    pytest.param(
        "chat_stream",
        {"body": {"role_code": "naitang", "message": "hi \ud800"}},
        None,
        id="stream-lone-surrogate-message",
    ),
    pytest.param(
        "chat_stream",
        {"body": {"role_code": "naitang", "message": "hi", "temperature": 10**400}},
        400,
        id="stream-huge-integer-temperature",
    ),
    pytest.param(
        "chat_stream",
        {"body": {"role_code": "naitang", "message": "hi", "max_tokens": 10**400}},
        400,
        id="stream-huge-integer-max-tokens",
    ),
    pytest.param(
        "login", {"chunked": b'{"phone_number":"' + b"1" * 70_000 + b'"}'}, 413, id="login-chunked-body-over-cap"
    ),
    pytest.param(
        "chat_stream",
        {"body": {"role_code": "naitang", "message": "hi", "max_tokens": 5.0}},
        200,
        id="stream-integral-float-max-tokens",
    ),
    pytest.param(
        "chat_regenerate",
        {"body": {"role_code": "naitang", "temperature": 10**400}},
        400,
        id="regenerate-huge-integer-temperature",
    ),
    pytest.param("chat_regenerate", {"data": DEEP_JSON}, 400, id="regenerate-deeply-nested-json"),
    pytest.param("chat_edit", {"data": DEEP_JSON}, 400, id="edit-deeply-nested-json"),
    pytest.param(
        "chat_edit",
        {"body": {"role_code": "naitang", "message": "hi", "message_id": 10**400}},
        400,
        id="edit-huge-integer-message-id",
    ),
    pytest.param("chat_delete_message", {"data": DEEP_JSON}, 400, id="delete-message-deeply-nested-json"),
    pytest.param("chat_delete_message", {"body": {"message_id": "\ud800"}}, 400, id="delete-message-lone-surrogate"),
    pytest.param("chat_send", {"data": DEEP_JSON}, 400, id="send-deeply-nested-json"),
    pytest.param(
        "chat_stream",
        {"body": {"conversation_id": "\ud800", "message": "hi"}},
        None,
        id="stream-lone-surrogate-conversation-id",
    ),
    pytest.param("chat_conversation_create", {"data": DEEP_JSON}, 400, id="conversation-create-deeply-nested-json"),
    pytest.param(
        "chat_conversation_create",
        {"body": {"role_code": "naitang", "settings": {"max_tokens": 10**400}}},
        400,
        id="conversation-create-huge-integer-max-tokens",
    ),
    pytest.param(
        "chat_conversation_create",
        {"body": {"role_code": "naitang", "title": "\ud800"}},
        None,
        id="conversation-create-lone-surrogate-title",
    ),
    pytest.param(
        "chat_conversation_update",
        {"body": {"conversation_id": "\ud800"}},
        None,
        id="conversation-update-lone-surrogate-id",
    ),
    pytest.param("chat_conversation_delete", {"data": DEEP_JSON}, 400, id="conversation-delete-deeply-nested-json"),
    pytest.param("register", {"data": DEEP_JSON}, 400, id="register-deeply-nested-json"),
    pytest.param("register", {"body": {"username": "\ud800abc", "password": "x" * 12}}, 400, id="register-surrogate"),
    pytest.param("login_password", {"data": b'{"account":"\xff","password":"p"}'}, 400, id="login-password-not-utf8"),
    pytest.param(
        "login_password",
        {"data": '{"account":"a","password":"' + "p" * 70_000 + '"}'},
        413,
        id="login-password-body-over-cap",
    ),
    pytest.param("token_refresh", {"body": {"refresh_token": "\ud800"}}, 400, id="token-refresh-lone-surrogate"),
    pytest.param("session_revoke", {"body": {"session_id": 10**400}}, 400, id="session-revoke-huge-integer"),
    pytest.param("me_update", {"data": DEEP_JSON}, 400, id="me-update-deeply-nested-json"),
    pytest.param("chat_continue", {"data": DEEP_JSON}, 400, id="continue-deeply-nested-json"),
    pytest.param("chat_continue", {"body": {"message_id": 10**400}}, 404, id="continue-huge-integer-message-id"),
    pytest.param(
        "chat_stream",
        {"body": {"role_code": "naitang", "message": "hi", "client_message_id": "\ud800"}},
        400,
        id="stream-lone-surrogate-client-message-id",
    ),
    pytest.param(
        "chat_send",
        {"body": {"role_code": "naitang", "message": "hi", "client_message_id": 10**400}},
        400,
        id="send-huge-integer-client-message-id",
    ),
]


@pytest.mark.parametrize(("operation_id", "request_kwargs", "status"), HOSTILE)
def test_hostile_requests_get_documented_answers(
    live: LiveServices, operation_id: str, request_kwargs: dict[str, Any], status: int | None
) -> None:
    """Odd but possible requests get a documented answer in the contract's shape, never a 5xx."""
    operation = SCHEMA.find_operation_by_id(operation_id)
    kwargs = dict(request_kwargs)
    if "chunked" in kwargs:  # a body from an iterator goes out with Transfer-Encoding: chunked
        kwargs["data"] = iter([kwargs.pop("chunked")])
    if "body" in kwargs:
        case = operation.Case(body=kwargs.pop("body"), media_type="application/json")
    else:  # a raw `data` body
        case = operation.Case()
    headers = {**live.headers(operation.method, operation.path), "Content-Type": "application/json"}
    base_url = live.base_url(operation.path)
    response = case.call_and_validate(base_url=base_url, headers=headers, checks=CHECKS, timeout=30, **kwargs)
    if status is not None:
        assert response.status_code == status, response.text[:300]


def test_rate_limited_send_code_conforms(live: LiveServices) -> None:
    """A second code for one phone within the cooldown is a documented 429 RateLimited with Retry-After."""
    operation = SCHEMA.find_operation_by_id("send_code")
    answers = []
    for _ in range(2):
        case = operation.Case(body={"phone_number": "13900000002"}, media_type="application/json")
        headers = live.headers(operation.method, operation.path)
        answers.append(case.call_and_validate(base_url=live.login_url, headers=headers, checks=CHECKS, timeout=30))
    assert [answer.status_code for answer in answers] == [200, 429]
    assert json.loads(answers[1].text)["code"] == "RateLimited"
    assert 1 <= int(answers[1].headers["retry-after"][0]) <= 60


# -- the extension operations, by hand -------------------------------------------------------------
# The generated run checks every answer against the document; these pin the behaviour a generator cannot
# reach or judge (revocation, erasure, paging, rewinding a conversation), each call checked like a
# generated case. Each test works on its own freshly signed-up user unless it says otherwise.


def call(
    live: LiveServices,
    operation_id: str,
    *,
    token: str | None = None,
    body: Any = None,
    query: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    checks: list[Any] | None = None,
    **kwargs: Any,
) -> schemathesis.Response:
    """One request to an operation (as `token`'s user, default the test account), checked like a generated case."""
    operation = SCHEMA.find_operation_by_id(operation_id)
    if body is not None:
        case = operation.Case(body=body, media_type="application/json", query=query)
    else:
        case = operation.Case(query=query)
    headers = {**live.headers(operation.method, operation.path, token), **(headers or {})}
    if "data" in kwargs:
        headers["Content-Type"] = "application/json"
    base_url = live.base_url(operation.path)
    checks = CHECKS if checks is None else checks
    return case.call_and_validate(base_url=base_url, headers=headers, checks=checks, timeout=30, **kwargs)


def answer(response: schemathesis.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The JSON body of a response that must have `status` (and error `code`)."""
    assert response.status_code == status, response.text[:300]
    body = json.loads(response.text)
    if code is not None:
        assert body["code"] == code, body
    return body


def history(live: LiveServices, token: str | None = None, role_code: str = "naitang", **paging: Any) -> dict:
    """A conversation's history (or one page of it)."""
    return answer(call(live, "chat_history", token=token, query={"role_code": role_code, **paging}), 200)


def test_me_answers_the_masked_profile(live: LiveServices) -> None:
    """/me names the token's user; a mainland number is masked to 138****8000 form, short ones keep fewer digits."""
    body = answer(call(live, "me"), 200)
    assert body["user"]["uid"] == live.uid
    assert (body["user"]["phone_number"], body["user"]["country_code"]) == ("1**86", "86")
    phone = random_phone()
    uid, token = live.new_account(phone)
    user = answer(call(live, "me", token=token), 200)["user"]
    assert user == {
        "uid": uid,
        "phone_number": phone[:3] + "****" + phone[-4:],
        "country_code": "86",
        "created_at": user["created_at"],
        # A phone account has no username, email or profile yet, and no password.
        "username": None,
        "email": None,
        "nickname": None,
        "avatar_url": None,
        "bio": None,
        "has_password": False,
    }


def test_me_masks_a_six_digit_number_in_place(live: LiveServices) -> None:
    """A masked number keeps the number's length, each character the digit itself or `*`."""
    _, token = live.new_account("123456", country_code="44")
    masked = answer(call(live, "me", token=token), 200)["user"]["phone_number"]
    assert len(masked) == 6, masked
    assert all(shown in (digit, "*") for shown, digit in zip(masked, "123456", strict=True)), masked


def test_logout_revokes_the_token_on_both_services(live: LiveServices) -> None:
    """After /logout the same token is 401 everywhere (both services, /logout itself); other tokens still work."""
    token = live.fresh_test_account_token()
    too_large = call(live, "logout", token=token, data=b"{" + b" " * 70_000 + b"}")
    answer(too_large, 413, "PayloadTooLarge")  # refused before the handler: the token is not revoked
    answer(call(live, "me", token=token), 200)
    assert answer(call(live, "logout", token=token), 200) == {"success": True, "message": "已退出登录"}
    for operation_id, query in (("me", None), ("logout", None), ("chat_history", {"role_code": "naitang"})):
        answer(call(live, operation_id, token=token, query=query), 401, "Unauthorized")
    answer(call(live, "chat_stream", token=token, body={"role_code": "naitang", "message": "hi"}), 401)
    assert answer(call(live, "me"), 200)["user"]["uid"] == live.uid  # the session's own token is untouched


def test_account_delete_erases_the_user(live: LiveServices) -> None:
    """/account/delete counts the erased messages, revokes every token of the user; a new login is a new user."""
    phone = random_phone()
    uid, token = live.new_account(phone)
    other_token = issue_token(uid, secret=TEST_SECRET, ttl_s=3600)  # a second session of the same user
    live.seed("naitang", token)
    live.seed("wanqing", token)
    body = answer(call(live, "account_delete", token=token), 200)
    assert body == {"success": True, "message": "账号已注销", "deleted_messages": 4}
    for each in (token, other_token):
        answer(call(live, "me", token=each), 401, "Unauthorized")
        answer(call(live, "chat_history", token=each, query={"role_code": "naitang"}), 401, "Unauthorized")
        answer(call(live, "account_delete", token=each), 401, "Unauthorized")
    new_uid, new_token = live.new_account(phone)  # the resend cooldown went with the account
    assert new_uid != uid
    assert history(live, new_token)["messages"] == []


def test_history_pages_back_through_a_conversation(live: LiveServices) -> None:
    """limit/before_id page newest-first through the conversation; without them the contract's answer."""
    _, token = live.new_account()
    for n in range(3):
        live.seed("naitang", token, message=f"第 {n} 条")
    whole = history(live, token)
    assert set(whole) == {"success", "role_code", "messages"}  # no paging fields without paging parameters
    ids = [message["id"] for message in whole["messages"]]
    assert len(ids) == 6 and ids == sorted(ids)
    first = history(live, token, limit=4)
    assert [m["id"] for m in first["messages"]] == ids[2:]
    assert (first["has_more"], first["next_before_id"]) == (True, ids[2])
    second = history(live, token, limit=4, before_id=first["next_before_id"])
    assert [m["id"] for m in second["messages"]] == ids[:2]
    assert (second["has_more"], second["next_before_id"]) == (False, None)
    exact = history(live, token, limit=6)
    assert [m["id"] for m in exact["messages"]] == ids and exact["has_more"] is False
    default_size = history(live, token, before_id=ids[-1])
    assert [m["id"] for m in default_size["messages"]] == ids[:-1] and default_size["has_more"] is False
    assert set(history(live, token, limit="")) == {"success", "role_code", "messages"}  # empty counts as absent


@pytest.mark.parametrize(
    "paging",
    [
        {"limit": 0},
        {"limit": 201},
        {"limit": -1},
        {"limit": "abc"},
        {"limit": "2.0"},
        {"limit": "+5"},
        {"before_id": 0},
        {"before_id": 2**63},
        {"before_id": "1e3"},
    ],
    ids=str,
)
def test_history_refuses_bad_paging(live: LiveServices, paging: dict[str, Any]) -> None:
    """A limit outside 1..200 or a before_id outside 1..2^63-1 (or not plain digits) is 400 InvalidInput."""
    answer(call(live, "chat_history", query={"role_code": "naitang", **paging}), 400, "InvalidInput")


def test_delete_message_deletes_only_the_users_own(live: LiveServices) -> None:
    """A user's message goes (once); an unknown id or another user's message is 404; a bad id is 400."""
    _, token = live.new_account()
    live.seed("naitang", token)
    mine = [message["id"] for message in history(live, token)["messages"]]
    live.seed("naitang")  # the test account's conversation may have been cleared by an earlier test
    theirs = history(live)["messages"][-1]["id"]
    deleted = answer(call(live, "chat_delete_message", token=token, body={"message_id": mine[0]}), 200)
    assert deleted == {"success": True, "message": "消息已删除", "deleted_count": 1}
    assert [message["id"] for message in history(live, token)["messages"]] == mine[1:]
    for message_id in (mine[0], theirs, 0, -1, 2**63 - 1):
        response = call(live, "chat_delete_message", token=token, body={"message_id": message_id})
        answer(response, 404, "MessageNotFound")
    assert theirs in [message["id"] for message in history(live)["messages"]]
    for body in ({}, {"message_id": None}, {"message_id": str(mine[1])}, {"message_id": True}, {"message_id": 1.5}):
        answer(call(live, "chat_delete_message", token=token, body=body), 400, "InvalidInput")


def test_delete_message_with_an_id_beyond_64_bits(live: LiveServices) -> None:
    """An id no message can have is simply not found."""
    answer(call(live, "chat_delete_message", body={"message_id": 2**63}), 404, "MessageNotFound")


def test_delete_message_takes_an_integral_number(live: LiveServices) -> None:
    """message_id is a JSON Schema integer: an integral number such as 7.0 names message 7."""
    _, token = live.new_account()
    live.seed("naitang", token)
    message_id = history(live, token)["messages"][0]["id"]
    response = call(live, "chat_delete_message", token=token, body={"message_id": float(message_id)})
    answer(response, 200)


def stream_frames(response: schemathesis.Response) -> list[str]:
    """The payloads of a 200 event stream, [DONE] last."""
    assert response.status_code == 200, response.text[:300]
    assert response.text.endswith("data: [DONE]\n\n")
    return [event.removeprefix("data: ") for event in sse_events(response.text) if event]


def test_regenerate_replaces_the_last_reply(live: LiveServices) -> None:
    """/chat/regenerate streams a new reply to the last user message; the old reply is gone."""
    _, token = live.new_account()
    body = {"role_code": "naitang", "temperature": 0.5}
    answer(call(live, "chat_regenerate", token=token, body=body), 400, "InvalidInput")  # nothing to answer yet
    live.seed("naitang", token, message="今天有点累。")
    before = history(live, token)["messages"]
    frames = stream_frames(call(live, "chat_regenerate", token=token, body=body))
    assert frames[-1] == "[DONE]" and len(frames) > 1
    after = history(live, token)["messages"]
    assert after[0] == before[0]  # the user message stays as it was
    assert len(after) == 2 and after[1]["sender_role"] == "assistant" and after[1]["id"] > before[1]["id"]
    answer(call(live, "chat_regenerate", token=token, body={"role_code": "nobody"}), 404, "RoleNotFound")
    answer(call(live, "chat_regenerate", token=token, body={"role_code": "naitang", "top_p": 0}), 400, "InvalidInput")
    answer(call(live, "chat_regenerate", token=token, body={"temperature": 1}), 400, "InvalidInput")


def test_edit_replaces_the_last_user_message(live: LiveServices) -> None:
    """/chat/edit rewrites the last user message (same id) and streams a new reply; only that message is editable."""
    _, token = live.new_account()
    edit = {"role_code": "naitang", "message": "其实我今天挺开心的。"}
    answer(call(live, "chat_edit", token=token, body=edit), 400, "InvalidInput")  # no user message yet
    live.seed("naitang", token, message="第一条")
    live.seed("naitang", token, message="第二条")
    before = history(live, token)["messages"]
    last_user = before[2]
    for wrong in (before[0]["id"], before[3]["id"]):  # an earlier user message, the reply
        answer(call(live, "chat_edit", token=token, body={**edit, "message_id": wrong}), 400, "InvalidInput")
    answer(call(live, "chat_edit", token=token, body={**edit, "message_id": "x"}), 400, "InvalidInput")
    stream_frames(call(live, "chat_edit", token=token, body={**edit, "message_id": last_user["id"]}))
    after = history(live, token)["messages"]
    assert after[:2] == before[:2]
    assert (after[2]["id"], after[2]["content"]) == (last_user["id"], edit["message"])
    assert len(after) == 4 and after[3]["sender_role"] == "assistant" and after[3]["id"] > before[3]["id"]
    stream_frames(call(live, "chat_edit", token=token, body={"role_code": "naitang", "prompt": "再改一次"}))
    assert history(live, token)["messages"][2]["content"] == "再改一次"
    answer(call(live, "chat_edit", token=token, body={"role_code": "naitang"}), 400, "InvalidInput")
    answer(call(live, "chat_edit", token=token, body={**edit, "image_base64": "not base64"}), 400, "InvalidImage")


# -- conversations, /chat/send and the stream's framing, by hand --------------------------------------

# The checks for a scripted upstream failure: a fallback frame or a 502 is then the expected answer.
FAILURE_CHECKS = [check for check in CHECKS if check not in (sse_frames, not_a_server_error)]
HISTORY_FIELDS = ("id", "sender_role", "content", "has_image", "is_partial", "created_at")


def new_conversation(live: LiveServices, token: str, role_code: str = "naitang", **fields: Any) -> dict[str, Any]:
    """A freshly created conversation of `token`'s user."""
    body = {"role_code": role_code, **fields}
    return answer(call(live, "chat_conversation_create", token=token, body=body), 200)["conversation"]


def conversation(live: LiveServices, conversation_id: str, token: str) -> dict[str, Any]:
    """One conversation, as /chat/conversation answers it."""
    query = {"conversation_id": conversation_id}
    return answer(call(live, "chat_conversation", token=token, query=query), 200)["conversation"]


def conversations(live: LiveServices, token: str, **query: Any) -> dict[str, Any]:
    """One page of /chat/conversations."""
    return answer(call(live, "chat_conversations", token=token, query=query or None), 200)


def streamed(response: schemathesis.Response) -> list[dict[str, Any]]:
    """The checked chunks of a 200 event stream ([DONE] left out)."""
    return stream_chunks(stream_frames(response)[:-1])


def test_conversations_are_created_read_updated_and_deleted(live: LiveServices) -> None:
    """A new conversation starts empty with its title and settings; it can be read, listed, changed and deleted."""
    _, token = live.new_account()
    created = new_conversation(live, token, title="睡前聊天", settings={"temperature": 0.8, "max_tokens": 256})
    conversation_id = created["conversation_id"]
    assert isinstance(conversation_id, str) and conversation_id
    assert (created["role_code"], created["title"], created["is_default"]) == ("naitang", "睡前聊天", False)
    assert (created["message_count"], created["last_message_at"]) == (0, None)
    settings = created["settings"]
    assert (settings["temperature"], settings["max_tokens"]) == (0.8, 256)
    assert (settings["top_p"], settings["presence_penalty"], settings["frequency_penalty"]) == (None, None, None)
    assert settings["thinking_enabled"] is False and isinstance(settings["model"], str) and settings["model"]
    assert conversation(live, conversation_id, token) == created
    listed = conversations(live, token, role_code="naitang")["conversations"]
    assert [each for each in listed if each["conversation_id"] == conversation_id] == [created]
    assert conversation_id in [each["conversation_id"] for each in conversations(live, token)["conversations"]]
    others = conversations(live, token, role_code="wanqing")["conversations"]
    assert conversation_id not in [each["conversation_id"] for each in others]

    change = {"conversation_id": conversation_id, "title": "周末计划", "settings": {"temperature": None, "top_p": 0.5}}
    updated = answer(call(live, "chat_conversation_update", token=token, body=change), 200)["conversation"]
    assert updated["title"] == "周末计划"
    assert updated["settings"] == {**settings, "temperature": None, "top_p": 0.5}  # the others stay as they were
    assert conversation(live, conversation_id, token) == updated
    rename = {"conversation_id": conversation_id, "settings": {"thinking_enabled": True}}
    renamed = answer(call(live, "chat_conversation_update", token=token, body=rename), 200)["conversation"]
    assert renamed["title"] == "周末计划" and renamed["settings"] == {**updated["settings"], "thinking_enabled": True}

    deleted = answer(
        call(live, "chat_conversation_delete", token=token, body={"conversation_id": conversation_id}), 200
    )
    assert deleted == {"success": True, "message": "会话已删除", "deleted_count": 0}
    gone = {"conversation_id": conversation_id}
    answer(call(live, "chat_conversation", token=token, query=gone), 404, "ConversationNotFound")
    answer(
        call(live, "chat_conversation_update", token=token, body={**gone, "title": "x"}), 404, "ConversationNotFound"
    )
    answer(call(live, "chat_conversation_delete", token=token, body=gone), 404, "ConversationNotFound")
    assert conversation_id not in [each["conversation_id"] for each in conversations(live, token)["conversations"]]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"role_code": "naitang", "title": 5},
        {"role_code": "naitang", "title": "长" * 101},
        {"role_code": "naitang", "settings": "hot"},
        {"role_code": "naitang", "settings": []},
        {"role_code": "naitang", "settings": False},
        {"role_code": "naitang", "settings": 0},
        {"role_code": "naitang", "settings": {"bogus": 1}},
        {"role_code": "naitang", "settings": {"temperature": 2.5}},
        {"role_code": "naitang", "settings": {"temperature": "0.5"}},
        {"role_code": "naitang", "settings": {"top_p": 0}},
        {"role_code": "naitang", "settings": {"max_tokens": 1.5}},
        {"role_code": "naitang", "settings": {"max_tokens": 8193}},
        {"role_code": "naitang", "settings": {"presence_penalty": -3}},
        {"role_code": "naitang", "settings": {"frequency_penalty": 2.5}},
        {"role_code": "naitang", "settings": {"thinking_enabled": "yes"}},
        {"role_code": "naitang", "settings": {"model": "no-such-model"}},
        {"role_code": "naitang", "settings": {"model": 5}},
    ],
    ids=str,
)
def test_conversation_create_refuses_bad_input(live: LiveServices, body: dict[str, Any]) -> None:
    """A missing role_code, a title that is no string or too long, or bad settings are 400 InvalidInput."""
    answer(call(live, "chat_conversation_create", body=body), 400, "InvalidInput")


def test_conversation_operations_refuse_bad_input(live: LiveServices) -> None:
    """Unknown roles are 404 RoleNotFound; a missing conversation_id or bad settings on update are 400."""
    _, token = live.new_account()
    conversation_id = new_conversation(live, token)["conversation_id"]
    answer(call(live, "chat_conversation_create", token=token, body={"role_code": "nobody"}), 404, "RoleNotFound")
    answer(call(live, "chat_conversations", token=token, query={"role_code": "nobody"}), 404, "RoleNotFound")
    answer(call(live, "chat_conversation", token=token), 400, "InvalidInput")
    for body in ({}, {"title": "x"}, {"conversation_id": conversation_id, "settings": {"bogus": 1}}):
        answer(call(live, "chat_conversation_update", token=token, body=body), 400, "InvalidInput")
    too_long = {"conversation_id": conversation_id, "title": "长" * 101}
    answer(call(live, "chat_conversation_update", token=token, body=too_long), 400, "InvalidInput")
    answer(call(live, "chat_conversation_delete", token=token, body={}), 400, "InvalidInput")
    assert conversation(live, conversation_id, token)["title"] == ""  # nothing changed


def test_conversations_page_most_recently_active_first(live: LiveServices) -> None:
    """The list pages with limit/next_cursor through every conversation once; a new message moves one first."""
    _, token = live.new_account()
    ids = [new_conversation(live, token, title=f"会话 {n}")["conversation_id"] for n in range(3)]
    time.sleep(1.1)  # activity times have a resolution of one second
    streamed(call(live, "chat_stream", token=token, body={"conversation_id": ids[0], "message": "在吗？"}))
    whole = conversations(live, token, limit=100)
    assert (whole["has_more"], whole["next_cursor"]) == (False, None)
    order = [each["conversation_id"] for each in whole["conversations"]]
    assert set(ids) <= set(order) and next(each for each in order if each in ids) == ids[0]
    paged: list[str] = []
    page = conversations(live, token, limit=1)
    while True:
        assert len(page["conversations"]) == 1
        paged.append(page["conversations"][0]["conversation_id"])
        if not page["has_more"]:
            assert page["next_cursor"] is None
            break
        assert isinstance(page["next_cursor"], str) and page["next_cursor"]
        page = conversations(live, token, limit=1, cursor=page["next_cursor"])
    assert paged == order
    default_size = conversations(live, token)["conversations"]
    assert [each["conversation_id"] for each in default_size] == order  # default limit 20
    for query in ({"limit": 0}, {"limit": 101}, {"limit": "x"}, {"cursor": "not-a-cursor"}):
        answer(call(live, "chat_conversations", token=token, query=query), 400, "InvalidInput")


def test_a_conversation_streams_regenerates_edits_and_clears_apart(
    live: LiveServices, fake_llm_server: FakeLLM
) -> None:
    """With conversation_id every turn operation works on that conversation; the role's default stays as it was."""
    _, token = live.new_account()
    created = new_conversation(live, token, settings={"temperature": 0.3})
    conversation_id = created["conversation_id"]
    assert created["title"] == ""
    live.seed("naitang", token)  # the role's default conversation
    default_before = history(live, token)
    text = "今天想换个话题：聊聊周末去西湖边散步看日落，再吃一碗片儿川的计划，你觉得怎么样？"
    chunks = streamed(
        call(live, "chat_stream", token=token, body={"conversation_id": conversation_id, "message": text})
    )
    meta, done = chunks[0]["x_event"], chunks[-1]["x_event"]
    assert (meta["conversation_id"], meta["role_code"], done["type"]) == (conversation_id, "naitang", "done")
    own = history(live, token, conversation_id=conversation_id)
    assert (own["role_code"], own["conversation_id"]) == ("naitang", conversation_id)
    user, reply = own["messages"]
    assert (user["id"], user["sender_role"], user["content"]) == (meta["message_id"], "user", text)
    assert (reply["id"], reply["sender_role"], reply["content"]) == (
        done["message_id"],
        "assistant",
        reply_text(chunks),
    )
    assert history(live, token) == default_before
    roleless = answer(call(live, "chat_history", token=token, query={"conversation_id": conversation_id}), 200)
    assert roleless == own
    assert fake_llm_server.requests[-1]["body"]["temperature"] == 0.3  # the conversation's settings apply
    info = conversation(live, conversation_id, token)
    assert (info["message_count"], info["title"], info["is_default"]) == (2, text[:30], False)
    assert info["last_message_at"] is not None

    wrong_role = {"conversation_id": conversation_id, "role_code": "wanqing", "message": "hi"}
    answer(call(live, "chat_stream", token=token, body=wrong_role), 400, "InvalidInput")
    answer(call(live, "chat_send", token=token, body=wrong_role), 400, "InvalidInput")
    query = {"conversation_id": conversation_id, "role_code": "wanqing"}
    answer(call(live, "chat_history", token=token, query=query), 400, "InvalidInput")

    model = created["settings"]["model"]
    regenerate = {"conversation_id": conversation_id, "temperature": 1.1, "model": model, "thinking_enabled": False}
    again = streamed(call(live, "chat_regenerate", token=token, body=regenerate))
    upstream = fake_llm_server.requests[-1]["body"]
    assert (upstream["temperature"], upstream["model"]) == (1.1, model)  # the turn's own settings win
    after = history(live, token, conversation_id=conversation_id)["messages"]
    assert after[0] == user and len(after) == 2 and after[1]["id"] == again[-1]["x_event"]["message_id"] > reply["id"]
    assert after[1]["content"] == reply_text(again)
    edit = {"conversation_id": conversation_id, "role_code": "naitang", "message": "其实我今天挺开心的。"}
    edited = streamed(call(live, "chat_edit", token=token, body=edit))
    after = history(live, token, conversation_id=conversation_id)["messages"]
    assert (after[0]["id"], after[0]["content"]) == (user["id"], edit["message"])
    assert edited[0]["x_event"]["message_id"] == user["id"]
    assert len(after) == 2 and after[1]["content"] == reply_text(edited)
    assert history(live, token) == default_before

    cleared = answer(call(live, "chat_clear", token=token, body={"conversation_id": conversation_id}), 200)
    assert cleared["deleted_count"] == 2
    assert history(live, token, conversation_id=conversation_id)["messages"] == []
    assert conversation(live, conversation_id, token)["message_count"] == 0
    assert history(live, token) == default_before
    streamed(call(live, "chat_stream", token=token, body={"conversation_id": conversation_id, "message": "再来"}))
    body = {"conversation_id": conversation_id}
    deleted = answer(call(live, "chat_conversation_delete", token=token, body=body), 200)
    assert deleted == {"success": True, "message": "会话已删除", "deleted_count": 2}
    assert history(live, token) == default_before


def test_the_default_conversation_is_the_contracts_history(live: LiveServices) -> None:
    """A turn without conversation_id lands in the role's default conversation, which the list shows as such."""
    _, token = live.new_account()
    chunks = streamed(call(live, "chat_stream", token=token, body={"role_code": "naitang", "message": "在吗？"}))
    conversation_id = chunks[0]["x_event"]["conversation_id"]
    assert chunks[-1]["x_event"]["conversation_id"] == conversation_id
    contract = history(live, token)
    assert set(contract) == {"success", "role_code", "messages"}
    assert [m["id"] for m in contract["messages"]] == [
        chunks[0]["x_event"]["message_id"],
        chunks[-1]["x_event"]["message_id"],
    ]
    assert contract["messages"][1]["content"] == reply_text(chunks)
    assert history(live, token, conversation_id=conversation_id) == {**contract, "conversation_id": conversation_id}
    defaults = [each for each in conversations(live, token, role_code="naitang")["conversations"] if each["is_default"]]
    assert [each["conversation_id"] for each in defaults] == [conversation_id]
    assert defaults[0]["message_count"] == 2 and defaults[0]["role_code"] == "naitang"
    assert defaults[0] == conversation(live, conversation_id, token)
    body = {"conversation_id": conversation_id, "message": "还在吗？"}
    streamed(call(live, "chat_stream", token=token, body=body))  # naming the default conversation is the same
    assert len(history(live, token)["messages"]) == 4
    # Deleting it empties the role's history; the next turn without conversation_id opens a fresh default one.
    ref = {"conversation_id": conversation_id}
    assert answer(call(live, "chat_conversation_delete", token=token, body=ref), 200)["deleted_count"] == 4
    assert history(live, token)["messages"] == []
    fresh = streamed(call(live, "chat_stream", token=token, body={"role_code": "naitang", "message": "重新开始"}))
    fresh_id = fresh[0]["x_event"]["conversation_id"]
    assert fresh_id != conversation_id
    assert conversation(live, fresh_id, token)["is_default"] is True
    assert len(history(live, token)["messages"]) == 2


def test_send_answers_the_stored_reply(live: LiveServices, fake_llm_server: FakeLLM) -> None:
    """/chat/send answers the stored reply, the user message's id and the conversation's id, as documented."""
    _, token = live.new_account()
    sent = answer(call(live, "chat_send", token=token, body={"role_code": "naitang", "message": "在吗？"}), 200)
    assert set(sent) == {"success", "message", "user_message_id", "conversation_id"} and sent["success"] is True
    reply = sent["message"]
    assert set(reply) == {*HISTORY_FIELDS, "usage"}, reply  # no reasoning_content: the model did not reason
    assert (reply["sender_role"], reply["has_image"], reply["is_partial"]) == ("assistant", False, False)
    assert reply["content"]
    if reply["usage"] is not None:
        usage = reply["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    messages = history(live, token)["messages"]
    assert [message["id"] for message in messages] == [sent["user_message_id"], reply["id"]]
    assert messages[0]["content"] == "在吗？"
    assert messages[1] == {field: reply[field] for field in HISTORY_FIELDS}
    defaults = [each for each in conversations(live, token, role_code="naitang")["conversations"] if each["is_default"]]
    assert [each["conversation_id"] for each in defaults] == [sent["conversation_id"]]

    other = new_conversation(live, token)["conversation_id"]
    fake_llm_server.enqueue(reasoning="她说累了，先安慰她。", text="抱抱你，先休息一下吧。")
    body = {"conversation_id": other, "message": "好累", "thinking_enabled": True}
    thought = answer(call(live, "chat_send", token=token, body=body), 200)
    assert thought["conversation_id"] == other
    assert (thought["message"]["content"], thought["message"]["reasoning_content"]) == (
        "抱抱你，先休息一下吧。",
        "她说累了，先安慰她。",
    )
    own = history(live, token, conversation_id=other)["messages"]
    assert [m["id"] for m in own] == [thought["user_message_id"], thought["message"]["id"]]
    assert own[1]["content"] == "抱抱你，先休息一下吧。"  # the reasoning is not part of the stored reply
    assert len(history(live, token)["messages"]) == 2


def test_send_reports_a_broken_upstream_as_502_and_keeps_the_partial_reply(
    live: LiveServices, fake_llm_server: FakeLLM
) -> None:
    """An upstream that breaks mid-reply is a 502; the user message stays and the partial reply is flagged."""
    _, token = live.new_account()
    fake_llm_server.enqueue(text="第一句。第二句。第三句。第四句。", drop_after=2)
    body = {"role_code": "naitang", "message": "讲个故事"}
    failed = answer(call(live, "chat_send", token=token, body=body, checks=FAILURE_CHECKS), 502)
    assert failed["code"] in ("NetworkError", "UpstreamHTTPError")
    user, partial = history(live, token)["messages"]
    assert (user["sender_role"], user["content"]) == ("user", "讲个故事")
    assert (partial["sender_role"], partial["is_partial"]) == ("assistant", True)
    assert partial["content"] and "第一句。第二句。第三句。第四句。".startswith(partial["content"])


def test_a_broken_stream_ends_with_the_fallback_frame(live: LiveServices, fake_llm_server: FakeLLM) -> None:
    """Mid-stream the fallback frame ends the stream: empty content, the error in `error` and `x_event`."""
    _, token = live.new_account()
    fake_llm_server.enqueue(text="第一句。第二句。第三句。第四句。", drop_after=2)
    body = {"role_code": "naitang", "message": "讲个故事"}
    response = call(live, "chat_stream", token=token, body=body, checks=FAILURE_CHECKS)
    chunks = streamed(response)
    event = chunks[-1]["x_event"]
    assert event["type"] == "error" and event["code"] == "NetworkError" and event["message"]
    assert chunks[-1]["error"] == {"code": event["code"], "message": event["message"]}
    assert chunks[-1]["choices"][0]["delta"]["content"] == ""
    messages = history(live, token)["messages"]
    assert messages[0]["id"] == chunks[0]["x_event"]["message_id"]
    partial = messages[1]
    assert (partial["id"], partial["is_partial"]) == (event["message_id"], True)
    assert partial["content"] == reply_text(chunks) and partial["content"]


def test_another_users_conversation_is_not_found(live: LiveServices) -> None:
    """Every operation answers 404 ConversationNotFound for another user's conversation, and leaves it alone."""
    _, owner = live.new_account()
    _, stranger = live.new_account()
    conversation_id = new_conversation(live, owner, title="私人会话")["conversation_id"]
    streamed(call(live, "chat_stream", token=owner, body={"conversation_id": conversation_id, "message": "秘密"}))
    before = history(live, owner, conversation_id=conversation_id)
    for unknown in (conversation_id, "0" * 24, "no-such-conversation"):
        ref = {"conversation_id": unknown}
        turn = {**ref, "role_code": "naitang", "message": "hi"}
        for operation_id, request in (
            ("chat_conversation", {"query": ref}),
            ("chat_conversation_update", {"body": {**ref, "title": "抢过来"}}),
            ("chat_conversation_delete", {"body": ref}),
            ("chat_history", {"query": {**ref, "role_code": "naitang"}}),
            ("chat_history", {"query": ref}),
            ("chat_clear", {"body": ref}),
            ("chat_stream", {"body": turn}),
            ("chat_send", {"body": turn}),
            ("chat_regenerate", {"body": ref}),
            ("chat_edit", {"body": turn}),
        ):
            response = call(live, operation_id, token=stranger, **request)
            answer(response, 404, "ConversationNotFound")
    stranger_ids = [each["conversation_id"] for each in conversations(live, stranger)["conversations"]]
    assert conversation_id not in stranger_ids
    assert history(live, owner, conversation_id=conversation_id) == before
    assert conversation(live, conversation_id, owner)["title"] == "私人会话"


@pytest.mark.parametrize(
    ("operation_id", "content_type"),
    [
        pytest.param("send_code", "text/plain", id="send-code-text-plain"),
        pytest.param("send_code", None, id="send-code-no-content-type"),
        pytest.param("login", "application/x-www-form-urlencoded", id="login-form"),
        pytest.param("register", "text/plain", id="register-text-plain"),
        pytest.param("login_password", "application/x-www-form-urlencoded", id="login-password-form"),
        pytest.param("token_refresh", None, id="token-refresh-no-content-type"),
    ],
)
def test_login_operations_refuse_a_non_json_body_as_documented(
    live: LiveServices, operation_id: str, content_type: str | None
) -> None:
    """A body that is not application/json (a CORS "simple" request) answers the documented 415."""
    operation = SCHEMA.find_operation_by_id(operation_id)
    headers = live.headers(operation.method, operation.path)
    if content_type is not None:
        headers["Content-Type"] = content_type
    body = json.dumps({**TEST_ACCOUNT, "phone_number": random_phone()})
    response = operation.Case().call_and_validate(
        base_url=live.login_url, headers=headers, checks=CHECKS, timeout=30, data=body.encode()
    )
    assert response.request.headers.get("Content-Type") == content_type  # nothing added one on the way
    answer(response, 415, "UnsupportedMediaType")
    response_validator("UnsupportedMediaType").validate(json.loads(response.text))
    assert response.headers["cache-control"] == ["no-store"]
    assert response.headers["x-content-type-options"] == ["nosniff"]


def raw_exchange(base_url: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes to a service and read its answer to the end (the server closes the connection)."""
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split(" ")[1]), headers, body


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        pytest.param(b"GET /health?" + b"x" * 5000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414, id="request-line"),
        pytest.param(b"GET /health HTTP/1.1\r\nHost: a\r\nX-Big: " + b"x" * 9000 + b"\r\n\r\n", 431, id="header"),
        pytest.param(b"GET /health HTTP/1.1\r\nHost: a\r\nExpect: teapot\r\n\r\n", 417, id="expect"),
        pytest.param(b"GET /health HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n", 400, id="content-length"),
    ],
)
def test_refused_requests_answer_the_documented_shape(live: LiveServices, request_bytes: bytes, status: int) -> None:
    """What gunicorn refuses before the app is components/responses/RefusedRequest, with the status it names."""
    answered, headers, body = raw_exchange(live.login_url, request_bytes)
    assert answered == status, body[:300]
    assert headers["content-type"].startswith("application/json")
    assert headers["x-content-type-options"] == "nosniff"
    response_validator("RefusedRequest").validate(json.loads(body))


@pytest.mark.parametrize(
    ("method", "path", "control_path"),
    [("POST", "/initialize", None), ("POST", "/initialize", "/pre-stop"), ("GET", "/pre-stop", None)],
)
def test_lifecycle_hooks_are_unknown_paths_to_clients(
    live: LiveServices, method: str, path: str, control_path: str | None
) -> None:
    """/initialize and /pre-stop without FC's matching x-fc-control-path answer the documented 404 NotFound."""
    headers = {"x-fc-control-path": control_path} if control_path else {}
    for base_url in (live.login_url, live.chat_url):
        response = requests.request(method, base_url + path, headers=headers, timeout=30)
        assert response.status_code == 404, response.text[:300]
        assert response.headers["X-Request-Id"] and response.headers["X-Content-Type-Options"] == "nosniff"
        body = response.json()
        response_validator("NotFound").validate(body)
        assert body["code"] == "NotFound"


# -- voice, continuations, idempotency keys and password accounts, by hand --------------------------------

PASSWORD = "晚风轻拂西湖-2026"
LOGIN_FIELDS = {"success", "message", "token_type", "access_token", "expires_in", "user", "is_test_account"}


def stored_reply(live: LiveServices, fake_llm: FakeLLM, token: str, text: str) -> int:
    """Have naitang say `text` (scripted) through /chat/send; the stored reply's id."""
    fake_llm.enqueue(text=text)
    sent = answer(call(live, "chat_send", token=token, body={"role_code": "naitang", "message": "说点什么"}), 200)
    return sent["message"]["id"]


def test_voice_serves_the_documented_audio(
    live: LiveServices, fake_llm_server: FakeLLM, fake_tts_server: FakeTts
) -> None:
    """/chat/voice: the MP3 with its validators, then 304, 206 and 416 exactly as documented; one synthesis."""
    _, token = live.new_account()
    message_id = stored_reply(live, fake_llm_server, token, "喵～（蹭蹭你）今天也要**开心**哦！😺")
    synthesised = fake_tts_server.synth_count()
    voice = {"message_id": message_id}
    whole = call(live, "chat_voice", token=token, query=voice)
    assert whole.status_code == 200, whole.text[:300]
    headers = whole.headers
    assert headers["content-type"] == ["audio/mpeg"] and int(headers["content-length"][0]) == len(whole.content)
    assert (headers["cache-control"], headers["accept-ranges"]) == ([voice_cache_control()], ["bytes"])
    assert whole.content[0] == 0xFF and whole.content[1] & 0xE0 == 0xE0  # an MPEG audio frame's sync
    etag = headers["etag"][0]
    unchanged = call(live, "chat_voice", token=token, query=voice, headers={"If-None-Match": etag})
    assert (unchanged.status_code, unchanged.content) == (304, b"")
    assert unchanged.headers["etag"] == [etag] and unchanged.headers["cache-control"] == [voice_cache_control()]
    part = call(live, "chat_voice", token=token, query=voice, headers={"Range": "bytes=0-99"})
    assert (part.status_code, part.content) == (206, whole.content[:100])
    assert part.headers["content-range"] == [f"bytes 0-99/{len(whole.content)}"]
    for unserved in (f"bytes={len(whole.content)}-", "bytes=0-1,4-5", "items=0-1"):
        refused = call(live, "chat_voice", token=token, query=voice, headers={"Range": unserved})
        answer(refused, 416, "InvalidInput")
        assert "content-range" not in refused.headers and refused.headers["cache-control"] == ["no-store"]
    stale = call(live, "chat_voice", token=token, query=voice, headers={"Range": "bytes=0-9", "If-Range": '"x"'})
    assert (stale.status_code, stale.content) == (200, whole.content)
    assert fake_tts_server.synth_count() == synthesised + 1  # made once, served from the store after

    user_message = history(live, token)["messages"][-2]["id"]
    answer(call(live, "chat_voice", token=token, query={"message_id": user_message}), 400, "InvalidInput")
    silent = stored_reply(live, fake_llm_server, token, "（摇尾巴）😺")
    answer(call(live, "chat_voice", token=token, query={"message_id": silent}), 400, "InvalidInput")
    answer(call(live, "chat_voice", token=token), 400, "InvalidInput")
    answer(call(live, "chat_voice", token=token, query={"message_id": 0}), 400, "InvalidInput")
    answer(call(live, "chat_voice", query=voice), 404, "MessageNotFound")  # the test account's view of it


def test_continue_streams_only_the_new_text(live: LiveServices, fake_llm_server: FakeLLM) -> None:
    """/chat/continue: `continues` in the meta frame, only the new text, the same reply grown and complete."""
    _, token = live.new_account()
    fake_llm_server.enqueue(chunks=["一", "二", "三"], drop_after=2)
    body = {"role_code": "naitang", "message": "数数"}
    cut = streamed(call(live, "chat_stream", token=token, body=body, checks=FAILURE_CHECKS))
    reply_id = cut[-1]["x_event"]["message_id"]
    asked, partial = history(live, token)["messages"]
    assert (partial["id"], partial["content"], partial["is_partial"]) == (reply_id, "一二", True)
    fake_llm_server.enqueue(chunks=["三", "四"])
    key = {"Idempotency-Key": "k_" + secrets.token_hex(8)}
    chunks = streamed(call(live, "chat_continue", token=token, body={"message_id": reply_id}, headers=key))
    meta, done = chunks[0]["x_event"], chunks[-1]["x_event"]
    assert (meta["message_id"], meta["continues"], meta["role_code"]) == (None, reply_id, "naitang")
    assert (done["type"], done["message_id"]) == ("done", reply_id)
    assert reply_text(chunks) == "三四"
    again = streamed(call(live, "chat_continue", token=token, body={"message_id": reply_id}, headers=key))
    assert (again[0]["x_event"]["continues"], again[0]["x_event"]["replayed"]) == (reply_id, True)
    assert reply_text(again) == "三四"  # a repeat too streams only what the continuation added
    messages = history(live, token)["messages"]
    assert [m["id"] for m in messages] == [asked["id"], reply_id]  # no new rows
    assert (messages[1]["content"], messages[1]["is_partial"]) == ("一二三四", False)
    answer(call(live, "chat_continue", token=token, body={"message_id": reply_id}), 400, "InvalidInput")  # complete
    answer(call(live, "chat_continue", token=token, body={"message_id": asked["id"]}), 400, "InvalidInput")
    answer(call(live, "chat_continue", token=token, body={}), 400, "InvalidInput")
    answer(call(live, "chat_continue", body={"message_id": reply_id}), 404, "MessageNotFound")  # another user's


def test_idempotency_keys_answer_as_documented(live: LiveServices, fake_llm_server: FakeLLM) -> None:
    """A repeat is the stored outcome (`replayed`), 409 while the first runs, 422 for another body, 400 if malformed."""
    _, token = live.new_account()
    body = {"role_code": "naitang", "message": "在吗"}
    key = {"Idempotency-Key": "k_" + secrets.token_hex(8)}
    fake_llm_server.enqueue(chunks=["你", "好"], usage={"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11})
    first = streamed(call(live, "chat_stream", token=token, body=body, headers=key))
    asked = len(fake_llm_server.requests)
    again = streamed(call(live, "chat_stream", token=token, body=body, headers=key))
    assert (again[0]["x_event"]["replayed"], again[-1]["x_event"]["replayed"]) == (True, True)
    for frame in (0, -1):
        assert again[frame]["x_event"]["message_id"] == first[frame]["x_event"]["message_id"]
    assert reply_text(again) == reply_text(first) and again[-1]["x_event"]["usage"]["prompt_tokens"] == 9
    assert len(fake_llm_server.requests) == asked and len(history(live, token)["messages"]) == 2

    answer(
        call(live, "chat_stream", token=token, body={**body, "message": "另一句"}, headers=key),
        422,
        "IdempotencyKeyReused",
    )
    answer(call(live, "chat_send", token=token, body=body, headers=key), 422, "IdempotencyKeyReused")
    for bad in ({"Idempotency-Key": "has space"}, {"Idempotency-Key": "x" * 65}, {"Idempotency-Key": ""}):
        answer(call(live, "chat_send", token=token, body=body, headers=bad), 400, "InvalidInput")
    mismatch = {**body, "client_message_id": "a"}
    answer(call(live, "chat_send", token=token, body=mismatch, headers={"Idempotency-Key": "b"}), 400, "InvalidInput")

    sent_body = {**body, "client_message_id": "k_" + secrets.token_hex(8)}
    sent = answer(call(live, "chat_send", token=token, body=sent_body), 200)
    assert answer(call(live, "chat_send", token=token, body=sent_body), 200) == sent

    fake_llm_server.enqueue(chunks=["慢", "慢", "说"], delay=0.6)
    slow = {"Idempotency-Key": "k_" + secrets.token_hex(8)}
    running = requests.post(
        f"{live.chat_url}/chat/stream",
        json=body,
        headers={**live.headers("POST", "/chat/stream", token), **slow},
        stream=True,
        timeout=30,
    )
    lines = running.iter_lines()
    next(lines)  # the first frame arrived: the turn runs
    busy = call(live, "chat_stream", token=token, body=body, headers=slow)
    answer(busy, 409, "RequestInProgress")
    assert int(busy.headers["retry-after"][0]) >= 1
    list(lines)
    running.close()


def test_password_accounts_and_sessions_answer_as_documented(live: LiveServices) -> None:
    """Register, password login, profile, sessions, refresh with rotation, a password change, logout everywhere."""
    name = "u_" + secrets.token_hex(5)
    account = {"username": name, "password": PASSWORD, "email": f"{name}@example.com", "nickname": "小晚"}
    registered = answer(call(live, "register", body=account), 200)["user"]
    assert (registered["username"], registered["email"]) == (name, f"{name[0]}***@example.com")
    answer(call(live, "register", body={"username": name.upper(), "password": PASSWORD}), 409, "AccountExists")
    answer(call(live, "register", body={"username": "ab", "password": PASSWORD}), 400, "InvalidInput")

    def login(**fields: Any) -> dict[str, Any]:
        return answer(call(live, "login_password", body={"account": name, "password": PASSWORD, **fields}), 200)

    first = login()
    assert set(first) == LOGIN_FIELDS | {"refresh_token", "refresh_expires_in"}
    assert first["user"] == {"uid": registered["uid"], "phone_number": "", "country_code": ""}
    assert first["is_test_account"] is False
    wrong = {"account": name, "password": "wrong-pass-123"}
    answer(call(live, "login_password", body=wrong), 401, "InvalidCredentials")
    answer(call(live, "login_password", body={"account": "u_" + secrets.token_hex(5), "password": PASSWORD}), 401)
    token = first["access_token"]
    me = answer(call(live, "me", token=token), 200)["user"]
    assert (me["username"], me["nickname"], me["has_password"], me["phone_number"]) == (name, "小晚", True, "")
    update = {"nickname": " 晚风 ", "bio": None, "avatar_url": "https://cdn.example.com/a.png"}
    updated = answer(call(live, "me_update", token=token, body=update), 200)["user"]
    assert (updated["nickname"], updated["bio"], updated["avatar_url"]) == ("晚风", None, update["avatar_url"])
    answer(call(live, "me_update", token=token, body={"username": "x"}), 400, "InvalidInput")

    second = login(account=name.upper())
    listed = answer(call(live, "sessions", token=token), 200)["sessions"]
    assert len(listed) == 2 and [s["current"] for s in listed].count(True) == 1
    other = next(s["session_id"] for s in listed if not s["current"])
    assert answer(call(live, "session_revoke", token=token, body={"session_id": other}), 200)["success"] is True
    answer(call(live, "me", token=second["access_token"]), 401, "Unauthorized")
    answer(call(live, "session_revoke", token=token, body={"session_id": other}), 404, "SessionNotFound")

    refreshed = answer(call(live, "token_refresh", body={"refresh_token": first["refresh_token"]}), 200)
    assert refreshed["refresh_token"] != first["refresh_token"]
    assert answer(call(live, "me", token=refreshed["access_token"]), 200)["user"]["uid"] == registered["uid"]
    spent = {"refresh_token": first["refresh_token"]}
    answer(call(live, "token_refresh", body=spent), 401, "Unauthorized")  # reused: the session ends
    answer(call(live, "me", token=refreshed["access_token"]), 401, "Unauthorized")
    answer(call(live, "token_refresh", body={}), 400, "InvalidInput")

    here, there = login()["access_token"], login()["access_token"]
    new_password = {"new_password": "another-Secret-42"}
    answer(call(live, "password_set", token=here, body=new_password), 400, "InvalidInput")  # current one needed
    guess = {**new_password, "current_password": "nope-nope"}
    answer(call(live, "password_set", token=here, body=guess), 401, "InvalidCredentials")
    changed = answer(call(live, "password_set", token=here, body={**new_password, "current_password": PASSWORD}), 200)
    assert changed == {"success": True, "message": "密码已修改", "ended_sessions": 1}
    answer(call(live, "me", token=there), 401, "Unauthorized")
    ended = answer(call(live, "logout_all", token=here), 200)
    assert ended == {"success": True, "message": "已在所有设备退出登录", "ended_sessions": 1}
    answer(call(live, "me", token=here), 401, "Unauthorized")


def test_a_phone_account_adds_a_password(live: LiveServices) -> None:
    """/password/set adds a password to an SMS account, which then logs in with its number and refreshes."""
    phone = random_phone()
    _, token = live.new_account(phone)
    added = answer(call(live, "password_set", token=token, body={"new_password": PASSWORD}), 200)
    assert added == {"success": True, "message": "密码已设置", "ended_sessions": 0}
    logged = answer(call(live, "login_password", body={"account": phone, "password": PASSWORD}), 200)
    assert logged["user"]["phone_number"] == phone and logged["refresh_expires_in"] > 0
    assert answer(call(live, "me", token=token), 200)["user"]["has_password"] is True  # nothing ended
