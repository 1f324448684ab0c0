"""drop the unused api_tokens table; the sealed SMTP password column becomes Text

Revision ID: master_0024_tokens_smtp
Revises: master_0023_attrs

``api_tokens`` held the 8-hour tokens from before the sessions of quanta.accounts
(master_0021); nothing has read or written it since. ``smtp_settings.password`` holds a sealed
secret (quanta.secretbox: ``fernet:`` and a token about 4/3 of the plain size plus 76 bytes),
which String(255) limited to 127 plain bytes; Text lets the secret box set the limit (4 KiB).

Downgrade recreates ``api_tokens`` empty (its tokens stopped working with master_0021) and
narrows the column back to String(255); it refuses, changing nothing, while a stored password
is longer than that column holds.
"""
from alembic import op
import sqlalchemy as sa


revision = 'master_0024_tokens_smtp'
down_revision = 'master_0023_attrs'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_table('api_tokens')
    with op.batch_alter_table('smtp_settings') as batch:
        batch.alter_column('password', existing_type=sa.String(length=255), type_=sa.Text(), existing_nullable=True)


def downgrade() -> None:
    longest = op.get_bind().execute(sa.text('SELECT MAX(LENGTH(password)) FROM smtp_settings')).scalar()
    if longest is not None and longest > 255:
        raise RuntimeError(f"the stored SMTP password is sealed in {longest} characters; String(255) holds 255: "
                           "set a shorter one (quanta smtp) before downgrading")
    with op.batch_alter_table('smtp_settings') as batch:
        batch.alter_column('password', existing_type=sa.Text(), type_=sa.String(length=255), existing_nullable=True)
    op.create_table('api_tokens',
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('expires_at', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('token_hash')
    )
