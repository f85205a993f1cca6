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

Ownership is enforced here, not in the pages. Every conversation belongs to an `owner`: the
visitor id (a non-empty string) the UI keeps in a cookie. Every method that reads or changes a
conversation or its messages takes the owner and checks it in the same locked read or transaction;
a conversation that does not exist and one that belongs to someone else raise the same
NotOwnerError ("no conversation <id> of yours"), so a visitor cannot probe which ids exist.
The operator's read-only view passes the sentinel EVERYONE as owner: the read methods
(list_conversations, get_conversation, messages, search, export_conversations, export_markdown)
then see every visitor's conversations; the methods that change anything refuse it with
NotOwnerError. `conversation_owner(id)` tells the app whose a conversation is (e.g. for API keys).
Benchmark runs have no owner: the app keeps them to the operator.

Imports (`import_conversations`) are checked through before anything is written (storage/imports.py):
bad input raises InvalidImport, a ValueError whose message tells the user what is wrong and where.
"""

from .imports import MAX_IMPORT_BYTES, InvalidImport
from .schema import EXPORT_FORMAT, EXPORT_VERSION, FINISH_REASONS, ROLES, SCHEMA_VERSION, NewerSchemaError
from .store import BENCH_COLUMNS, EVERYONE, NotOwnerError, ReplyWriter, Store, default_db_path, open_store

__all__ = [
    "BENCH_COLUMNS", "EVERYONE", "EXPORT_FORMAT", "EXPORT_VERSION", "FINISH_REASONS", "MAX_IMPORT_BYTES", "ROLES",
    "SCHEMA_VERSION", "InvalidImport", "NewerSchemaError", "NotOwnerError", "ReplyWriter", "Store",
    "default_db_path", "open_store",
]
