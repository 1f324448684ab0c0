"""``quanta user ...`` and ``quanta audit`` against a real data directory, as an operator types them."""

from __future__ import annotations

import json
import time

import pytest

from conftest import quanta

PW = "correct horse battery staple"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli") / "data"
    quanta("init", str(d), "--server-name", "localhost")
    return d


@pytest.fixture
def pw(tmp_path):
    f = tmp_path / "pw"
    f.write_text(PW + "\n")
    return f


def users(root):
    return {u["username"]: u for u in json.loads(quanta("user", "list", str(root), "--json").stdout)}


def test_add_list_show_disable_enable_set_role_delete(root, pw):
    r = quanta("user", "add", str(root), "--username", "bob", "--role", "Approver", "--email", "bob@example.com",
               "--password-file", str(pw))
    assert "added bob (Approver)" in r.stdout and PW not in r.stdout
    r = quanta("user", "add", str(root), "--username", "gen", "--role", "Viewer")  # generated password, printed once
    assert "; password: " in r.stdout
    listed = users(root)
    assert listed["bob"]["role"] == "Approver" and listed["bob"]["email"] == "bob@example.com"
    assert listed["admin"]["role"] == "Full Administrator"
    assert "password" not in json.dumps(listed).replace("password_changed_at", "")
    assert json.loads(quanta("user", "show", str(root), "bob", "--json").stdout)["disabled"] is False
    quanta("user", "disable", str(root), "bob")
    assert users(root)["bob"]["disabled"] is True
    quanta("user", "enable", str(root), "bob")
    assert users(root)["bob"]["disabled"] is False
    quanta("user", "set-role", str(root), "bob", "Questioner")
    quanta("user", "set-role", str(root), "bob", "Actioner", "--instruction-set", "Processes")
    shown = json.loads(quanta("user", "show", str(root), "bob", "--json").stdout)
    assert shown["role"] == "Questioner"
    assert shown["assignments"] == [{"role": "Actioner", "instruction_set": "Processes"}]
    quanta("user", "set-role", str(root), "bob", "Actioner", "--instruction-set", "Processes", "--remove")
    assert json.loads(quanta("user", "show", str(root), "bob", "--json").stdout)["assignments"] == []
    quanta("user", "delete", str(root), "gen", "--yes")
    assert "gen" not in users(root)
    rows = json.loads(quanta("audit", str(root), "--json", "--object", "bob", "--limit", "50").stdout)["items"]
    assert [e["action"] for e in rows][::-1] == ["user_create", "user_disable", "user_enable", "user_update",
                                                "user_update", "user_update"]
    assert all(e["actor"].startswith("quanta user") and e["source"].startswith("cli:") for e in rows)


@pytest.mark.parametrize("args, message", [
    (["user", "add", "{root}", "--username", "bad name", "--role", "Viewer"], "user name may hold"),
    (["user", "add", "{root}", "--username", "x" * 200, "--role", "Viewer"], "at most 128"),
    (["user", "add", "{root}", "--username", "eve", "--role", "Emperor"], "unknown role"),
    (["user", "add", "{root}", "--username", "eve", "--role", "Viewer", "--email", "not-an-address"], "e-mail"),
    (["user", "add", "{root}", "--username", "admin", "--role", "Viewer"], "exists"),
    (["user", "show", "{root}", "nobody"], "no user 'nobody'"),
    (["user", "disable", "{root}", "nobody\x1b[2J"], "no such user"),
    (["user", "delete", "{root}", "admin", "--yes"], "no enabled Full Administrator"),
    (["user", "disable", "{root}", "admin"], "no enabled Full Administrator"),
    (["user", "set-role", "{root}", "admin", "Viewer"], "no enabled Full Administrator"),
    (["user", "set-role", "{root}", "admin", "Emperor"], "unknown role"),
    (["user", "reset-password", "{root}", "admin"], "--password-file"),  # no terminal: never hangs on a prompt
    (["audit", "{root}", "--since", "last tuesday"], "ISO 8601"),
])
def test_careless_and_hostile_commands_are_refused_clearly(root, args, message):
    r = quanta(*[a.format(root=root) for a in args], check=False)
    assert r.returncode == 2, r
    assert message in r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert users(root)["admin"]["disabled"] is False


def test_a_password_is_never_taken_from_the_command_line(root):
    r = quanta("user", "add", str(root), "--username", "eve", "--role", "Viewer", "--password", PW, check=False)
    assert r.returncode != 0 and "eve" not in users(root)
    r = quanta("user", "reset-password", str(root), "admin", "--password", PW, check=False)
    assert r.returncode != 0


def test_short_password_file_is_refused(root, tmp_path):
    f = tmp_path / "short"
    f.write_text("short\n")
    r = quanta("user", "add", str(root), "--username", "eve", "--role", "Viewer", "--password-file", str(f), check=False)
    assert r.returncode == 2 and "at least 12" in r.stderr and "eve" not in users(root)


def test_reset_password_lock_and_unlock(root, pw, tmp_path):
    from quanta.accounts import Accounts, BadCredentials, Locked
    from quanta.db import make_engine
    from quanta.settings import DataDir, load_settings

    quanta("user", "add", str(root), "--username", "carol", "--role", "Viewer", "--password-file", str(pw))
    accounts = Accounts(make_engine(DataDir(root).master_url(load_settings(root))))
    session = accounts.login("carol", PW, "192.0.2.1")
    for _ in range(4):
        with pytest.raises(BadCredentials):
            accounts.login("carol", "wrong password!!", "192.0.2.1")
    with pytest.raises(Locked):
        accounts.login("carol", "wrong password!!", "192.0.2.1")
    locks = json.loads(quanta("user", "locks", str(root), "--json").stdout)
    assert [(lk["kind"], lk["subject"]) for lk in locks] == [("user", "carol")]
    assert users(root)["carol"]["locked_until"] > time.time()
    assert "unlocked carol" in quanta("user", "unlock", str(root), "carol").stdout
    assert json.loads(quanta("user", "locks", str(root), "--json").stdout) == []
    new = tmp_path / "new"
    new.write_text("a different long password")
    r = quanta("user", "reset-password", str(root), "carol", "--password-file", str(new))
    assert "1 session(s) ended" in r.stdout
    assert accounts.authenticate(session.token) is None
    assert accounts.login("carol", "a different long password", "192.0.2.1")
    r = quanta("user", "reset-password", str(root), "carol", "--generate")
    assert "; password: " in r.stdout
    page = json.loads(quanta("audit", str(root), "--json", "--since", "1h", "--object", "carol").stdout)
    acts = [e["action"] for e in page["items"]]
    assert {"login", "login_failed", "password_reset"} <= set(acts)
    assert page["total"] == len(page["items"])
    assert "a different long password" not in json.dumps(page)
    fails = json.loads(quanta("audit", str(root), "--json", "--action", "login_failed", "--actor", "carol").stdout)
    assert fails["total"] == 5 and {e["source"] for e in fails["items"]} == {"192.0.2.1"}
    assert "lockout" in quanta("audit", str(root), "--action", "lockout").stdout
