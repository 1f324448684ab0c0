"""quanta group set: tags (which a device reports of itself) and server-assigned attributes (which
only an administrator sets); a careless NAME=VALUE is one clear line, exit 2, nothing changed."""

from __future__ import annotations

from pathlib import Path

from conftest import quanta
import sqlalchemy as sa

from quanta.db import make_engine
from quanta.db.tables import management_groups
from quanta.settings import DataDir, load_settings


def test_group_rules_with_attributes_and_careless_pairs(tmp_path: Path) -> None:
    root = tmp_path / "srv"
    quanta("init", str(root), "--server-name", "localhost")
    r = quanta("group", "set", str(root), "--name", "paris", "--attribute", "site=paris", "--tag", "team=ops")
    assert "paris" in r.stdout
    engine = make_engine(DataDir(root).master_url(load_settings(root)))

    def rules() -> dict[str, dict]:
        with engine.connect() as c:
            return {r.name: r.rule for r in c.execute(sa.select(management_groups))}

    assert rules()["paris"] == {"attributes": {"site": "paris"}, "tags": {"team": "ops"}}
    for bad in (["--attribute", "site"], ["--tag", "=x"], []):
        r = quanta("group", "set", str(root), "--name", "broken", *bad, check=False)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (bad, r.stderr)
        assert ("NAME=VALUE" in r.stderr) or ("at least one of" in r.stderr), r.stderr
    assert "broken" not in rules()
