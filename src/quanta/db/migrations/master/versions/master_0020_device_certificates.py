"""device certificates: every certificate issued to a device, for revocation

Revision ID: master_0020_certs
Revises: master_0001

Records the device certificate every enrolled device has today (``devices.cert_serial``); a
revoked device's certificate is recorded as revoked. Interaction-port certificates issued before
this revision were never recorded: they carry no device purpose, so the Switch and the
Background Channel refuse them whatever their revocation state.
"""
import time

from alembic import op
import sqlalchemy as sa


revision = 'master_0020_certs'
down_revision = 'master_0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('device_certificates',
    sa.Column('serial', sa.String(length=64), nullable=False),
    sa.Column('device_id', sa.String(length=255), nullable=False),
    sa.Column('purpose', sa.String(length=16), nullable=False),
    sa.Column('issued_at', sa.Float(), nullable=True),
    sa.Column('revoked_at', sa.Float(), nullable=True),
    sa.PrimaryKeyConstraint('serial')
    )
    op.create_index('ix_device_certificates_device', 'device_certificates', ['device_id'], unique=False)
    op.execute(sa.text(
        "INSERT INTO device_certificates (serial, device_id, purpose, issued_at, revoked_at) "
        "SELECT cert_serial, device_id, 'device', NULL, CASE WHEN revoked THEN :now ELSE NULL END "
        "FROM devices WHERE cert_serial IS NOT NULL").bindparams(now=time.time()))


def downgrade() -> None:
    op.drop_index('ix_device_certificates_device', table_name='device_certificates')
    op.drop_table('device_certificates')
