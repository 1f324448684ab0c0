"""Schema of the Catalog database (SQLAlchemy Core).

The Catalog keeps its tables in their own migration stream (``quanta/catalog/migrations``, version
table ``alembic_version_catalog``) so that they can live in the master database (the default) or in
a database of their own on a Remote Catalog server, exactly like the Responses database.
"""

from __future__ import annotations

import sqlalchemy as sa

catalog = sa.MetaData()

# The active rule set, in file order (``position``). Replaced as a whole by an import.
catalog_rules = sa.Table(
    "catalog_rules", catalog,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("match", sa.String(8), nullable=False),  # exact | regex
    sa.Column("title", sa.String(1024), nullable=False),
    sa.Column("publisher", sa.String(1024), nullable=True),
    sa.Column("vendor", sa.String(255), nullable=False),
    sa.Column("product", sa.String(255), nullable=False),
    sa.Column("category", sa.String(128), nullable=False),
    sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
    sa.Column("version_pattern", sa.String(1024), nullable=True),
)

# One row (id = 1): which rule set is loaded, from where, when.
catalog_ruleset = sa.Table(
    "catalog_ruleset", catalog,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("version", sa.String(64), nullable=False),
    sa.Column("source", sa.String(1024), nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("rules", sa.Integer, nullable=False),
    sa.Column("imported_at", sa.Float, nullable=False),
)

# Every distinct raw (publisher, title, version) the Catalog was asked to normalise.
catalog_seen = sa.Table(
    "catalog_seen", catalog,
    sa.Column("key", sa.String(64), primary_key=True),  # sha256 of publisher \0 title \0 version
    sa.Column("publisher", sa.String(512), nullable=False),
    sa.Column("title", sa.String(512), nullable=False),
    sa.Column("version", sa.String(512), nullable=False),
    sa.Column("rule_id", sa.String(128), nullable=True),  # null: unmatched
    sa.Column("count", sa.Integer, nullable=False, server_default="1"),
    sa.Column("first_seen", sa.Float, nullable=False),
    sa.Column("last_seen", sa.Float, nullable=False),
)
sa.Index("ix_catalog_seen_rule", catalog_seen.c.rule_id)

# API keys (``quanta catalog key add``); only their SHA-256 is stored.
catalog_keys = sa.Table(
    "catalog_keys", catalog,
    sa.Column("key_hash", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(128), nullable=False, unique=True),
    sa.Column("created_at", sa.Float, nullable=False),
)
