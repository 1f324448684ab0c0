"""catalog rules, rule set, seen entries, keys

Revision ID: catalog_0001
Revises: 
"""
from alembic import op
import sqlalchemy as sa


revision = 'catalog_0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('catalog_keys',
    sa.Column('key_hash', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('key_hash'),
    sa.UniqueConstraint('name')
    )
    op.create_table('catalog_rules',
    sa.Column('id', sa.String(length=128), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('match', sa.String(length=8), nullable=False),
    sa.Column('title', sa.String(length=1024), nullable=False),
    sa.Column('publisher', sa.String(length=1024), nullable=True),
    sa.Column('vendor', sa.String(length=255), nullable=False),
    sa.Column('product', sa.String(length=255), nullable=False),
    sa.Column('category', sa.String(length=128), nullable=False),
    sa.Column('priority', sa.Integer(), server_default='0', nullable=False),
    sa.Column('version_pattern', sa.String(length=1024), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('catalog_ruleset',
    sa.Column('id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('version', sa.String(length=64), nullable=False),
    sa.Column('source', sa.String(length=1024), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('rules', sa.Integer(), nullable=False),
    sa.Column('imported_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('catalog_seen',
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('publisher', sa.String(length=512), nullable=False),
    sa.Column('title', sa.String(length=512), nullable=False),
    sa.Column('version', sa.String(length=512), nullable=False),
    sa.Column('rule_id', sa.String(length=128), nullable=True),
    sa.Column('count', sa.Integer(), server_default='1', nullable=False),
    sa.Column('first_seen', sa.Float(), nullable=False),
    sa.Column('last_seen', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('key')
    )
    with op.batch_alter_table('catalog_seen', schema=None) as batch_op:
        batch_op.create_index('ix_catalog_seen_rule', ['rule_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('catalog_seen', schema=None) as batch_op:
        batch_op.drop_index('ix_catalog_seen_rule')

    op.drop_table('catalog_seen')
    op.drop_table('catalog_ruleset')
    op.drop_table('catalog_rules')
    op.drop_table('catalog_keys')
