"""The database schema as numbered migrations (sqlite-utils' `Migrations`, the simonw/llm pattern),
and the values its columns and the conversations export take.

Each migration is a plain function, applied once, in order, and recorded by name in the
`_sqlite_migrations` table. Never edit a released migration: add the next number instead.
A database that records a migration this code does not know was written by a newer version;
it is refused before anything is written to it. A migration that changes what a conversation or a
message holds also changes the export: bump EXPORT_VERSION.
"""

from contextlib import contextmanager

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations


ROLES = ("system", "user", "assistant", "observation")
FINISH_REASONS = ("stop", "length", "stopped", "error")  # "stopped": by the user
MESSAGE_STATS = ("prompt_tokens", "new_tokens", "ttft_s", "prefill_tok_s", "decode_tok_s")
EXPORT_FORMAT = "glm-studio-conversations"
EXPORT_VERSION = 1


class NewerSchemaError(RuntimeError):
    """The database was written by a newer GLM Studio; it has been left untouched."""


def m001_conversations(db: Database):
    db["conversations"].create(
        {
            "id": str, "owner": str, "title": str, "model": str, "precision": str,
            "system_prompt": str, "params": str, "created_at": str, "updated_at": str,
        },
        pk="id",
        not_null=["owner", "created_at", "updated_at"],
    )
    db["conversations"].create_index(["owner", "updated_at"])
    # finish_reason NULL on an assistant reply means it never finished: the server died mid-reply.
    db["messages"].create(
        {
            "id": int, "conversation_id": str, "role": str, "content": str,
            "finish_reason": str, "error": str,
            "prompt_tokens": int, "new_tokens": int, "ttft_s": float,
            "prefill_tok_s": float, "decode_tok_s": float, "stats": str,
            "created_at": str, "updated_at": str,
        },
        pk="id",
        foreign_keys=[("conversation_id", "conversations", "id")],
        not_null=["conversation_id", "role", "content", "created_at", "updated_at"],
    )
    db["messages"].create_index(["conversation_id", "id"])


def m002_message_search(db: Database):
    # trigram, not unicode61: Chinese has no spaces, so word tokens would be whole sentences.
    db["messages"].enable_fts(["content"], tokenize="trigram", create_triggers=True)


def m003_benchmarks(db: Database):
    db["bench_runs"].create(
        {"id": int, "status": str, "machine": str, "settings": str, "created_at": str, "finished_at": str},
        pk="id",
        not_null=["status", "created_at"],
    )
    db["bench_results"].create(
        {
            "id": int, "run_id": int, "model": str, "precision": str,
            "prompt_tokens": int, "new_tokens": int, "load_s": float, "peak_rss_gb": float,
            "prefill_tok_s": float, "decode_tok_s": float, "ttft_s": float,
            "top1_agreement": float, "mean_kl": float, "perplexity": float,
            "result": str, "created_at": str,
        },
        pk="id",
        foreign_keys=[("run_id", "bench_runs", "id")],
        not_null=["run_id", "result", "created_at"],
    )
    db["bench_results"].create_index(["run_id", "id"])


MIGRATIONS = (m001_conversations, m002_message_search, m003_benchmarks)
SCHEMA_VERSION = len(MIGRATIONS)

migrations = Migrations("glm_studio")
for step in MIGRATIONS:
    migrations()(step)


def check_not_newer(db: Database, where: str):
    """Raise NewerSchemaError if `db` records migrations this code does not know. Reads only."""
    known = {step.__name__ for step in MIGRATIONS}
    unknown = sorted({m.name for m in migrations.applied(db)} - known)
    if unknown:
        raise NewerSchemaError(
            f"The GLM Studio database {where} was written by a newer version of GLM Studio "
            f"(it has schema steps {', '.join(unknown)}; this version knows up to {MIGRATIONS[-1].__name__}). "
            "It was left untouched. Upgrade GLM Studio, or set GLM_STUDIO_DB to another file."
        )


@contextmanager
def write_transaction(db: Database):
    """BEGIN IMMEDIATE: take the write lock up front (waiting on the busy timeout). A deferred
    transaction that reads first fails at once with "database is locked" when it tries to write
    after another connection has committed."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.rollback()
        raise
    db.commit()


def migrate(db: Database):
    """Apply pending migrations in one write transaction, so two processes starting at once
    cannot both apply the same step."""
    if migrations.pending(db):
        with write_transaction(db):
            migrations.apply(db)
