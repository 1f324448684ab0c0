"""approvals: N-of-M approval per instruction set, one row per approval, why the Core has not issued

Revision ID: master_0022
Revises: master_0020_certs (and needs master_0002)

``instruction_sets`` holds how many distinct approvers (never the requester) an action of the set
needs ("*": the default); an action copies the number into ``instructions.approvers_required``
when it is requested, so a later change of the policy does not change a pending request.
``approvals`` records each approval (who, when, why), once per person. ``instructions.issue_error``
says why an approved instruction is still waiting for the Core.
"""
from alembic import op
import sqlalchemy as sa


revision = 'master_0022'
down_revision = 'master_0020_certs'
branch_labels = None
depends_on = 'master_0002'  # decided_by and the workflow columns of instructions


def upgrade() -> None:
    op.create_table('instruction_sets',
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('approvers_required', sa.Integer(), server_default='1', nullable=False),
    sa.CheckConstraint('approvers_required >= 1 AND approvers_required <= 100', name='ck_instruction_sets_approvers'),
    sa.PrimaryKeyConstraint('name')
    )
    op.create_table('approvals',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('instruction_id', sa.Integer(), nullable=False),
    sa.Column('approver', sa.String(length=128), nullable=False),
    sa.Column('approved_at', sa.Float(), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('instruction_id', 'approver', name='uq_approvals_instruction_approver')
    )
    with op.batch_alter_table('instructions') as batch:
        batch.add_column(sa.Column('approvers_required', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('issue_error', sa.Text(), nullable=True))
    # an instruction approved before this revision had one approver: record it
    op.execute(sa.text(
        "INSERT INTO approvals (instruction_id, approver, approved_at, reason) "
        "SELECT id, decided_by, decided_at, decision_reason FROM instructions "
        "WHERE decided_by IS NOT NULL AND decided_at IS NOT NULL "
        "AND status NOT IN ('rejected', 'approval_expired', 'pending_approval') "
        "AND NOT (status = 'cancelled' AND decision_reason = 'cancelled before it ran')"))


def downgrade() -> None:
    with op.batch_alter_table('instructions') as batch:
        batch.drop_column('issue_error')
        batch.drop_column('approvers_required')
    op.drop_table('approvals')
    op.drop_table('instruction_sets')
