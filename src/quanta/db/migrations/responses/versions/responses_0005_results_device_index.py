"""index on results (device_id, instruction_id): a device's own recent instructions (the portal's
device page, ``store.device_results``) without scanning the table

On PostgreSQL the index is made on the partitioned ``results`` and so on every partition (new
partitions get it from ``quanta.db.partitions``).

Revision ID: responses_0005
Revises: responses_0004
"""
from alembic import op


revision = 'responses_0005'
down_revision = 'responses_0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_results_device', 'results', ['device_id', 'instruction_id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_results_device', table_name='results')
