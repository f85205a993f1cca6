"""GLM Studio's history: every conversation and benchmark run, in one SQLite file (sqlite-utils).

Where the file lives:
  1. $GLM_STUDIO_DB when set (":memory:" gives a throwaway in-memory database);
  2. else $XDG_DATA_HOME/glm-studio/glm-studio.db;
  3. else ~/.local/share/glm-studio/glm-studio.db.
The folder is created when missing.

Opening the file (`open_store()`):
  - an older schema is upgraded by numbered migrations (storage/schema.py), recorded in the
    `_sqlite_migrations` table;
  - a newer schema (written by a later GLM Studio) raises NewerSchemaError and nothing is written;
  - a damaged file (not a database, or failing PRAGMA quick_check) is renamed to
    `<name>.corrupt-<UTC time>` (with its -wal/-shm), a fresh database is started, and
    `store.recovered_from` holds the new name of the old file so the app can tell the user.

Conversations belong to an `owner` (the visitor id the UI keeps in a cookie); methods taking
`owner=None` act on everyone's (the admin view).
"""

from .schema import SCHEMA_VERSION, NewerSchemaError
from .store import (
    BENCH_COLUMNS, EXPORT_FORMAT, EXPORT_VERSION, FINISH_REASONS, ROLES,
    ReplyWriter, Store, default_db_path, open_store,
)

__all__ = [
    "BENCH_COLUMNS", "EXPORT_FORMAT", "EXPORT_VERSION", "FINISH_REASONS", "ROLES", "SCHEMA_VERSION",
    "NewerSchemaError", "ReplyWriter", "Store", "default_db_path", "open_store",
]
