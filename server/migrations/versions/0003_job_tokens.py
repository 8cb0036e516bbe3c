"""job tokens bound to a run; webhook secrets encrypted at rest (longer column)

Revision ID: 0003
Revises: 0002
Create Date: 2027-01-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tokens", schema=None) as batch_op:
        batch_op.add_column(sa.Column("run_id", sa.String(length=36), nullable=True))
        batch_op.create_index(batch_op.f("ix_tokens_run_id"), ["run_id"], unique=False)
        batch_op.create_foreign_key(
            batch_op.f("fk_tokens_run_id_runs"), "runs", ["run_id"], ["id"], ondelete="CASCADE"
        )
    # A Fernet token of a 255-character secret is ~440 characters. Plain secrets written
    # before this revision are encrypted by the server at its next start (secrets.py).
    with op.batch_alter_table("webhooks", schema=None) as batch_op:
        batch_op.alter_column(
            "secret", existing_type=sa.String(length=255), type_=sa.Text(), existing_nullable=True
        )


def downgrade() -> None:
    with op.batch_alter_table("webhooks", schema=None) as batch_op:
        batch_op.alter_column(
            "secret", existing_type=sa.Text(), type_=sa.String(length=255), existing_nullable=True
        )
    with op.batch_alter_table("tokens", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_tokens_run_id_runs"), type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_tokens_run_id"))
        batch_op.drop_column("run_id")
