"""integrate: device source and connector runs

Revision ID: master_0003
Revises: master_0002
"""
from alembic import op
import sqlalchemy as sa


revision = 'master_0003'
down_revision = 'master_0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('integrate_runs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('connector', sa.String(length=128), nullable=False),
    sa.Column('trigger', sa.String(length=32), nullable=False),
    sa.Column('started_at', sa.Float(), nullable=False),
    sa.Column('finished_at', sa.Float(), nullable=False),
    sa.Column('ok', sa.Boolean(), nullable=False),
    sa.Column('created', sa.Integer(), server_default='0', nullable=False),
    sa.Column('updated', sa.Integer(), server_default='0', nullable=False),
    sa.Column('unchanged', sa.Integer(), server_default='0', nullable=False),
    sa.Column('removed', sa.Integer(), server_default='0', nullable=False),
    sa.Column('skipped', sa.Integer(), server_default='0', nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('integrate_runs', schema=None) as batch_op:
        batch_op.create_index('ix_integrate_runs_connector', ['connector', 'id'], unique=False)

    with op.batch_alter_table('devices', schema=None) as batch_op:
        batch_op.add_column(sa.Column('source', sa.String(length=128), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('devices', schema=None) as batch_op:
        batch_op.drop_column('source')

    with op.batch_alter_table('integrate_runs', schema=None) as batch_op:
        batch_op.drop_index('ix_integrate_runs_connector')

    op.drop_table('integrate_runs')
