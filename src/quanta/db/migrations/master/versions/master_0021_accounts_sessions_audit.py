"""accounts: sessions, login failures and locks, user columns, an append-only audit log

Revision ID: master_0021
Revises: master_0020_certs

``sessions`` holds signed-in sessions by the SHA-256 of their token; ``login_failures`` and
``login_locks`` throttle logins per user name and per source address. ``audit_log`` gains the
source address and the before/after state of a change, indexes for its queries, and triggers
(SQLite and PostgreSQL) that refuse UPDATE and DELETE (and, on PostgreSQL, TRUNCATE): audit rows
cannot be changed through any interface. The old ``api_tokens`` table is left as it is for the
routes that still use it.
"""
from alembic import op
import sqlalchemy as sa


revision = 'master_0021'
down_revision = 'master_0020_certs'
branch_labels = None
depends_on = None

_REFUSE = "audit_log is append-only: rows cannot be changed or deleted"


def upgrade() -> None:
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.add_column(sa.Column('updated_at', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('password_changed_at', sa.Float(), nullable=True))

    op.create_table('sessions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('source', sa.String(length=64), server_default='', nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('last_used_at', sa.Float(), nullable=False),
    sa.Column('expires_at', sa.Float(), nullable=False),
    sa.Column('absolute_expires_at', sa.Float(), nullable=False),
    sa.Column('revoked_at', sa.Float(), nullable=True),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_sessions_token_hash', 'sessions', ['token_hash'], unique=True)
    op.create_index('ix_sessions_user', 'sessions', ['user_id'], unique=False)

    op.create_table('login_failures',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('at', sa.Float(), nullable=False),
    sa.Column('username', sa.String(length=128), nullable=True),
    sa.Column('source', sa.String(length=64), nullable=False),
    sa.Column('pending', sa.Boolean(), server_default=sa.false(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_login_failures_user', 'login_failures', ['username', 'at'], unique=False)
    op.create_index('ix_login_failures_source', 'login_failures', ['source', 'at'], unique=False)
    op.create_index('ix_login_failures_at', 'login_failures', ['at'], unique=False)

    op.create_table('login_locks',
    sa.Column('kind', sa.String(length=8), nullable=False),
    sa.Column('subject', sa.String(length=128), nullable=False),
    sa.Column('locked_at', sa.Float(), nullable=False),
    sa.Column('locked_until', sa.Float(), nullable=False),
    sa.Column('failures', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('kind', 'subject')
    )
    op.create_index('ix_login_locks_until', 'login_locks', ['locked_until'], unique=False)

    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.add_column(sa.Column('source', sa.String(length=64), server_default='', nullable=False))
        batch_op.add_column(sa.Column('state_before', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('state_after', sa.JSON(), nullable=True))
    op.create_index('ix_audit_log_at', 'audit_log', ['at'], unique=False)
    op.create_index('ix_audit_log_actor', 'audit_log', ['actor', 'at'], unique=False)
    op.create_index('ix_audit_log_action', 'audit_log', ['action', 'at'], unique=False)
    op.create_index('ix_audit_log_target', 'audit_log', ['target', 'at'], unique=False)

    if op.get_bind().dialect.name == 'postgresql':
        op.execute(f"""
            CREATE FUNCTION quanta_audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION '{_REFUSE}';
            END
            $$""")
        op.execute("CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log "
                   "FOR EACH ROW EXECUTE PROCEDURE quanta_audit_log_append_only()")
        op.execute("CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log "
                   "FOR EACH STATEMENT EXECUTE PROCEDURE quanta_audit_log_append_only()")
    else:
        for verb in ('UPDATE', 'DELETE'):
            op.execute(f"CREATE TRIGGER audit_log_no_{verb.lower()} BEFORE {verb} ON audit_log "
                       f"BEGIN SELECT RAISE(ABORT, '{_REFUSE}'); END")


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_truncate ON audit_log")
        op.execute("DROP TRIGGER IF EXISTS audit_log_append_only ON audit_log")
        op.execute("DROP FUNCTION IF EXISTS quanta_audit_log_append_only()")
    else:
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_update")
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_delete")
    op.drop_index('ix_audit_log_target', table_name='audit_log')
    op.drop_index('ix_audit_log_action', table_name='audit_log')
    op.drop_index('ix_audit_log_actor', table_name='audit_log')
    op.drop_index('ix_audit_log_at', table_name='audit_log')
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.drop_column('state_after')
        batch_op.drop_column('state_before')
        batch_op.drop_column('source')
    op.drop_index('ix_login_locks_until', table_name='login_locks')
    op.drop_table('login_locks')
    op.drop_index('ix_login_failures_at', table_name='login_failures')
    op.drop_index('ix_login_failures_source', table_name='login_failures')
    op.drop_index('ix_login_failures_user', table_name='login_failures')
    op.drop_table('login_failures')
    op.drop_index('ix_sessions_user', table_name='sessions')
    op.drop_index('ix_sessions_token_hash', table_name='sessions')
    op.drop_table('sessions')
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.drop_column('password_changed_at')
        batch_op.drop_column('updated_at')
