"""Existing databases migrate in place: every (user, role) history becomes that role's default conversation."""

from __future__ import annotations

import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from aichat.store import Database
from aichat.store import schema as schema_module
from aichat.store.migrations import migrate

from tests.conftest import BACKENDS, fresh_mysql_database
from tests.helpers import query

LEGACY_VERSION = 4  # the schema before conversations


@pytest.fixture(params=BACKENDS)
def empty_db_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    """A database with no tables at all, on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'legacy.db'}"
        return
    with fresh_mysql_database("aichat_legacy") as url:
        yield url


def legacy_database(url: str, monkeypatch: pytest.MonkeyPatch) -> Database:
    """The schema as deployments had it before conversations, with some history in it."""
    db = Database(url, auto_migrate=False)
    with monkeypatch.context() as patch:
        patch.setattr(schema_module, "MIGRATIONS", schema_module.MIGRATIONS[:LEGACY_VERSION])
        assert migrate(db) == [1, 2, 3, 4]
    rows = [
        ("a" * 24, "naitang", "user", "今天有点累。"),
        ("a" * 24, "naitang", "assistant", "那先让我陪你缓一缓"),
        ("b" * 24, "naitang", "user", ""),  # an image sent without text
        ("a" * 24, "wanqing", "user", "杭州天气？"),
        ("a" * 24, "naitang", "user", "再陪我一会"),
    ]
    with db.tx() as tx:
        for at, (uid, role, sender, content) in enumerate(rows, start=1):
            tx.insert(
                "INSERT INTO messages (uid, role_code, sender_role, content, has_image, is_partial, created_at)"
                " VALUES (?, ?, ?, ?, ?, 0, ?)",
                (uid, role, sender, content, int(not content), 1_700_000_000_000 + at * 1000),
            )
    return db


def test_histories_become_default_conversations(empty_db_url, monkeypatch):
    db = legacy_database(empty_db_url, monkeypatch)
    before = query(empty_db_url, "SELECT id, uid, role_code, content FROM messages ORDER BY id")
    assert migrate(db) == [5, 6, 7, 8, 9]
    after = query(empty_db_url, "SELECT id, uid, role_code, content, conversation_id FROM messages ORDER BY id")
    assert [row[:4] for row in after] == before  # ids, order and content unchanged
    conversations = {
        (uid, role): (cid, title, default_key, last)
        for cid, uid, role, title, default_key, last in query(
            empty_db_url, "SELECT id, uid, role_code, title, default_key, last_message_at FROM conversations"
        )
    }
    assert set(conversations) == {("a" * 24, "naitang"), ("b" * 24, "naitang"), ("a" * 24, "wanqing")}
    for _, uid, role, _, conversation_id in after:
        cid, _, default_key, _ = conversations[(uid, role)]
        assert conversation_id == cid and default_key == role  # each history is its role's default conversation
    assert conversations[("a" * 24, "naitang")][1] == "今天有点累。"  # titled after its first user message
    assert conversations[("a" * 24, "naitang")][3] == 1_700_000_005_000  # last message time
    db.close()


def test_an_interrupted_migration_completes_on_the_next_run(empty_db_url, monkeypatch):
    db = legacy_database(empty_db_url, monkeypatch)
    assert migrate(db) == [5, 6, 7, 8, 9]
    # As if the migrator died after its DDL (MySQL commits each statement) but before its bookkeeping row.
    with db.tx() as tx:
        tx.execute("DELETE FROM schema_migrations WHERE version = 5")
        tx.execute("UPDATE messages SET conversation_id = NULL WHERE role_code = 'wanqing'")
    assert migrate(db) == [5]  # no "duplicate column", no second default conversation
    assert query(empty_db_url, "SELECT COUNT(*) FROM conversations") == [(3,)]
    assert query(empty_db_url, "SELECT COUNT(*) FROM messages WHERE conversation_id IS NULL") == [(0,)]
    assert migrate(db) == []
    db.close()


def test_messages_an_older_release_wrote_are_adopted_on_the_next_start(empty_db_url, monkeypatch):
    db = legacy_database(empty_db_url, monkeypatch)
    assert migrate(db) == [5, 6, 7, 8, 9]
    # A rollback to a release without conversations: it writes messages with no conversation_id.
    with db.tx() as tx:
        tx.insert(
            "INSERT INTO messages (uid, role_code, sender_role, content, has_image, is_partial, created_at)"
            " VALUES (?, 'naitang', 'user', '回滚期间的话', 0, 0, ?)",
            ("a" * 24, 1_800_000_000_000),
        )
    assert migrate(db) == []  # nothing to apply, but the orphan joins its default conversation
    (row,) = query(empty_db_url, "SELECT conversation_id FROM messages WHERE content = '回滚期间的话'")
    default = query(empty_db_url, "SELECT id FROM conversations WHERE uid = ? AND default_key = 'naitang'", ("a" * 24,))
    assert row[0] is not None and [(row[0],)] == default
    db.close()


@pytest.mark.mysql
def test_a_migrator_that_cannot_get_the_lock_does_not_run(monkeypatch):
    # Another instance holds the migration lock longer than this one is willing to wait: it must give up
    # (DatabaseError) rather than run without the lock, and each of its waits stays below the read timeout.
    import pymysql
    from aichat.errors import ApiError
    from aichat.store import migrations

    with fresh_mysql_database("aichat_lock") as url:
        parts = urlsplit(url)
        holder = pymysql.connect(host=parts.hostname, port=parts.port or 3306, user=parts.username or "root")
        with holder.cursor() as cur:
            cur.execute("SELECT GET_LOCK('aichat_migrate', 0)")
        monkeypatch.setattr(migrations, "LOCK_WAIT_STEP_S", 1)
        monkeypatch.setattr(migrations, "LOCK_WAIT_TOTAL_S", 2)
        db = Database(url, auto_migrate=False, read_timeout_s=3)
        started = time.monotonic()
        with pytest.raises(ApiError):
            migrate(db)
        assert time.monotonic() - started < 5
        assert query(url, "SHOW TABLES") == []  # nothing ran
        holder.close()  # the lock goes with the connection
        from aichat.store.schema import MIGRATIONS

        assert migrate(db)[-1] == MIGRATIONS[-1][0]  # all of them, once the lock is free
        db.close()


def test_an_empty_role_catalogue_disables_every_role(empty_db_url):
    from aichat.chat.roles import Role, sync_roles

    db = Database(empty_db_url)
    sync_roles(db, [Role("cat", "猫", "intro", "https://a", "https://b", "hi", "prompt")])
    sync_roles(db, [])  # was `NOT IN ()`: a syntax error on MySQL
    assert query(empty_db_url, "SELECT role_code, enabled FROM roles") == [("cat", 0)]
    db.close()
