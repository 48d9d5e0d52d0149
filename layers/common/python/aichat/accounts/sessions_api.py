"""Sign-in sessions: what every login hands out (an access token of a session and a refresh token), refresh
with rotation and reuse detection, logout (one, all), the list of sessions and ending one."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from ..config import Settings
from ..errors import ApiError
from ..store import Database, now_ms
from ..tokens import issue_token, revoke, revoked
from . import sessions, users

log = logging.getLogger("aichat.accounts")


class Sessions:
    def __init__(self, settings: Settings, db: Database, redis: Any = None) -> None:
        self.settings = settings
        self.db = db
        self.redis = redis  # told of every revocation once it is committed (tokens.revoked)

    def _ttl_ms(self) -> int:
        return self.settings.refresh_ttl_s * 1000

    def start(self, tx: Any, *, uid: str, client_ip: str, user_agent: str) -> dict[str, Any]:
        """A new session (inside the login's transaction): the token fields every login answers."""
        sid = sessions.create(tx, uid=uid, ttl_ms=self._ttl_ms(), client_ip=client_ip, user_agent=user_agent)
        refresh = sessions.add_refresh(tx, sid=sid, uid=uid, ttl_ms=self._ttl_ms())
        return self._tokens(uid, sid, refresh)

    def _tokens(self, uid: str, sid: str, refresh: str) -> dict[str, Any]:
        s = self.settings
        return {
            "token_type": "Bearer",
            "access_token": issue_token(uid, secret=s.jwt_secret, ttl_s=s.jwt_ttl_s, sid=sid),
            "expires_in": s.jwt_ttl_s,
            "refresh_token": refresh,
            "refresh_expires_in": s.refresh_ttl_s,
        }

    def refresh(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /token/refresh: a new access token and a new refresh token; the old one is spent. A spent
        one presented again means it leaked: the whole session ends (theft detection)."""
        token = body.get("refresh_token")
        if not isinstance(token, str) or not token or len(token) > 256:
            raise ApiError("InvalidInput", "缺少必填参数 refresh_token")
        reused = False
        with self.db.tx() as tx:
            row = sessions.find_refresh(tx, token=token)
            if row is None or row["revoked_at"] is not None or int(row["expires_at"]) <= now_ms():
                raise ApiError("Unauthorized", "refresh_token 无效或已过期")
            if row["used_at"] is not None or not sessions.use_refresh(tx, token=token):
                sessions.revoke(tx, sid=row["session_id"])
                reused = True
            else:
                sessions.touch(tx, sid=row["session_id"], ttl_ms=self._ttl_ms())
                refresh = sessions.add_refresh(tx, sid=row["session_id"], uid=row["uid"], ttl_ms=self._ttl_ms())
        if reused:  # raised after the block, so the revocation is committed
            revoked(self.redis, row["uid"])
            log.warning("a spent refresh token was presented again: session ended", extra={"uid": row["uid"]})
            raise ApiError("Unauthorized", "refresh_token 已被使用，该会话已结束，请重新登录")
        return {"success": True, "message": "刷新成功", **self._tokens(row["uid"], row["session_id"], refresh)}

    def logout(self, claims: dict[str, Any]) -> dict[str, Any]:
        """POST /logout: this token, and its session (with its refresh tokens), on every instance."""
        with self.db.tx() as tx:
            revoke(tx, claims)
            if isinstance(claims.get("sid"), str):
                sessions.revoke(tx, sid=claims["sid"])
        revoked(self.redis, claims["sub"])
        log.info("logout", extra={"uid": claims["sub"]})
        return {"success": True, "message": "已退出登录"}

    def logout_all(self, claims: dict[str, Any]) -> dict[str, Any]:
        """POST /logout/all: every session of the user, and any older token without one."""
        uid = claims["sub"]
        with self.db.tx() as tx:
            ended = sessions.revoke_all(tx, uid=uid)
            users.end_sessions_before(tx, uid=uid, at_ms=now_ms())
            revoke(tx, claims)
        revoked(self.redis, uid)
        log.info("logout everywhere", extra={"uid": uid, "sessions": ended})
        return {"success": True, "message": "已在所有设备退出登录", "ended_sessions": ended}

    def end_others(self, tx: Any, claims: dict[str, Any]) -> int:
        """A password change: every other session ends (this one stays signed in; the caller tells Redis,
        tokens.revoked, once the transaction is committed)."""
        uid = claims["sub"]
        keep = claims.get("sid") if isinstance(claims.get("sid"), str) else None
        ended = sessions.revoke_all(tx, uid=uid, keep=keep)
        users.end_sessions_before(tx, uid=uid, at_ms=now_ms())
        return ended

    def list(self, claims: dict[str, Any]) -> dict[str, Any]:
        """GET /sessions: the user's live sessions (created, last used, client IP, user agent)."""
        rows = self.db.read(lambda tx: sessions.live(tx, uid=claims["sub"]))
        current = claims.get("sid")
        return {
            "success": True,
            "sessions": [
                {
                    "session_id": row["id"],
                    "created_at": self._time(row["created_at"]),
                    "last_used_at": self._time(row["last_used_at"]),
                    "client_ip": row["client_ip"],
                    "user_agent": row["user_agent"],
                    "current": row["id"] == current,
                }
                for row in rows
            ],
        }

    def revoke_one(self, claims: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
        """POST /session/revoke: end one of the user's sessions (404 for another user's or an unknown one)."""
        sid = body.get("session_id")
        if not isinstance(sid, str) or not sid:
            raise ApiError("InvalidInput", "缺少必填参数 session_id")
        with self.db.tx() as tx:
            row = sessions.owned(tx, uid=claims["sub"], sid=sid[:24])
            if row is None or row["revoked_at"] is not None:
                raise ApiError("SessionNotFound")
            sessions.revoke(tx, sid=row["id"])
        revoked(self.redis, claims["sub"])
        return {"success": True, "message": "会话已结束"}

    def _time(self, ms: int) -> str:
        return datetime.fromtimestamp(int(ms) / 1000, self.settings.tz).strftime("%Y-%m-%dT%H:%M:%S")
