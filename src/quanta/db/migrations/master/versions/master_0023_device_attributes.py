"""device attributes: server-assigned name/value pairs management-group rules can match

Revision ID: master_0023_attrs
Revises: master_0022

A device sets its own tags in its hello; these attributes are set only by an administrator
(``PUT /Consumer/Devices/{device}/Attributes``), so a group rule on them cannot be met by a
device that tags itself.
"""
from alembic import op
import sqlalchemy as sa


revision = 'master_0023_attrs'
down_revision = 'master_0022'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('device_attributes',
    sa.Column('device_id', sa.String(length=255), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('value', sa.String(length=255), nullable=False),
    sa.Column('set_by', sa.String(length=128), nullable=False),
    sa.Column('set_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('device_id', 'name')
    )


def downgrade() -> None:
    op.drop_table('device_attributes')
