"""docs/configuration.md is generated from the settings' declarations and must not go stale: a new
quanta.toml key or agent.conf setting without a description fails here."""

from __future__ import annotations

from quanta.agent.config import AGENT_SETTINGS
from quanta.configdoc import DOCS_PATH, generate
from quanta.settings import Settings


def test_every_setting_is_described() -> None:
    missing = [n for n, f in Settings.model_fields.items() if not (f.description or "").strip()]
    assert not missing, f"quanta.toml keys without a description (Field(description=...)): {missing}"
    assert all(s.meaning.strip() for s in AGENT_SETTINGS)


def test_configuration_md_is_current() -> None:
    text = generate()
    for name in Settings.model_fields:
        assert f"| `{name}` |" in text
    assert DOCS_PATH.read_text() == text, "docs/configuration.md is out of date: run 'python -m quanta.configdoc'"
