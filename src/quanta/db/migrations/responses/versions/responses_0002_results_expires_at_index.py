"""index on results.expires_at, for the response-TTL purge

Revision ID: responses_0002
Revises: responses_0001
"""
from alembic import op


revision = 'responses_0002'
down_revision = 'responses_0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('results', schema=None) as batch_op:
        batch_op.create_index('ix_results_expires_at', ['expires_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('results', schema=None) as batch_op:
        batch_op.drop_index('ix_results_expires_at')
