"""Flask glue shared by both services: route tables, JSON out, errors, CORS, security headers, access log."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound, RequestEntityTooLarge
from werkzeug.wsgi import ClosingIterator

from .config import Settings
from .errors import ApiError
from .incoming import ApiRequest, is_client_framing_error, request_id_of
from .logs import configure_logging, request_ended, request_id_var, request_started, write_line
from .store.budget import end_budget, start_budget
from .tokens import bearer_token, verify_token

log = logging.getLogger("aichat.web")
access_log = logging.getLogger("aichat.access")

JSON_CONTENT_TYPE = "application/json; charset=utf-8"
PREFLIGHT_MAX_AGE_S = 86_400
# Unauthenticated operations whose answers carry a token (beyond every bearer_jwt operation).
NO_STORE_OPERATIONS = frozenset({"login", "send_code", "login_password", "token_refresh", "register"})


@dataclass(frozen=True)
class Route:
    """One contract operation: its operation_id, method, path, auth and the handler that serves it."""

    operation_id: str
    method: str
    path: str
    auth: str  # "none" or "bearer_jwt", as in the contract's catalog
    handler: Callable[[ApiRequest], Any]
    response_type: str = "json"
    # Refuse bodies that are not application/json (415): a form or text/plain POST is a CORS "simple"
    # request a foreign page can send with no preflight (e.g. to make its visitors' browsers ask for SMS).
    json_only: bool = False


def json_response(body: dict[str, Any] | bytes, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A UTF-8 JSON response with readable Chinese (no \\u escapes); `body` may be pre-serialised bytes."""
    text = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    return Response(text, status=status, headers=headers, content_type=JSON_CONTENT_TYPE)


def sse_response(frames: Iterable[bytes]) -> Response:
    """A text/event-stream response that sends each frame as its own chunk, with nothing buffering it.

    `frames` may have a close() method: the WSGI server calls it however the response ends. If it takes
    listeners (a StreamRelay), the stream's access-log line is written when it closes, with its outcome.
    """
    add_listener = getattr(frames, "add_listener", None)
    if add_listener is not None:
        line = {
            "method": request.method,
            "path": request.path,
            "operation_id": request.endpoint,
            "uid": g.get("uid"),
            "status": 200,
        }
        started, request_id = g.get("started"), g.get("request_id", "-")

        def log_stream(result: Any) -> None:
            request_id_var.set(request_id)
            log_access(**line, started=started, outcome=result.outcome, frames=result.frames)

        add_listener(log_stream)
    return Response(
        frames,
        status=200,
        content_type="text/event-stream; charset=utf-8",
        headers={
            "Cache-Control": "no-cache, no-transform",
            # Tell nginx-style proxies (and FC's gateway) not to hold frames back.
            "X-Accel-Buffering": "no",
        },
    )


def error_response(error: ApiError) -> Response:
    """The contract's error JSON for an ApiError, with Retry-After when it carries one."""
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after is not None else None
    return json_response(error.body(), error.status, headers)


def create_app(
    *,
    service: str,
    routes: Sequence[Route],
    settings: Settings,
    body_limit: int,
    token_is_live: Callable[[dict[str, Any]], bool] | None = None,
    on_initialize: Callable[[], None] | None = None,
    on_pre_stop: Callable[[], None] | None = None,
) -> Flask:
    """Build a service's Flask app from its route table; this is the only place requests are routed.

    FC's instance lifecycle hooks reach a custom runtime as HTTP (POST /initialize, GET /pre-stop); they
    are served here, outside the contract's route table, and run the given callbacks.
    """
    configure_logging(settings.log_level)
    app = Flask(f"aichat.{service}")
    app.wsgi_app = _counted(app.wsgi_app)  # type: ignore[method-assign]
    app.config["MAX_CONTENT_LENGTH"] = body_limit
    app.config["AICHAT_ROUTES"] = list(routes)  # the route table, for tests and tools
    by_operation = {route.operation_id: route for route in routes}

    for route in routes:
        app.add_url_rule(
            route.path,
            endpoint=route.operation_id,
            view_func=_view(route, settings, token_is_live),
            methods=[route.method],
            provide_automatic_options=False,
        )

    def lifecycle(callback: Callable[[], None] | None, name: str) -> Callable[[], Response]:
        def hook() -> Response:
            # FC marks its own lifecycle calls with x-fc-control-path (and drops client-sent x-fc-* headers);
            # through the public trigger these paths are like any unknown path.
            if request.headers.get("x-fc-control-path") != f"/{name}":
                raise ApiError("NotFound")
            if callback is not None:
                callback()
            log.info("lifecycle hook", extra={"hook": name})
            return json_response({"success": True, "message": "ok"})

        return hook

    app.add_url_rule("/initialize", "fc_initialize", lifecycle(on_initialize, "initialize"), methods=["POST"])
    app.add_url_rule("/pre-stop", "fc_pre_stop", lifecycle(on_pre_stop, "pre-stop"), methods=["GET"])

    @app.before_request
    def _start() -> Response | None:
        g.started = time.perf_counter()
        # Every database wait of this request comes out of one budget (a stream's own saves run after it).
        g.db_budget = start_budget(settings.db_request_budget_s)
        g.request_id = request_id_of(request.headers.get("x-fc-request-id"))
        request_id_var.set(g.request_id)
        known_path = request.url_rule is not None or isinstance(request.routing_exception, MethodNotAllowed)
        if request.method == "OPTIONS" and known_path:
            preflight = Response(status=204)  # CORS preflight; headers are added below
            del preflight.headers["Content-Type"]  # an empty answer has no type (not Flask's text/html)
            return preflight
        if request.content_length is not None and request.content_length > body_limit:
            raise RequestEntityTooLarge()
        route = by_operation.get(request.endpoint or "")
        if route is not None and route.json_only and request.mimetype != "application/json":
            raise ApiError("UnsupportedMediaType")
        return None

    @app.teardown_request
    def _end_budget(_: BaseException | None) -> None:
        token = g.pop("db_budget", None)
        if token is not None:
            end_budget(token)

    @app.after_request
    def _finish(response: Response) -> Response:
        _add_cors_headers(response, settings)
        response.headers["X-Request-Id"] = g.get("request_id", "-")
        response.headers["X-Content-Type-Options"] = "nosniff"
        route = by_operation.get(request.endpoint or "")
        private = route is not None and (route.auth == "bearer_jwt" or route.operation_id in NO_STORE_OPERATIONS)
        if private and response.mimetype == "application/json":
            # Tokens and a user's own data must never sit in a shared or browser cache (a stream's JSON
            # errors included; the stream itself says no-cache, no-transform).
            response.headers["Cache-Control"] = "no-store"
        if route is None or response.mimetype != "text/event-stream" or response.status_code != 200:
            _log_access(response.status_code, route)
        return response

    @app.errorhandler(ApiError)
    def _api_error(error: ApiError) -> Response:
        return error_response(error)

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException) -> Response:
        if isinstance(error, NotFound):
            return error_response(ApiError("NotFound"))
        if isinstance(error, MethodNotAllowed):
            response = error_response(ApiError("MethodNotAllowed"))
            response.headers["Allow"] = ", ".join(sorted(set(error.valid_methods or ()) | {"OPTIONS"}))
            return response
        if isinstance(error, RequestEntityTooLarge):
            return error_response(ApiError("PayloadTooLarge", f"请求体超过 {body_limit} 字节上限"))
        if error.code and 400 <= error.code < 500:
            return error_response(ApiError("InvalidInput", status=error.code))
        return error_response(ApiError("InternalError"))

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> Response:
        if is_client_framing_error(error):
            return error_response(ApiError("InvalidInput", "请求体格式不正确"))
        # Details go to the log with the request id; the client gets a generic message only.
        log.exception("unhandled error", extra={"operation_id": request.endpoint})
        return error_response(ApiError("InternalError"))

    return app


def _counted(wsgi_app: Callable[..., Any]) -> Callable[..., Any]:
    """The requests in flight, from the call until the server closed the response (a stream's whole life):
    what lets the access log batch its lines while requests overlap (logs.request_started)."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        request_started()
        try:
            body = wsgi_app(environ, start_response)
        except BaseException:
            request_ended()
            raise
        return ClosingIterator(body, [request_ended])

    return app


def _view(
    route: Route, settings: Settings, token_is_live: Callable[[dict[str, Any]], bool] | None
) -> Callable[[], Any]:
    def view() -> Any:
        if route.auth == "bearer_jwt":
            claims = verify_token(bearer_token(request.headers.get("Authorization")), secret=settings.jwt_secret)
            # A valid signature is not enough: the user may have been deleted or the token revoked.
            if token_is_live is not None and not token_is_live(claims):
                raise ApiError("Unauthorized")
            g.uid = claims["sub"]
            g.claims = claims
        result = route.handler(ApiRequest(settings))
        if isinstance(result, Response):
            return result
        return json_response(result)

    view.__name__ = route.operation_id
    return view


def _add_cors_headers(response: Response, settings: Settings) -> None:
    origin = request.headers.get("Origin")
    if "*" in settings.cors_origins:
        response.headers["Access-Control-Allow-Origin"] = "*"
        return _add_cors_details(response)
    # With an allow-list the answer depends on the Origin, matched or not: a shared cache must know.
    response.headers.add("Vary", "Origin")
    if origin and origin in settings.cors_origins:
        response.headers["Access-Control-Allow-Origin"] = origin
        _add_cors_details(response)
    return None


def _add_cors_details(response: Response) -> None:
    # ETag and Content-Range: a browser client revalidates and ranges the voice clips.
    response.headers["Access-Control-Expose-Headers"] = "Retry-After, X-Request-Id, ETag, Content-Range"
    if request.method == "OPTIONS":
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
        response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type, Idempotency-Key"
        response.headers["Access-Control-Max-Age"] = str(PREFLIGHT_MAX_AGE_S)


def _log_access(status: int, route: Route | None) -> None:
    started = g.get("started")
    log_access(
        method=request.method,
        path=request.path,
        operation_id=route.operation_id if route else None,
        uid=g.get("uid"),
        status=status,
        started=started,
    )


def log_access(
    *,
    method: str,
    path: str | None,
    operation_id: str | None,
    uid: str | None,
    status: int,
    started: float | None,
    **extra: Any,
) -> None:
    """One access-log line: for JSON responses when they are sent, for streams when they end."""
    write_line(
        access_log,
        "request",
        {
            "method": method,
            "path": path,
            "operation_id": operation_id,
            "uid": uid,
            "status": status,
            "latency_ms": round((time.perf_counter() - started) * 1000, 1) if started else None,
            **extra,
        },
    )
