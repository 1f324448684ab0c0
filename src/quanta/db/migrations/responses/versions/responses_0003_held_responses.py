"""held responses: late answers and answers the Core could not count

Revision ID: responses_0003
Revises: responses_0002
"""
from alembic import op
import sqlalchemy as sa


revision = 'responses_0003'
down_revision = 'responses_0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('held_responses',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('instruction_id', sa.Integer(), nullable=False),
    sa.Column('device_id', sa.String(length=255), nullable=False),
    sa.Column('switch', sa.String(length=128), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('response', sa.LargeBinary(), nullable=False),
    sa.Column('received_at', sa.Float(), nullable=False),
    sa.Column('expires_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('held_responses', schema=None) as batch_op:
        batch_op.create_index('ix_held_responses_instruction', ['instruction_id', 'kind'], unique=False)
        batch_op.create_index('ix_held_responses_expires', ['expires_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('held_responses', schema=None) as batch_op:
        batch_op.drop_index('ix_held_responses_expires')
        batch_op.drop_index('ix_held_responses_instruction')
    op.drop_table('held_responses')
