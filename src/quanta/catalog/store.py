"""Catalog database operations: rule sets, normalisation with the seen-entries record, products, keys."""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from importlib import resources
from typing import Any

import sqlalchemy as sa

from .rules import Matcher, Normalized, RawEntry, Rule, RuleFile, parse_rule_file
from .tables import catalog_keys, catalog_rules, catalog_ruleset, catalog_seen

SEED_FILE = "seed_rules.toml"
KEY_PREFIX = "qcat_"


def seed_bytes() -> bytes:
    return resources.files("quanta.catalog").joinpath(SEED_FILE).read_bytes()


def _rule_row(position: int, r: Rule) -> dict[str, Any]:
    return dict(id=r.id, position=position, match=r.match, title=r.title, publisher=r.publisher, vendor=r.vendor,
                product=r.product, category=r.category, priority=r.priority, version_pattern=r.version_pattern)


def _load_rules(c: sa.Connection) -> list[Rule]:
    rows = c.execute(sa.select(catalog_rules).order_by(catalog_rules.c.position)).mappings()
    return [Rule.model_validate({k: v for k, v in r.items() if k != "position"}) for r in rows]


def _seen_key(e: RawEntry) -> str:
    return hashlib.sha256(f"{e.publisher}\0{e.title}\0{e.version}".encode()).hexdigest()


def import_rules(engine: sa.Engine, data: bytes, source: str) -> RuleFile:
    """Validate ``data`` and replace the whole rule set in one transaction; re-match every seen entry.

    A file that does not validate raises :class:`RuleFileError` before anything is written.
    """
    rf = parse_rule_file(data)
    matcher = Matcher(rf.rule)
    with engine.begin() as c:
        c.execute(catalog_rules.delete())
        if rf.rule:
            c.execute(catalog_rules.insert(), [_rule_row(i, r) for i, r in enumerate(rf.rule)])
        c.execute(catalog_ruleset.delete())
        c.execute(catalog_ruleset.insert().values(id=1, name=rf.name, version=rf.version, source=source[:1024],
                                                  sha256=hashlib.sha256(data).hexdigest(), rules=len(rf.rule),
                                                  imported_at=time.time()))
        seen = c.execute(sa.select(catalog_seen.c.key, catalog_seen.c.publisher, catalog_seen.c.title,
                                   catalog_seen.c.version, catalog_seen.c.rule_id)).all()
        changes = []
        for key, pub, title, ver, old in seen:
            best = matcher.best(RawEntry(pub, title, ver))
            new = best.rule.id if best else None
            if new != old:
                changes.append({"b_key": key, "b_rule": new})
        if changes:
            c.execute(catalog_seen.update().where(catalog_seen.c.key == sa.bindparam("b_key"))
                      .values(rule_id=sa.bindparam("b_rule")), changes)
    return rf


def ensure_seeded(engine: sa.Engine) -> None:
    """Load the shipped seed rules if no rule set was ever imported."""
    with engine.connect() as c:
        if c.execute(sa.select(catalog_ruleset.c.id)).first() is not None:
            return
    try:
        import_rules(engine, seed_bytes(), "seed")
    except sa.exc.IntegrityError:  # another process seeded it at the same moment
        pass


def ruleset(engine: sa.Engine) -> dict[str, Any] | None:
    with engine.connect() as c:
        row = c.execute(sa.select(catalog_ruleset)).mappings().first()
        return dict(row) if row else None


class Catalog:
    """Normalises with the rule set in the database; reloads it when a new rule set is imported."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._matcher: Matcher | None = None
        self._loaded: tuple[str, float] | None = None

    def matcher(self) -> Matcher:
        with self.engine.connect() as c:
            meta = c.execute(sa.select(catalog_ruleset.c.sha256, catalog_ruleset.c.imported_at)).first()
            stamp = (meta[0], meta[1]) if meta else ("", 0.0)
            with self._lock:
                if self._matcher is None or self._loaded != stamp:
                    self._matcher = Matcher(_load_rules(c))
                    self._loaded = stamp
                return self._matcher

    def normalize(self, entries: list[RawEntry], record: bool = True) -> list[Normalized]:
        m = self.matcher()
        out = [m.normalize(e) for e in entries]
        if record and out:
            self._record(out)
        return out

    def _record(self, results: list[Normalized]) -> None:
        now = time.time()
        by_key: dict[str, tuple[Normalized, int]] = {}
        for n in results:
            k = _seen_key(n.raw)
            prev = by_key.get(k)
            by_key[k] = (n, (prev[1] if prev else 0) + 1)
        keys = list(by_key)
        with self.engine.begin() as c:
            known: set[str] = set()
            for i in range(0, len(keys), 500):
                known |= {r[0] for r in c.execute(sa.select(catalog_seen.c.key)
                                                  .where(catalog_seen.c.key.in_(keys[i:i + 500])))}
            new = [dict(key=k, publisher=n.raw.publisher, title=n.raw.title, version=n.raw.version,
                        rule_id=n.rule_id, count=cnt, first_seen=now, last_seen=now)
                   for k, (n, cnt) in by_key.items() if k not in known]
            old = [dict(b_key=k, b_n=cnt, b_rule=n.rule_id) for k, (n, cnt) in by_key.items() if k in known]
            if old:
                c.execute(catalog_seen.update().where(catalog_seen.c.key == sa.bindparam("b_key"))
                          .values(count=catalog_seen.c.count + sa.bindparam("b_n"), last_seen=now,
                                  rule_id=sa.bindparam("b_rule")), old)
            if new:
                try:
                    with c.begin_nested():
                        c.execute(catalog_seen.insert(), new)
                except sa.exc.IntegrityError:  # a concurrent request recorded some of them first
                    for row in new:
                        with c.begin_nested():
                            if c.execute(sa.select(catalog_seen.c.key).where(catalog_seen.c.key == row["key"])).first():
                                c.execute(catalog_seen.update().where(catalog_seen.c.key == row["key"])
                                          .values(count=catalog_seen.c.count + row["count"], last_seen=now))
                            else:
                                c.execute(catalog_seen.insert().values(**row))


def _like(q: str) -> str:
    esc = q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{esc.lower()}%"


def products(engine: sa.Engine, q: str | None, offset: int, limit: int) -> tuple[int, list[dict[str, Any]]]:
    """Distinct (vendor, product, category) of the rule set, with how many raw entries map to each."""
    seen_n = (sa.select(catalog_seen.c.rule_id, sa.func.count().label("n"), sa.func.sum(catalog_seen.c.count).label("s"))
              .group_by(catalog_seen.c.rule_id).subquery())
    base = (sa.select(catalog_rules.c.vendor, catalog_rules.c.product, catalog_rules.c.category,
                      sa.func.count(catalog_rules.c.id).label("rules"),
                      sa.func.coalesce(sa.func.sum(seen_n.c.n), 0).label("raw_entries"),
                      sa.func.coalesce(sa.func.sum(seen_n.c.s), 0).label("reports"))
            .select_from(catalog_rules.outerjoin(seen_n, seen_n.c.rule_id == catalog_rules.c.id))
            .group_by(catalog_rules.c.vendor, catalog_rules.c.product, catalog_rules.c.category))
    if q:
        pat = _like(q)
        base = base.where(sa.or_(sa.func.lower(catalog_rules.c.vendor).like(pat, escape="\\"),
                                 sa.func.lower(catalog_rules.c.product).like(pat, escape="\\"),
                                 sa.func.lower(catalog_rules.c.category).like(pat, escape="\\")))
    sub = base.subquery()
    with engine.connect() as c:
        total = int(c.execute(sa.select(sa.func.count()).select_from(sub)).scalar_one())
        rows = c.execute(sa.select(sub).order_by(sub.c.vendor, sub.c.product).offset(offset).limit(limit)).mappings()
        return total, [dict(r) | {"raw_entries": int(r["raw_entries"]), "reports": int(r["reports"])} for r in rows]


def unmatched(engine: sa.Engine, q: str | None, offset: int, limit: int) -> tuple[int, list[dict[str, Any]]]:
    """Raw entries seen that no rule matches, most reported first."""
    cond = [catalog_seen.c.rule_id.is_(None)]
    if q:
        pat = _like(q)
        cond.append(sa.or_(sa.func.lower(catalog_seen.c.title).like(pat, escape="\\"),
                           sa.func.lower(catalog_seen.c.publisher).like(pat, escape="\\")))
    cols = [catalog_seen.c.publisher, catalog_seen.c.title, catalog_seen.c.version, catalog_seen.c.count,
            catalog_seen.c.first_seen, catalog_seen.c.last_seen]
    with engine.connect() as c:
        total = int(c.execute(sa.select(sa.func.count()).select_from(catalog_seen).where(*cond)).scalar_one())
        rows = c.execute(sa.select(*cols).where(*cond)
                         .order_by(catalog_seen.c.count.desc(), catalog_seen.c.title, catalog_seen.c.version)
                         .offset(offset).limit(limit)).mappings()
        return total, [dict(r) for r in rows]


def list_rules(engine: sa.Engine) -> list[dict[str, Any]]:
    with engine.connect() as c:
        return [dict(r) for r in c.execute(sa.select(catalog_rules).order_by(catalog_rules.c.position)).mappings()]


# ------------------------------------------------------------------------------- API keys
def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def add_key(engine: sa.Engine, name: str) -> str:
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    with engine.begin() as c:
        if c.execute(sa.select(catalog_keys.c.name).where(catalog_keys.c.name == name)).first():
            raise ValueError(f"a catalog API key named {name!r} exists (remove it first)")
        c.execute(catalog_keys.insert().values(key_hash=hash_key(key), name=name, created_at=time.time()))
    return key


def remove_key(engine: sa.Engine, name: str) -> bool:
    with engine.begin() as c:
        return c.execute(catalog_keys.delete().where(catalog_keys.c.name == name)).rowcount > 0


def list_keys(engine: sa.Engine) -> list[dict[str, Any]]:
    with engine.connect() as c:
        return [dict(r) for r in c.execute(sa.select(catalog_keys.c.name, catalog_keys.c.created_at)
                                           .order_by(catalog_keys.c.name)).mappings()]


def key_name(engine: sa.Engine, key: str) -> str | None:
    """The name of a valid key, or None. Looked up by SHA-256 (keys are 256-bit random)."""
    if not key.startswith(KEY_PREFIX) or len(key) > 128:
        return None
    with engine.connect() as c:
        row = c.execute(sa.select(catalog_keys.c.name).where(catalog_keys.c.key_hash == hash_key(key))).first()
    return row[0] if row else None
