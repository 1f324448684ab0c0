"""definitions packs and rbac

Revision ID: master_0010_defs
Revises: master_0002
"""
from alembic import op
import sqlalchemy as sa


revision = 'master_0010_defs'
down_revision = 'master_0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('instructions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('instruction_set', sa.String(length=128), nullable=True))

    op.create_table('definitions',
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('instruction_set', sa.String(length=128), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('spec', sa.JSON(), nullable=False),
    sa.Column('checksum', sa.String(length=64), nullable=False),
    sa.Column('pack', sa.String(length=255), nullable=False),
    sa.Column('publisher', sa.String(length=128), nullable=False),
    sa.Column('imported_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    op.create_table('management_groups',
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('rule', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    op.create_table('publishers',
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('public_key', sa.Text(), nullable=False),
    sa.Column('added_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    op.create_table('role_assignments',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('username', sa.String(length=128), nullable=False),
    sa.Column('role', sa.String(length=64), nullable=False),
    sa.Column('instruction_set', sa.String(length=128), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('username', 'role', 'instruction_set', name='uq_role_assignment')
    )
    op.create_table('user_groups',
    sa.Column('username', sa.String(length=128), nullable=False),
    sa.Column('group_name', sa.String(length=128), nullable=False),
    sa.PrimaryKeyConstraint('username', 'group_name')
    )



def downgrade() -> None:
    with op.batch_alter_table('instructions', schema=None) as batch_op:
        batch_op.drop_column('instruction_set')

    op.drop_table('user_groups')
    op.drop_table('role_assignments')
    op.drop_table('publishers')
    op.drop_table('management_groups')
    op.drop_table('definitions')

