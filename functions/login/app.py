"""LoginService web function: the route table of the contract's LoginService and its thin handlers."""

from __future__ import annotations

from functools import partial
from typing import Any

from aichat import chat, tokens, tools
from aichat.accounts.service import Accounts
from aichat.accounts.sms import build_sms_provider
from aichat.config import Settings, load_settings
from aichat.store import open_database
from aichat.voice.service import eraser as voice_eraser
from aichat.web import ApiRequest, Route, create_app
from flask import Flask


def build_app(settings: Settings | None = None, *, sms: Any = None, db: Any = None) -> Flask:
    """LoginService's app: from the environment on FC, from the given settings and clients in tests."""
    settings = settings or load_settings(service="login")
    db = db or open_database(settings)
    # Deleting an account erases what ChatService stored too (its feature's own delete_for_user).
    accounts = Accounts(
        settings,
        db,
        sms or build_sms_provider(settings),
        erasers=[chat.delete_for_user, tools.delete_for_user, voice_eraser(settings)],
    )

    def login_health(req: ApiRequest) -> dict:
        """Liveness for FC's health check and for clients."""
        return {"success": True, "service": "login", "message": "ok"}

    def send_code(req: ApiRequest) -> dict:
        """Send a verification code by SMS (never for the test account)."""
        return accounts.send_code(req.json(), client_ip=req.client_ip, credentials=req.fc_credentials())

    def login(req: ApiRequest) -> dict:
        """Exchange a verification code for an access token."""
        return accounts.login(req.json())

    def me(req: ApiRequest) -> dict:
        """The signed-in user's profile (extension)."""
        return accounts.me(req.user_uid())

    def logout(req: ApiRequest) -> dict:
        """Revoke the presented token everywhere (extension)."""
        return accounts.logout(req.claims)

    def account_delete(req: ApiRequest) -> dict:
        """Erase the account and everything stored for it (extension)."""
        return accounts.delete_account(req.claims)

    def initialize() -> None:
        """FC's initializer: open a database connection and load what the first logins need."""
        db.warm()
        tokens.preload()

    routes = [
        Route("login_health", "GET", "/health", "none", login_health),
        Route("send_code", "POST", "/send_code", "none", send_code, json_only=True),
        Route("login", "POST", "/login", "none", login, json_only=True),
        # Extensions beyond the contract (README, docs/openapi.yaml).
        Route("me", "GET", "/me", "bearer_jwt", me),
        Route("logout", "POST", "/logout", "bearer_jwt", logout),
        Route("account_delete", "POST", "/account/delete", "bearer_jwt", account_delete),
    ]
    return create_app(
        service="login",
        routes=routes,
        settings=settings,
        body_limit=settings.login_body_limit,
        token_is_live=partial(tokens.token_is_live, db),
        on_initialize=initialize,
        on_pre_stop=db.close_idle,
    )


app = build_app()
ROUTES = app.config["AICHAT_ROUTES"]
