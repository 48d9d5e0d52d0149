"""docs/openapi.yaml: valid OpenAPI 3.1, in step with the route tables and the contract, honoured by the services."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
import yaml
from aichat.errors import CATALOG
from openapi_spec_validator import validate as validate_openapi
from openapi_spec_validator.validation import OpenAPIV31SpecValidator
from schemathesis.specs.openapi import checks as openapi_checks

from tests.conftest import IN_CI, chat_env
from tests.servers import LAYER, ROOT, TEST_SECRET

SPEC_PATH = ROOT / "docs" / "openapi.yaml"
CONTRACT_PATH = ROOT.parent / "shared" / "contract" / "aichat-api.md"
SERVICES = {"login": "LoginService", "chat": "ChatService"}
LOCAL_URLS = {"login": "http://127.0.0.1:9000", "chat": "http://127.0.0.1:9001"}
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
# Codes that the code answers with a status other than their CATALOG default (errors.py, llm.py, web.py).
EXTRA_STATUSES = {("SendCodeFailed", 400), ("NetworkError", 504)}
TEST_ACCOUNT = {"phone_number": "10086", "country_code": "86", "verify_code": "1234"}


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
        assert "X-Request-Id" in response["headers"], f"components/responses/{name}: no X-Request-Id header"
        assert documented_codes(spec, response), f"components/responses/{name}: no error code"
    for op in spec_operations(spec).values():
        for status, response in op["operation"]["responses"].items():
            where = f"{op['method']} {op['path']} {status}"
            response = resolve(spec, response)
            assert "X-Request-Id" in response["headers"], f"{where}: no X-Request-Id header"
            if status.startswith("2"):
                continue
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
            "429": {"RateLimited"},
            "500": {"SendCodeFailed", "DatabaseError", "MissingDatabaseConfig", "InternalError"},
        },
        "login": {
            "400": {"InvalidInput", "InvalidPhoneNumber", "InvalidVerifyCode"},
            "401": {"VerifyFailed"},
            "413": {"PayloadTooLarge"},
            "500": {"DatabaseError", "MissingDatabaseConfig", "InternalError"},
        },
        "chat_roles": {"500": {"DatabaseError", "MissingDatabaseConfig", "InternalError"}},
        "chat_stream": {
            "400": {"InvalidInput", "InvalidImage"},
            "401": {"Unauthorized"},
            "404": {"RoleNotFound"},
            "413": {"PayloadTooLarge"},
            "429": {"RateLimited"},
            "500": {"MissingApiKey", "DatabaseError", "MissingDatabaseConfig", "InternalError"},
            "502": {"UpstreamHTTPError", "NetworkError"},
            "504": {"NetworkError"},
        },
        "chat_history": {
            "400": {"InvalidInput"},
            "401": {"Unauthorized"},
            "404": {"RoleNotFound"},
            "500": {"DatabaseError", "MissingDatabaseConfig", "InternalError"},
        },
        "chat_clear": {
            "400": {"InvalidInput"},
            "401": {"Unauthorized"},
            "404": {"RoleNotFound"},
            "413": {"PayloadTooLarge"},
            "500": {"DatabaseError", "MissingDatabaseConfig", "InternalError"},
        },
    }
    assert set(operations) == set(expected)
    for operation_id, errors in expected.items():
        responses = operations[operation_id]["operation"]["responses"]
        documented = {
            status: documented_codes(spec, resolve(spec, response))
            for status, response in responses.items()
            if not status.startswith("2")
        }
        assert documented == errors, operation_id
    for operation_id in ("send_code", "chat_stream"):
        too_many = resolve(spec, operations[operation_id]["operation"]["responses"]["429"])
        assert resolve(spec, too_many["headers"]["Retry-After"])["required"] is True, operation_id
    for name in ("NotFound", "MethodNotAllowed"):
        assert name in spec["components"]["responses"]
    assert "Allow" in spec["components"]["responses"]["MethodNotAllowed"]["headers"]


def test_chat_stream_answers_server_sent_events() -> None:
    """chat_stream's 200 is text/event-stream, a string whose frames are StreamChunk, ending with [DONE]."""
    spec = load_spec()
    ok = spec_operations(spec)["chat_stream"]["operation"]["responses"]["200"]
    assert list(ok["content"]) == ["text/event-stream"]
    stream = ok["content"]["text/event-stream"]
    assert stream["schema"]["type"] == "string"
    for example in stream["examples"].values():
        frames = example["value"].split("\n\n")
        assert frames[-2:] == ["data: [DONE]", ""], "frames end with data: [DONE]"
        for frame in frames[:-2]:
            assert frame.startswith("data: ")
            assert "choices" in json.loads(frame.removeprefix("data: "))
    assert stream["x-sse-event-schema"] == {"$ref": "#/components/schemas/StreamEvent"}
    fallback = spec["components"]["schemas"]["StreamChunk"]["properties"]["error"]
    assert resolve(spec, fallback)["required"] == ["code", "message"]


# -- the route tables and the contract -------------------------------------------------------------


def route_table(function: str, db_path: Path) -> list[dict[str, str]]:
    """The ROUTES of one function's app.py, read in a subprocess (both modules are named `app`)."""
    script = (
        "import json\nfrom app import ROUTES\n"
        "print(json.dumps([dict(operation_id=r.operation_id, method=r.method, path=r.path, auth=r.auth)"
        " for r in ROUTES]))\n"
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
    assert in_contract == in_document, "contract catalog vs docs/openapi.yaml"
    assert in_contract == in_routes, "contract catalog vs the route tables"
    for operation_id, (service, base_url, _) in listed.items():
        operation = documented[operation_id]
        assert operation["operation"]["tags"] == [service]
        assert base_url in [server["url"] for server in operation["item"]["servers"]], operation_id
    assert set(catalog["services"]) == {tag["name"] for tag in spec["tags"]}
    top_level = {server["url"] for server in spec["servers"]}
    assert {entry["base_url"] for entry in catalog["services"].values()} | set(LOCAL_URLS.values()) == top_level


# -- the live services -----------------------------------------------------------------------------


@dataclass
class LiveServices:
    """Both services running on one SQLite database, and a bearer token of the test account."""

    login_url: str
    chat_url: str
    token: str
    bearer_paths: frozenset[tuple[str, str]]
    addresses: itertools.count

    def base_url(self, path: str) -> str:
        """The service a path belongs to."""
        return self.chat_url if path.startswith("/chat/") else self.login_url

    def headers(self, method: str, path: str) -> dict[str, str]:
        """Per-request headers: a fresh client address (abuse limits count per IP) and the bearer token."""
        n = next(self.addresses)
        headers = {"X-Forwarded-For": f"198.18.{n // 250 % 250}.{n % 250 + 1}"}
        if (method.upper(), path) in self.bearer_paths:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers


@pytest.fixture(scope="module")
def live(start_server, fake_llm_server, tmp_path_factory: pytest.TempPathFactory) -> LiveServices:
    """LoginService (console SMS) and ChatService (fake upstream) on a fresh SQLite database."""
    db_url = f"sqlite:///{tmp_path_factory.mktemp('openapi-db') / 'aichat.db'}"
    fake_llm_server.reset()  # no scripted failure left over from another test
    login = start_server("login", AICHAT_DB_URL=db_url)
    # The per-user chat limits would turn most generated streams into 429s: lift them so streams get tested.
    limits = {"AICHAT_CHAT_MESSAGES_PER_MINUTE": 1_000_000, "AICHAT_CHAT_MAX_CONCURRENT_STREAMS": 1_000}
    chat = start_server("chat", **chat_env(fake_llm_server, db_url, **limits))
    answer = requests.post(f"{login.base_url}/login", json=TEST_ACCOUNT, timeout=30)
    assert answer.status_code == 200, answer.text
    bearer = frozenset(
        (op["method"], op["path"]) for op in spec_operations(load_spec()).values() if op["auth"] == "bearer_jwt"
    )
    return LiveServices(login.base_url, chat.base_url, answer.json()["access_token"], bearer, itertools.count())


def error_shape(ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case) -> None:
    """Every non-2xx answer is the contract's error JSON with a known code and the status that code uses."""
    assert response.headers.get("x-request-id"), "no X-Request-Id header"
    if 200 <= response.status_code < 300:
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
    """With healthy fakes no request may end in a 5xx (500, 502 and 504 are documented but never expected)."""
    assert response.status_code < 500, f"server error {response.status_code}: {response.text[:300]!r}"


def sse_frames(ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case) -> None:
    """A stream is `data: <JSON chunk>` events with choices, ending with exactly one `data: [DONE]`."""
    content_type = (response.headers.get("content-type") or [""])[0]
    if response.status_code != 200 or not content_type.startswith("text/event-stream"):
        return
    events = response.text.split("\n\n")
    if response.stream_cut_short:  # schemathesis stopped reading at max-stream-events: no [DONE] to see
        events = [*events[:-1], "data: [DONE]", ""]
    assert events[-2:] == ["data: [DONE]", ""], f"the stream does not end with data: [DONE]: {response.text[-200:]!r}"
    for event in events[:-2]:
        assert event.startswith("data: "), f"not a data event: {event[:200]!r}"
        chunk = json.loads(event.removeprefix("data: "))
        assert isinstance(chunk, dict) and isinstance(chunk.get("choices"), list), f"not a chunk: {event[:200]!r}"
        assert "error" not in chunk, f"fallback frame from a healthy upstream: {event[:300]!r}"


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
    for item in spec["paths"].values():
        for method in HTTP_METHODS:
            for response in item.get(method, {}).get("responses", {}).values():
                media = resolve(spec, response).get("content", {}).get("text/event-stream")
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


@SCHEMA.parametrize()
def test_live_services_conform_to_the_document(case: schemathesis.Case, live: LiveServices) -> None:
    """Generated requests (examples, coverage, fuzzing) get documented, well-formed answers and never a 5xx."""
    headers = live.headers(case.method, case.path)
    case.call_and_validate(base_url=live.base_url(case.path), headers=headers, checks=CHECKS, timeout=30)


# -- hand-written hostile requests -----------------------------------------------------------------
# Generated data never holds these (schemathesis sends valid UTF-8, small numbers, shallow JSON), so they
# are spelled out; each is checked like a generated case, plus its expected status where one is certain.

PNG = "iVBORw0KGgoAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"  # PNG magic bytes, then zeros
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
