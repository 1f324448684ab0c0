"""initial responses schema

Revision ID: responses_0001
Revises: 
"""
from alembic import op
import sqlalchemy as sa


revision = 'responses_0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table('results',
    sa.Column('instruction_id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('device_id', sa.String(length=255), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('columns', sa.JSON(), nullable=True),
    sa.Column('rows', sa.JSON(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('updated_at', sa.Float(), nullable=False),
    sa.Column('expires_at', sa.Float(), nullable=True),
    sa.PrimaryKeyConstraint('instruction_id', 'device_id')
    )
    with op.batch_alter_table('results', schema=None) as batch_op:
        batch_op.create_index('ix_results_state', ['instruction_id', 'state'], unique=False)




def downgrade() -> None:

    with op.batch_alter_table('results', schema=None) as batch_op:
        batch_op.drop_index('ix_results_state')

    op.drop_table('results')

