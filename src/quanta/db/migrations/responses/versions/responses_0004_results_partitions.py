"""results partitioned by day of expiry on PostgreSQL; expires_at NOT NULL (+Infinity: never)

On PostgreSQL the unpartitioned ``results`` is renamed aside, a ``PARTITION BY RANGE (expires_at)``
table takes its name (primary key (instruction_id, device_id, expires_at): a partitioned table's
key must hold the partition key; one row per (instruction, device) is kept by the store, see
``store.insert_targets``), partitions are made for every day of expiry in the data and the days
ahead, the rows are copied in and the old table dropped. On SQLite the table stays as it is but
for ``expires_at``, now NOT NULL like the partitioned one's. In both, a NULL expiry (never) becomes
+Infinity, and back on downgrade.

Revision ID: responses_0004
Revises: responses_0003
"""
from alembic import op
import sqlalchemy as sa

from quanta.db import partitions

revision = 'responses_0004'
down_revision = 'responses_0003'
branch_labels = None
depends_on = None

COLUMNS = "instruction_id, device_id, state, columns, rows, error, updated_at"
_TABLE = ("CREATE TABLE {name} (instruction_id INTEGER NOT NULL, device_id VARCHAR(255) NOT NULL, "
          "state VARCHAR(16) NOT NULL, columns JSON, rows JSON, error TEXT, updated_at FLOAT NOT NULL, "
          "expires_at FLOAT{null}, CONSTRAINT {name}_pkey PRIMARY KEY ({key})){tail}")


def _rename_aside(old: str, new: str) -> None:
    op.execute(f"ALTER TABLE {old} RENAME TO {new}")
    op.execute(f"ALTER TABLE {new} RENAME CONSTRAINT {old}_pkey TO {new}_pkey")


def _indexes(table: str, suffix: str = "") -> None:
    op.execute(f"CREATE INDEX ix_results_state{suffix} ON {table} (instruction_id, state)")
    op.execute(f"CREATE INDEX ix_results_expires_at{suffix} ON {table} (expires_at)")


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        op.execute("UPDATE results SET expires_at = 9e999 WHERE expires_at IS NULL")  # 9e999: SQLite's +Inf
        with op.batch_alter_table('results', schema=None) as batch_op:
            batch_op.alter_column('expires_at', existing_type=sa.Float(), nullable=False)
        return
    _rename_aside("results", "results_unpartitioned")
    op.execute("DROP INDEX ix_results_state")
    op.execute("DROP INDEX ix_results_expires_at")
    op.execute(_TABLE.format(name="results", null=" NOT NULL", key="instruction_id, device_id, expires_at",
                             tail=" PARTITION BY RANGE (expires_at)"))
    _indexes("results")
    days = [int(d) for d in bind.exec_driver_sql(
        "SELECT DISTINCT floor(expires_at / %(day)s)::bigint FROM results_unpartitioned "
        "WHERE expires_at >= 0 AND expires_at < %(never)s", {"day": partitions.DAY, "never": partitions.NEVER_FROM}).scalars()]
    partitions.ensure(bind, [d * partitions.DAY for d in days], ahead=partitions.AHEAD_DAYS)
    op.execute(f"INSERT INTO results ({COLUMNS}, expires_at) SELECT {COLUMNS}, COALESCE(expires_at, 'Infinity') "
               "FROM results_unpartitioned")
    op.execute("DROP TABLE results_unpartitioned")


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        with op.batch_alter_table('results', schema=None) as batch_op:
            batch_op.alter_column('expires_at', existing_type=sa.Float(), nullable=True)
        op.execute("UPDATE results SET expires_at = NULL WHERE expires_at = 9e999")
        return
    op.execute(_TABLE.format(name="results_unpartitioned", null="", key="instruction_id, device_id", tail=""))
    op.execute(f"INSERT INTO results_unpartitioned ({COLUMNS}, expires_at) SELECT {COLUMNS}, "
               "CASE WHEN expires_at = 'Infinity' THEN NULL ELSE expires_at END FROM results "
               "ON CONFLICT DO NOTHING")
    op.execute("DROP TABLE results")  # and its partitions
    _rename_aside("results_unpartitioned", "results")
    _indexes("results")
