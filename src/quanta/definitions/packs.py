"""Product packs: definitions and resources, signed by a publisher key.

A pack is a zip holding ``pack.toml``, ``definitions/*.toml``, optional ``resources/*``, and
``MANIFEST.json`` (the SHA-256 of every other file) with ``MANIFEST.sig`` (Ed25519 over the
manifest's exact bytes, base64). The server imports a pack only if its publisher is trusted,
the signature verifies, every file matches the manifest (nothing missing, nothing extra), and
every definition validates and compiles. Import is all or nothing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import time
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from quanta.db.tables import definitions, publishers

from .model import NAME_RE, Definition, DefinitionError, check_payload, parse_definition

MANIFEST = "MANIFEST.json"
SIGNATURE = "MANIFEST.sig"
MAX_PACK_BYTES = 64 * 1024 * 1024
MAX_FILES = 2000


class PackError(ValueError):
    pass


class PackInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_RE)
    version: str = Field(min_length=1, max_length=64)
    publisher: str = Field(pattern=NAME_RE)
    description: str = ""


@dataclass
class Pack:
    info: PackInfo
    definitions: list[Definition]
    resources: dict[str, bytes]  # path -> content


# ----------------------------------------------------------------- publisher keys
def keygen(out_dir: Path, name: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    key = ed25519.Ed25519PrivateKey.generate()
    priv = out_dir / f"{name}.key"
    pub = out_dir / f"{name}.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    priv.chmod(0o600)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


def trust(engine: sa.Engine, name: str, public_key_pem: bytes) -> None:
    key = serialization.load_pem_public_key(public_key_pem)
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise PackError("a publisher key must be an Ed25519 public key (PEM)")
    with engine.begin() as c:
        c.execute(publishers.delete().where(publishers.c.name == name))
        c.execute(publishers.insert().values(name=name, public_key=public_key_pem.decode(), added_at=time.time()))


# ----------------------------------------------------------------- build and sign
def build(source: Path, key_file: Path, out: Path) -> Path:
    """Sign the pack directory ``source`` into the zip ``out``."""
    if not (source / "pack.toml").exists():
        raise PackError(f"{source}/pack.toml not found")
    key = serialization.load_pem_private_key(key_file.read_bytes(), None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise PackError("the publisher key must be an Ed25519 private key")
    files = {}
    for p in sorted(source.rglob("*")):
        rel = p.relative_to(source).as_posix()
        if p.is_file() and rel not in (MANIFEST, SIGNATURE):
            files[rel] = p.read_bytes()
    manifest = json.dumps({"files": {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}},
                          sort_keys=True, indent=1).encode()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for rel, data in files.items():
            z.writestr(rel, data)
        z.writestr(MANIFEST, manifest)
        z.writestr(SIGNATURE, base64.b64encode(key.sign(manifest)))
    return out


# ----------------------------------------------------------------- verify and read
def read_pack(data: bytes, trusted: dict[str, bytes]) -> Pack:
    """Verify and parse a pack; ``trusted`` maps publisher name -> public key PEM."""
    if len(data) > MAX_PACK_BYTES:
        raise PackError(f"pack exceeds {MAX_PACK_BYTES} bytes")
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
        names = [i.filename for i in z.infolist() if not i.is_dir()]
    except zipfile.BadZipFile:
        raise PackError("not a pack: the file is not a zip archive") from None
    if len(names) > MAX_FILES:
        raise PackError("too many files in the pack")
    if MANIFEST not in names or SIGNATURE not in names:
        raise PackError("unsigned pack: MANIFEST.json and MANIFEST.sig are required")
    if sum(i.file_size for i in z.infolist()) > MAX_PACK_BYTES:
        raise PackError("pack content too large when unpacked")
    manifest_bytes = z.read(MANIFEST)
    try:
        info = PackInfo.model_validate(tomllib.loads(z.read("pack.toml").decode()))
    except KeyError:
        raise PackError("pack.toml is missing") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, ValidationError) as e:
        raise PackError(f"pack.toml is invalid: {e}") from None
    pub_pem = trusted.get(info.publisher)
    if pub_pem is None:
        raise PackError(f"publisher {info.publisher!r} is not trusted on this server (quanta pack trust)")
    pub = serialization.load_pem_public_key(pub_pem)
    assert isinstance(pub, ed25519.Ed25519PublicKey)
    try:
        pub.verify(base64.b64decode(z.read(SIGNATURE), validate=True), manifest_bytes)
    except (InvalidSignature, binascii.Error, ValueError):
        raise PackError(f"signature does not verify with {info.publisher!r}'s key: refused") from None
    try:
        listed: dict[str, str] = json.loads(manifest_bytes)["files"]
    except (ValueError, KeyError, TypeError):
        raise PackError("MANIFEST.json is malformed") from None
    present = set(names) - {MANIFEST, SIGNATURE}
    if present != set(listed):
        extra, missing = sorted(present - set(listed)), sorted(set(listed) - present)
        raise PackError(f"pack content does not match its manifest (extra: {extra}, missing: {missing})")
    contents = {}
    for rel in sorted(present):
        body = z.read(rel)
        if hashlib.sha256(body).hexdigest() != listed[rel]:
            raise PackError(f"{rel} does not match its manifest hash: the pack was altered")
        contents[rel] = body
    defs = []
    for rel, body in contents.items():
        if rel.startswith("definitions/") and rel.endswith(".toml"):
            try:
                d = parse_definition(body.decode(), rel)
                check_payload(d)
            except (DefinitionError, UnicodeDecodeError) as e:
                raise PackError(str(e)) from None
            defs.append(d)
    if not defs:
        raise PackError("the pack holds no definitions")
    if len({d.name for d in defs}) != len(defs):
        raise PackError("two definitions in the pack share a name")
    resources = {rel: body for rel, body in contents.items() if rel.startswith("resources/")}
    return Pack(info, defs, resources)


def trusted_keys(engine: sa.Engine) -> dict[str, bytes]:
    with engine.connect() as c:
        return {r.name: r.public_key.encode() for r in c.execute(sa.select(publishers))}


def import_pack(engine: sa.Engine, data: bytes, content_store: object | None = None) -> Pack:
    """Verify, then store every definition (and resource) in one transaction."""
    pack = read_pack(data, trusted_keys(engine))
    now = time.time()
    with engine.begin() as c:
        existing = {r.name: r.publisher for r in c.execute(
            sa.select(definitions.c.name, definitions.c.publisher)
            .where(definitions.c.name.in_([d.name for d in pack.definitions])))}
        for d in pack.definitions:
            if d.name in existing and existing[d.name] != pack.info.publisher:
                raise PackError(f"definition {d.name} belongs to publisher {existing[d.name]!r}; "
                                f"{pack.info.publisher!r} may not replace it")
        c.execute(definitions.delete().where(definitions.c.name.in_([d.name for d in pack.definitions])))
        c.execute(definitions.insert(), [dict(name=d.name, instruction_set=d.instruction_set, kind=d.type,
                                              spec=d.model_dump(mode="json", by_alias=True), checksum=d.checksum(),
                                              pack=f"{pack.info.name} {pack.info.version}",
                                              publisher=pack.info.publisher, imported_at=now)
                                         for d in pack.definitions])
    if content_store is not None:
        for body in pack.resources.values():
            content_store.put(body)  # type: ignore[attr-defined]
    return pack


def load_definition(engine: sa.Engine, name: str) -> Definition:
    """Load a stored definition and re-check its checksum (tampering in the database is refused)."""
    with engine.connect() as c:
        row = c.execute(sa.select(definitions).where(definitions.c.name == name)).first()
    if row is None:
        raise DefinitionError(f"no instruction definition named {name!r}")
    try:
        d = Definition.model_validate(row.spec)
    except ValidationError:
        raise DefinitionError(f"stored definition {name} is corrupt: refused") from None
    if d.checksum() != row.checksum:
        raise DefinitionError(f"definition {name} does not match its stored checksum: it was altered after "
                              "import; refused")
    return d
