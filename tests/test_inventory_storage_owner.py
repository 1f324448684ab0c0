"""Storage.* ownership cannot be spoofed: the owner is the identity the server verified when the
pack was imported (pack name and publisher key), signed into the instruction's body, never a name a
pack chooses. Real parts: packs built and signed with their publishers' keys, imported into a
master database, instructions created and signed as the Consumer API does, bodies verified with
the agent's Verifier and run by the agent's run_instruction against one storage.db."""

from __future__ import annotations

from pathlib import Path

import pytest

from quanta import instructions as ins
from quanta.agent.config import AgentConfig, SwitchAddress
from quanta.agent.runtime import run_instruction
from quanta.db import make_engine, migrate
from quanta.definitions import build, import_pack, keygen, load_definition, trust
from quanta.protocol import messages as p
from quanta.signing import Signer, Verifier, fingerprint

DEFINITION = """name = "{name}"
type = "{kind}"
instruction_set = "Tools"
description = "{name}"
payload = \"\"\"
{payload}
\"\"\"

[[schema]]
name = "{column}"
type = "string"
"""


def make_pack(root: Path, name: str, publisher: str, defs: dict[str, tuple[str, str, str]]) -> Path:
    src = root / f"{publisher}-{name}-src"
    (src / "definitions").mkdir(parents=True)
    (src / "pack.toml").write_text(f'name = "{name}"\nversion = "1.0.0"\npublisher = "{publisher}"\n'
                                   f'description = "{name} by {publisher}"\n')
    for i, (dname, (kind, payload, column)) in enumerate(defs.items()):
        (src / "definitions" / f"d{i}.toml").write_text(DEFINITION.format(name=dname, kind=kind, payload=payload,
                                                                          column=column))
    return src


SET = '@t = SELECT "secret" AS V; Storage.Set(Name: "Acme-Tools-Seen", Value: @t);'
GET = 'Storage.Get(Name: "Acme-Tools-Seen");'
DELETE = 'Storage.Delete(Name: "Acme-Tools-Seen");'


@pytest.fixture
def world(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'm.db'}"
    migrate(url, "master")
    engine = make_engine(url)
    server_key, server_pub = keygen(tmp_path / "keys", "server")
    packs = {}
    for publisher, name, defs in [
        ("Acme", "Acme-Tools", {"Acme-Tools-Remember": ("action", SET, "Name"),
                                "Acme-Tools-Recall": ("question", GET, "V")}),
        # another publisher: the same pack name, definitions named like Acme's, the same table name
        ("Mallory", "Acme-Tools", {"Acme-Tools-Peek": ("question", GET, "V"),
                                   "Acme-Tools-Drop": ("action", DELETE, "Name"),
                                   "Acme-Tools-Overwrite": ("action", SET, "Name")}),
    ]:
        key, pub = keygen(tmp_path / "keys", publisher)
        trust(engine, publisher, pub.read_bytes())
        z = build(make_pack(tmp_path, name, publisher, defs), key, tmp_path / f"{publisher}.zip")
        import_pack(engine, z.read_bytes())
        packs[publisher] = fingerprint(pub.read_bytes())
    root = tmp_path / "agent"
    (root / "state").mkdir(parents=True)
    cfg = AgentConfig(root=root, device_name="d1", switches=[SwitchAddress("127.0.0.1", 4000)], background_url="",
                      retry_min=1, retry_max=60, interaction_port=7766)
    signer = Signer.from_file(server_key)
    verifier = Verifier.from_file(server_pub)
    assert signer.fingerprint == fingerprint(server_pub.read_bytes())

    def issue(definition: str | None, payload: str = "", name: str = "Raw") -> p.Response:
        """Create and sign an instruction as the Consumer API does, verify it as the agent does, run it."""
        if definition is not None:
            d = load_definition(engine, definition)
            payload, name, iset, kind = d.payload, d.name, d.instruction_set, d.type
        else:
            iset, kind = None, "action" if "Storage.Set" in payload or "Storage.Delete" in payload else "question"
        iid, _ = ins.create(engine, created_by="admin", name=name, kind=kind, payload=payload, parameters={},
                         devices=None, instruction_ttl=60, response_ttl=3600, status=ins.NEW, instruction_set=iset)
        assert ins.sign(engine, signer, iid, expect=(ins.NEW,))
        with engine.connect() as c:
            row = c.execute(ins.instructions.select().where(ins.instructions.c.id == iid)).first()
        assert verifier.verify(row.body, row.signature)
        return run_instruction(p.decode_body(row.body), cfg)

    return issue, packs, signer


def test_two_packs_by_different_signers_cannot_reach_each_others_tables(world) -> None:
    issue, packs, _ = world
    r = issue("Acme-Tools-Remember")
    assert r.status == "success", r.error
    assert issue("Acme-Tools-Recall").rows == [["secret"]]  # the same pack: its instructions share tables
    # Mallory's pack has Acme's pack name and definitions named like Acme's: it reads nothing,
    # deletes nothing, and what it writes is its own table, not Acme's
    peek = issue("Acme-Tools-Peek")
    assert peek.status in ("success", "nocontent") and peek.rows == [], peek
    assert issue("Acme-Tools-Drop").rows == [["Acme-Tools-Seen", False]]
    assert issue("Acme-Tools-Overwrite").status == "success"
    assert issue("Acme-Tools-Recall").rows == [["secret"]]
    assert issue("Acme-Tools-Peek").rows == [["secret"]]  # Mallory's own copy
    assert packs["Acme"] != packs["Mallory"]


def test_raw_scale_has_one_owner_per_issuing_server_apart_from_every_pack(world) -> None:
    issue, _, _ = world
    assert issue("Acme-Tools-Remember").status == "success"
    # raw SCALE named like the pack's instructions: not the pack's owner
    assert issue(None, GET, name="Acme-Tools-Recall").rows == []
    assert issue(None, DELETE, name="Acme-Tools-Remember").rows == [["Acme-Tools-Seen", False]]
    # ad-hoc instructions share their own tables (one owner: the server's signing key)
    assert issue(None, '@t = SELECT "mine" AS V; Storage.Set(Name: "Acme-Tools-Seen", Value: @t);').status == "success"
    assert issue(None, GET, name="Another").rows == [["mine"]]
    assert issue("Acme-Tools-Recall").rows == [["secret"]]


def test_the_signed_owner_names_the_pack_and_its_publishers_key(world, tmp_path) -> None:
    _, packs, signer = world
    engine = make_engine(f"sqlite:///{tmp_path / 'm.db'}")
    with engine.connect() as c:
        for name, iset in (("Acme-Tools-Recall", "Tools"), ("Acme-Tools-Peek", "Tools"), ("Anything", None),
                           ("Deleted-Definition", "Tools")):
            row = type("Row", (), {"name": name, "instruction_set": iset})
            owner = ins.storage_owner(c, signer, row)
            expected = {"Acme-Tools-Recall": f"pack:Acme-Tools@{packs['Acme']}",
                        "Acme-Tools-Peek": f"pack:Acme-Tools@{packs['Mallory']}",
                        "Anything": f"adhoc@{signer.fingerprint}",
                        "Deleted-Definition": f"orphan@{signer.fingerprint}"}[name]
            assert owner == expected
