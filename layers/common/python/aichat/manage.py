"""Operator commands: `python -m aichat.manage migrate | load-roles FILE | ddl <sqlite|mysql>`."""

from __future__ import annotations

import argparse
import sys

from .chat.roles import read_roles_file, sync_roles
from .config import ConfigError, load_settings
from .logs import configure_logging
from .store import Database, ddl


def main(argv: list[str] | None = None) -> int:
    """Run one management command."""
    parser = argparse.ArgumentParser(prog="python -m aichat.manage")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="create or upgrade the schema in AICHAT_DB_URL")
    roles_cmd = sub.add_parser("load-roles", help="sync the role catalogue in AICHAT_DB_URL from a roles.json")
    roles_cmd.add_argument("file", help="e.g. template/roles.json")
    ddl_cmd = sub.add_parser("ddl", help="print the schema as SQL")
    ddl_cmd.add_argument("dialect", choices=["sqlite", "mysql"])
    args = parser.parse_args(argv)

    if args.command == "ddl":
        sys.stdout.write(ddl(args.dialect))
        return 0
    try:
        settings = load_settings()
    except ConfigError as exc:
        sys.stderr.write(f"configuration error: {exc}\n")
        return 2
    if not settings.db_url:
        sys.stderr.write("AICHAT_DB_URL is not set\n")
        return 2
    configure_logging(settings.log_level)
    db = Database(settings.db_url, connect_timeout_s=settings.db_connect_timeout_s, auto_migrate=False)
    where = settings.db_url.split("@")[-1]  # never print a password
    try:
        applied = db.migrate()
        sys.stdout.write(f"migrated {where}: applied {applied or 'nothing (up to date)'}\n")
        if args.command == "load-roles":
            roles = read_roles_file(args.file)
            sync_roles(db, roles)
            sys.stdout.write(f"loaded {len(roles)} roles into {where}: {', '.join(r.role_code for r in roles)}\n")
    finally:
        db.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
