"""coordinator workflow and smtp settings

Revision ID: master_0002
Revises: master_0001
"""
from alembic import op
import sqlalchemy as sa


revision = 'master_0002'
down_revision = 'master_0001'
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table('approval_codes',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('instruction_id', sa.Integer(), nullable=False),
    sa.Column('username', sa.String(length=128), nullable=False),
    sa.Column('code_hash', sa.String(length=64), nullable=False),
    sa.Column('expires_at', sa.Float(), nullable=False),
    sa.Column('used', sa.Boolean(), server_default=sa.false(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('smtp_settings',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('enabled', sa.Boolean(), server_default=sa.true(), nullable=False),
    sa.Column('host', sa.String(length=255), nullable=False),
    sa.Column('port', sa.Integer(), nullable=False),
    sa.Column('username', sa.String(length=255), nullable=True),
    sa.Column('password', sa.String(length=255), nullable=True),
    sa.Column('starttls', sa.Boolean(), server_default=sa.false(), nullable=False),
    sa.Column('from_addr', sa.String(length=255), nullable=False),
    sa.Column('require_approval_code', sa.Boolean(), server_default=sa.false(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('instructions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('instruction_ttl', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('response_ttl', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('scheduled_at', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('approval_expires_at', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('decided_by', sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column('decided_at', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('decision_reason', sa.Text(), nullable=True))




def downgrade() -> None:

    with op.batch_alter_table('instructions', schema=None) as batch_op:
        batch_op.drop_column('decision_reason')
        batch_op.drop_column('decided_at')
        batch_op.drop_column('decided_by')
        batch_op.drop_column('approval_expires_at')
        batch_op.drop_column('scheduled_at')
        batch_op.drop_column('response_ttl')
        batch_op.drop_column('instruction_ttl')

    op.drop_table('smtp_settings')
    op.drop_table('approval_codes')

