"""The role catalogue: public fields for clients, a hidden system prompt for the model, cached in-process."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..errors import ApiError
from ..store import Database, now_ms

log = logging.getLogger("aichat.roles")

PUBLIC_FIELDS = ("role_code", "nickname", "intro", "avatar_url", "background_url", "opening_message")
# Other instances pick up an operator's catalogue change within this many seconds.
CACHE_TTL_S = 60.0
ROLES_HASH_KEY = "roles_file_sha256"
# After a failed refresh, how long the cached catalogue is served before trying again.
STALE_RETRY_S = 5.0


SKILL_CODE_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")


@dataclass(frozen=True)
class Skill:
    """A tool as one role presents it: its own name and description (e.g. 观星 → get_weather)."""

    skill_code: str
    tool: str
    name: str
    description: str

    def public(self) -> dict[str, str]:
        """What GET /chat/role/skills shows."""
        return {"skill_code": self.skill_code, "name": self.name, "description": self.description}

    def stored(self) -> dict[str, str]:
        """The roles.skills column's form."""
        return {"skill_code": self.skill_code, "tool": self.tool, "name": self.name, "description": self.description}


def read_skills(raw: object, role_code: str) -> tuple[Skill, ...]:
    """A role's `skills` list from the catalogue file (or the roles table), validated."""
    from ..tools.registry import TOOL_NAMES

    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ValueError(f"role {role_code!r}: skills must be a list")
    skills: list[Skill] = []
    for entry in raw:
        if not isinstance(entry, dict):
            raise ValueError(f"role {role_code!r}: each skill must be an object")
        tool = entry.get("tool")
        if tool not in TOOL_NAMES:
            raise ValueError(f"role {role_code!r}: unknown tool {tool!r} (known: {', '.join(TOOL_NAMES)})")
        code = entry.get("skill_code", tool)
        if not isinstance(code, str) or not SKILL_CODE_RE.fullmatch(code):
            raise ValueError(f"role {role_code!r}: skill_code must match {SKILL_CODE_RE.pattern}")
        if any(s.skill_code == code for s in skills) or any(s.tool == tool for s in skills):
            raise ValueError(f"role {role_code!r}: skill {code!r} or its tool listed twice")
        name, description = entry.get("name"), entry.get("description", "")
        if not isinstance(name, str) or not name.strip() or not isinstance(description, str):
            raise ValueError(f"role {role_code!r}: skill {code!r} needs a name and a description (strings)")
        skills.append(Skill(code, tool, name.strip(), description.strip()))
    return tuple(skills)


VOICE_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def read_voice(raw: object, role_code: str) -> tuple[tuple[str, str], ...]:
    """A role's `voice`: one name for any provider, or {"qwen": "Cherry", "cosyvoice": "longanyang"}."""
    if raw is None or raw == "":
        return ()
    voices = {"*": raw} if isinstance(raw, str) else raw
    if not isinstance(voices, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and VOICE_RE.fullmatch(v) for k, v in voices.items()
    ):
        raise ValueError(f"role {role_code!r}: voice must be a voice name or an object of provider -> voice name")
    return tuple(sorted(voices.items()))


@dataclass(frozen=True)
class Role:
    """One character users can chat with."""

    role_code: str
    nickname: str
    intro: str
    avatar_url: str
    background_url: str
    opening_message: str
    system_prompt: str  # hidden: never returned, never logged
    sort_order: int = 0
    enabled: bool = True
    skills: tuple[Skill, ...] = field(default=())
    # The role's voice per TTS provider ("*": any provider); empty: the deployment's default voice.
    voice: tuple[tuple[str, str], ...] = field(default=())

    def voice_for(self, provider: str) -> str | None:
        """The role's voice for a TTS provider, if it has one."""
        voices = dict(self.voice)
        return voices.get(provider) or voices.get("*")

    def skill(self, skill_code: str) -> Skill | None:
        """The role's skill with this code."""
        return next((s for s in self.skills if s.skill_code == skill_code), None)

    def public(self) -> dict[str, str]:
        """The contract's Role object (the six public fields only)."""
        return {name: getattr(self, name) for name in PUBLIC_FIELDS}

    def __repr__(self) -> str:
        # Keep the hidden prompt out of tracebacks and debug logs.
        return f"Role({self.role_code!r})"


def read_roles_file(path: str | Path) -> list[Role]:
    """Parse and validate a role catalogue file (template/roles.json's format)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    entries = data["roles"] if isinstance(data, dict) else data
    roles: list[Role] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        missing = [f for f in (*PUBLIC_FIELDS, "system_prompt") if not isinstance(entry.get(f), str)]
        if missing:
            raise ValueError(f"role #{index + 1} lacks string fields: {', '.join(missing)}")
        if entry["role_code"] in seen:
            raise ValueError(f"duplicate role_code {entry['role_code']!r}")
        seen.add(entry["role_code"])
        if not isinstance(entry.get("enabled", True), bool):  # "false" as a string would count as true
            raise ValueError(f"role {entry['role_code']!r}: enabled must be true or false")
        roles.append(
            Role(
                **{f: entry[f] for f in (*PUBLIC_FIELDS, "system_prompt")},
                sort_order=int(entry.get("sort_order", index)),
                enabled=entry.get("enabled", True),
                skills=read_skills(entry.get("skills"), entry["role_code"]),
                voice=read_voice(entry.get("voice"), entry["role_code"]),
            )
        )
    return roles


def sync_roles(db: Database, roles: list[Role], *, fingerprint: str | None = None) -> bool:
    """Make the roles table match a catalogue (roles missing from it are disabled); one transaction.

    With a fingerprint, nothing is written when the database already holds that exact catalogue.
    """
    with db.tx() as tx:
        if fingerprint:
            row = tx.one("SELECT meta_value FROM app_meta WHERE meta_key = ?" + tx.for_update, (ROLES_HASH_KEY,))
            if row and row["meta_value"] == fingerprint:
                return False
        now = now_ms()
        for role in roles:
            tx.upsert(
                "roles",
                {"role_code": role.role_code},
                {
                    "nickname": role.nickname,
                    "intro": role.intro,
                    "avatar_url": role.avatar_url,
                    "background_url": role.background_url,
                    "opening_message": role.opening_message,
                    "system_prompt": role.system_prompt,
                    "sort_order": role.sort_order,
                    "enabled": int(role.enabled),
                    "skills": json.dumps([s.stored() for s in role.skills], ensure_ascii=False),
                    "voice": json.dumps(dict(role.voice)) if role.voice else None,
                    "updated_at": now,
                },
            )
        codes = [role.role_code for role in roles]
        if codes:
            tx.execute(f"UPDATE roles SET enabled = 0 WHERE role_code NOT IN ({','.join('?' * len(codes))})", codes)
        else:  # an empty catalogue disables every role (and `NOT IN ()` is not SQL)
            tx.execute("UPDATE roles SET enabled = 0")
        if fingerprint:
            tx.upsert("app_meta", {"meta_key": ROLES_HASH_KEY}, {"meta_value": fingerprint})
    log.info("role catalogue synced", extra={"roles": codes})
    return True


class RoleCatalog:
    """Enabled roles from the database, cached for a minute; synced from a catalogue file when one is set."""

    def __init__(self, db: Database, *, roles_file: str = "") -> None:
        self.db = db
        self.roles_file = roles_file
        self._lock = threading.Lock()
        self._roles: list[Role] = []
        self._by_code: dict[str, Role] = {}
        self._public_body = b""
        self._loaded_at = float("-inf")
        self._synced = not roles_file
        self._file_roles: list[Role] = []
        self._fingerprint = ""
        if roles_file:
            # Read at start: a catalogue the service cannot use stops it at once (not at the first request).
            try:
                raw = Path(roles_file).read_bytes()
                self._file_roles = read_roles_file(roles_file)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ConfigError(f"AICHAT_ROLES_FILE {roles_file} is not a usable catalogue: {exc}") from exc
            self._fingerprint = hashlib.sha256(raw).hexdigest()

    def _refresh(self) -> None:
        if not self._synced:
            sync_roles(self.db, self._file_roles, fingerprint=self._fingerprint)
            self._synced = True
        rows = self.db.read(
            lambda tx: tx.all(
                "SELECT role_code, nickname, intro, avatar_url, background_url, opening_message, system_prompt,"
                " sort_order, enabled, skills, voice FROM roles WHERE enabled = 1 ORDER BY sort_order, role_code"
            )
        )
        roles = [_role(row) for row in rows]
        body = {"success": True, "roles": [role.public() for role in roles]}
        # /chat/roles is the hottest read (and FC's health check): serialise it once per refresh.
        self._public_body = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        self._roles, self._by_code = roles, {role.role_code: role for role in roles}
        self._loaded_at = time.monotonic()

    def nickname(self, role_code: str) -> str:
        """A role's display name (its code when it is no longer in the catalogue)."""
        self.enabled()
        role = self._by_code.get(role_code)
        return role.nickname if role else role_code

    def enabled(self) -> list[Role]:
        """Enabled roles in their stable display order."""
        if time.monotonic() - self._loaded_at > CACHE_TTL_S:
            with self._lock:
                if time.monotonic() - self._loaded_at > CACHE_TTL_S:
                    try:
                        self._refresh()
                    except ApiError:
                        if not self._public_body:
                            raise
                        # A database blip should not take the catalogue (and FC's health check) down with it.
                        log.warning("role catalogue refresh failed; serving the cached one")
                        self._loaded_at = time.monotonic() - CACHE_TTL_S + STALE_RETRY_S
        return self._roles

    def public_body(self) -> bytes:
        """The /chat/roles response body (the contract's shape), serialised once per refresh."""
        self.enabled()
        return self._public_body

    def get(self, role_code: Any) -> Role:
        """The enabled role with this code: 400 InvalidInput when absent or ill-typed, 404 RoleNotFound if unknown."""
        if role_code is None or role_code == "":
            raise ApiError("InvalidInput", "缺少必填参数 role_code")
        if not isinstance(role_code, str):
            raise ApiError("InvalidInput", "参数 role_code 必须是字符串")
        self.enabled()
        role = self._by_code.get(role_code)
        if role is None:
            raise ApiError("RoleNotFound")
        return role


def _role(row: dict[str, Any]) -> Role:
    """A Role from its roles-table row (skills stored as JSON; a row a bad edit broke has none)."""
    try:
        skills = read_skills(json.loads(row["skills"]) if row.get("skills") else None, row["role_code"])
        voice = read_voice(json.loads(row["voice"]) if row.get("voice") else None, row["role_code"])
    except ValueError:
        log.error("stored skills or voice of a role are invalid; ignored", extra={"role_code": row["role_code"]})
        skills, voice = (), ()
    return Role(**{**row, "enabled": bool(row["enabled"]), "skills": skills, "voice": voice})
