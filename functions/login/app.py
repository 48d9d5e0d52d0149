"""LoginService web function: the route table of the contract's LoginService and its thin handlers."""

from __future__ import annotations

from functools import partial
from typing import Any

from aichat import chat, fastpath, tokens, tools
from aichat.accounts import passwords
from aichat.accounts.passwords_api import PasswordAccounts
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
    redis = fastpath.build(settings)
    # Deleting an account erases what ChatService stored too (its feature's own delete_for_user).
    accounts = Accounts(
        settings,
        db,
        sms or build_sms_provider(settings),
        erasers=[chat.eraser(redis), tools.delete_for_user, voice_eraser(settings)],
        redis=redis,
    )

    password_accounts = PasswordAccounts(settings, db, accounts.sessions, redis=redis)

    def login_health(req: ApiRequest) -> dict:
        """Liveness for FC's health check and for clients."""
        return {"success": True, "service": "login", "message": "ok"}

    def send_code(req: ApiRequest) -> dict:
        """Send a verification code by SMS (never for the test account)."""
        return accounts.send_code(req.json(), client_ip=req.client_ip, credentials=req.fc_credentials())

    def login(req: ApiRequest) -> dict:
        """Exchange a verification code for an access token."""
        return accounts.login(req.json(), client_ip=req.client_ip, user_agent=user_agent(req))

    def me(req: ApiRequest) -> dict:
        """The signed-in user's profile (extension)."""
        return accounts.me(req.user_uid())

    def logout(req: ApiRequest) -> dict:
        """End the presented token's session everywhere (extension)."""
        return accounts.logout(req.claims)

    def register(req: ApiRequest) -> dict:
        """A new account with a username and a password (extension)."""
        return password_accounts.register(req.json())

    def login_password(req: ApiRequest) -> dict:
        """Log in with a username, email or phone and a password (extension)."""
        return password_accounts.login(req.json(), client_ip=req.client_ip, user_agent=user_agent(req))

    def password_set(req: ApiRequest) -> dict:
        """Add a password, or change it (extension)."""
        return password_accounts.set_password(req.claims, req.json())

    def token_refresh(req: ApiRequest) -> dict:
        """A new access token and refresh token for a refresh token (rotation; extension)."""
        return accounts.sessions.refresh(req.json())

    def logout_all(req: ApiRequest) -> dict:
        """End every session of the user (extension)."""
        return accounts.sessions.logout_all(req.claims)

    def sessions_list(req: ApiRequest) -> dict:
        """The user's sessions (extension)."""
        return accounts.sessions.list(req.claims)

    def session_revoke(req: ApiRequest) -> dict:
        """End one of the user's sessions (extension)."""
        return accounts.sessions.revoke_one(req.claims, req.json())

    def me_update(req: ApiRequest) -> dict:
        """Change the profile: nickname, avatar_url, bio (extension)."""
        return accounts.update_profile(req.user_uid(), req.json())

    def account_delete(req: ApiRequest) -> dict:
        """Erase the account and everything stored for it (extension)."""
        return accounts.delete_account(req.claims)

    def initialize() -> None:
        """FC's initializer: open a database connection and load what the first logins need."""
        db.warm()
        tokens.preload()
        passwords.preload()
        if redis is not None:
            redis.warm()

    routes = [
        Route("login_health", "GET", "/health", "none", login_health),
        Route("send_code", "POST", "/send_code", "none", send_code, json_only=True),
        Route("login", "POST", "/login", "none", login, json_only=True),
        # Extensions beyond the contract (README, docs/openapi.yaml).
        Route("me", "GET", "/me", "bearer_jwt", me),
        Route("logout", "POST", "/logout", "bearer_jwt", logout),
        Route("account_delete", "POST", "/account/delete", "bearer_jwt", account_delete),
        Route("register", "POST", "/register", "none", register, json_only=True),
        Route("login_password", "POST", "/login/password", "none", login_password, json_only=True),
        Route("token_refresh", "POST", "/token/refresh", "none", token_refresh, json_only=True),
        Route("password_set", "POST", "/password/set", "bearer_jwt", password_set),
        Route("logout_all", "POST", "/logout/all", "bearer_jwt", logout_all),
        Route("sessions", "GET", "/sessions", "bearer_jwt", sessions_list),
        Route("session_revoke", "POST", "/session/revoke", "bearer_jwt", session_revoke),
        Route("me_update", "POST", "/me/update", "bearer_jwt", me_update),
    ]
    return create_app(
        service="login",
        routes=routes,
        settings=settings,
        body_limit=settings.login_body_limit,
        token_is_live=partial(tokens.token_is_live, db, redis=redis),
        on_initialize=initialize,
        on_pre_stop=db.close_idle,
    )


def user_agent(req: ApiRequest) -> str:
    """The caller's User-Agent, for the session list (cut to what is stored)."""
    from flask import request

    return (request.headers.get("User-Agent") or "")[:255]


app = build_app()
ROUTES = app.config["AICHAT_ROUTES"]
