"""The Consumer API (``/Consumer/...``) on the web tier's HTTPS port.

Authentication comes first on every route: a bearer token from
``POST /Consumer/Authentication/Token``. Bodies are pydantic models with ``extra="forbid"``,
so a wrong type or an unknown field is a 422 naming the field before anything else happens.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import httpx
import sqlalchemy as sa
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, model_validator

from quanta import protocol as p
from quanta.background import MAX_CONTENT_BYTES, ContentError, ContentStore
from quanta import instructions as ins
from quanta import rbac
from quanta.db import held as held_store
from quanta.internal import bearer, http_client
from quanta.db import store
from quanta.definitions import DefinitionError, bind_parameters, load_definition
from quanta.definitions import packs
from quanta.definitions.packs import MAX_PACK_BYTES
from quanta.db.tables import api_tokens, definitions, users
from quanta.consumer_api.feed import Snapshot, StatusFeed
from quanta.pki import Signer
from quanta.settings import poke_port

log = logging.getLogger("quanta.consumer_api")
WAIT_MAX = 60.0  # longest long poll (GET .../Wait) a client may ask for
CORE_WAIT = 25.0  # longest single Wait asked of the Core (its own limit is 30 s)

TOKEN_TTL = 8 * 3600
ADMIN_ROLE = "Full Administrator"
_hasher = PasswordHasher()


# ------------------------------------------------------------------ models
class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TokenRequest(Strict):
    username: str = Field(min_length=1, max_length=128)
    password: str = Field(min_length=1, max_length=1024)


class TokenResponse(BaseModel):
    token: str
    expires_at: float
    username: str
    role: str


ParamValue = str | int | float | bool


class IssueRequest(Strict):
    payload: str | None = Field(default=None, min_length=1, max_length=64 * 1024,
                                description="raw SCALE text (Full Administrators only)")
    definition: str | None = Field(default=None, min_length=1, max_length=255,
                                   description="name of an imported instruction definition")
    name: str = Field(default="adhoc", min_length=1, max_length=255)
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    devices: list[str] | None = Field(default=None, description="device names; null for every device")
    instruction_ttl: int | None = Field(default=None, ge=1, le=7 * 86400, description="gather window, seconds")
    response_ttl: int | None = Field(default=None, ge=60, le=365 * 86400, description="seconds responses are kept")
    scheduled_at: float | None = Field(default=None, description="unix time to issue it; default now")

    @model_validator(mode="after")
    def _one_source(self) -> IssueRequest:
        if (self.payload is None) == (self.definition is None):
            raise ValueError("give exactly one of payload (raw SCALE) or definition")
        return self


@dataclass
class Plan:
    """An issue request resolved against its definition, the user's rights and groups."""

    name: str
    kind: str
    payload: str
    parameters: dict[str, Any]
    devices: list[str] | None
    instruction_ttl: int
    response_ttl: int
    instruction_set: str | None
    scheduled_at: float | None


class DecisionRequest(Strict):
    code: str | None = Field(default=None, max_length=16, description="one-time code, when required")
    reason: str | None = Field(default=None, max_length=2000)


class InstructionStatus(BaseModel):
    id: int
    name: str
    kind: str
    status: str
    targeted: int
    states: dict[str, int]
    created_by: str
    issued_at: float | None
    expires_at: float | None
    scheduled_at: float | None = None
    decided_by: str | None = None
    decision_reason: str | None = None
    payload: str | None = Field(default=None, description="the SCALE payload (the definition's, for a definition)")
    parameters: dict[str, Any] = Field(default_factory=dict, description="typed parameter values it was issued with")
    instruction_set: str | None = Field(default=None, description="the definition's instruction set; null: raw SCALE")
    devices: list[str] | None = Field(default=None, description="requested device names; null: every device")


# fields of InstructionStatus the progress stream leaves out (they do not change; the payload may be large)
STATIC_STATUS_FIELDS = {"payload", "parameters", "instruction_set", "devices"}


class DeviceResult(BaseModel):
    device: str
    status: str
    columns: list[str] | None
    rows: list[list[Any]] | None
    error: str | None


class ResultsPage(BaseModel):
    instruction_id: int
    offset: int
    limit: int
    items: list[DeviceResult]
    # Answers kept but not counted, by kind (late: after the instruction ended; refused: see
    # /Held). Their rows are at /Consumer/Instructions/{id}/Held.
    held: dict[str, int] = {}


class HeldAnswer(BaseModel):
    id: int
    kind: str
    device: str
    switch: str
    status: str
    reason: str
    received_at: float
    columns: list[str] = []
    rows: list[list[Any]] = []
    error: str | None = None


class HeldPage(BaseModel):
    instruction_id: int
    items: list[HeldAnswer]


class Device(BaseModel):
    device_id: str
    fqdn: str
    os: str
    agent_version: str
    tags: dict[str, str]
    switch: str | None
    online: bool
    revoked: bool
    last_seen: float | None
    source: str | None = Field(default=None, description="Integrate connector that imported it; null: agent only")


class InstructionSummary(BaseModel):
    id: int
    name: str
    kind: str
    status: str
    payload: str
    parameters: dict[str, Any]
    devices: list[str] | None
    targeted: int
    states: dict[str, int]
    created_by: str
    created_at: float
    issued_at: float | None
    expires_at: float | None
    scheduled_at: float | None = None
    approval_expires_at: float | None = None
    decided_by: str | None = None
    decision_reason: str | None = None


class InstructionPage(BaseModel):
    offset: int
    limit: int
    total: int
    items: list[InstructionSummary]


class SwitchInfo(BaseModel):
    name: str
    host: str
    port: int
    poke_port: int
    enabled: bool
    online_devices: int
    devices: int


# ------------------------------------------------------------------ helpers
def hash_password(password: str) -> str:
    return _hasher.hash(password)


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class User(BaseModel):
    id: int
    username: str
    role: str


class ConsumerApi:
    def __init__(self, master: sa.Engine, responses: sa.Engine, signer: Signer, core_url: str,
                 core_token: str, ca_file: str | None = None, content: ContentStore | None = None,
                 coordinator_url: str | None = None, approval_ttl: float = 24 * 3600,
                 replicate_to: list[str] | None = None, catalog: Any = None,
                 coordinator_token: str | None = None, replication_token: str | None = None) -> None:
        self.coordinator_token = coordinator_token or core_token  # per-hop credentials (quanta.internal)
        self.replication_token = replication_token or core_token
        self.catalog = catalog  # () -> CatalogClient, for normalising software inventory
        self.content = content
        self.replicate_to = list(replicate_to or [])
        self.coordinator_url = coordinator_url
        self.approval_ttl = approval_ttl
        self.master = master
        self.responses = responses
        self.signer = signer
        self.core_url = core_url.rstrip("/")
        self.core_token = core_token
        self.ca_file = ca_file

    async def db(self, fn: Any, *args: Any, **kw: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kw)

    # ------------------------------------------------------------- auth
    def login(self, username: str, password: str) -> TokenResponse | None:
        with self.master.connect() as c:
            row = c.execute(sa.select(users).where(users.c.username == username)).first()
        ok = False
        if row is not None and not row.disabled:
            try:
                ok = _hasher.verify(row.password_hash, password)
            except (VerificationError, InvalidHashError):
                ok = False
        else:
            _hasher.hash(password)  # same cost whether or not the user exists
        store.audit(self.master, username, "login" if ok else "login_failed")
        if not ok or row is None:
            return None
        token = secrets.token_urlsafe(32)
        expires = time.time() + TOKEN_TTL
        with self.master.begin() as c:
            c.execute(api_tokens.delete().where(api_tokens.c.expires_at < time.time()))
            c.execute(api_tokens.insert().values(token_hash=_token_hash(token), user_id=row.id, expires_at=expires))
        return TokenResponse(token=token, expires_at=expires, username=row.username, role=row.role)

    def user_for(self, token: str) -> User | None:
        with self.master.connect() as c:
            row = c.execute(sa.select(users.c.id, users.c.username, users.c.role)
                            .join(api_tokens, api_tokens.c.user_id == users.c.id)
                            .where(api_tokens.c.token_hash == _token_hash(token),
                                   api_tokens.c.expires_at > time.time(), users.c.disabled == sa.false())).first()
        return User(id=row.id, username=row.username, role=row.role) if row else None

    # ------------------------------------------------------------- instructions
    def plan(self, user: User, req: IssueRequest) -> Plan:
        """Everything checked before anything is stored: rights, definition checksum, typed
        parameters, TTL bounds, management-group scope, and a compile of the final payload."""
        from quanta.scale import ScaleError, compile_scale

        if req.payload is not None:
            if user.role != ADMIN_ROLE:
                raise HTTPException(403, "raw SCALE is allowed for Full Administrators only; "
                                         "ask with an instruction definition")
            payload, params, iset, name = req.payload, dict(req.parameters), None, req.name
            ittl, rttl = req.instruction_ttl or 60, req.response_ttl or 7 * 86400
        else:
            try:
                d = load_definition(self.master, req.definition or "")
                params = bind_parameters(d, dict(req.parameters))
            except DefinitionError as e:
                raise HTTPException(404 if "no instruction definition" in str(e) else 422, str(e)) from None
            if not rbac.allowed(self.master, user.username, "act" if d.type == "action" else "ask",
                                d.instruction_set):
                raise HTTPException(403, f"{user.username} may not issue {d.type}s of instruction set "
                                         f"{d.instruction_set!r}")
            ittl = req.instruction_ttl or d.ttl.instruction_default
            rttl = req.response_ttl or d.ttl.response_default
            if not d.ttl.instruction_min <= ittl <= d.ttl.instruction_max:
                raise HTTPException(422, f"instruction_ttl must be within {d.ttl.instruction_min}-"
                                         f"{d.ttl.instruction_max} s for {d.name}")
            if not d.ttl.response_min <= rttl <= d.ttl.response_max:
                raise HTTPException(422, f"response_ttl must be within {d.ttl.response_min}-{d.ttl.response_max} s "
                                         f"for {d.name}")
            payload, iset, name = d.payload, d.instruction_set, d.name
        try:
            program = compile_scale(payload, params)
        except ScaleError as e:
            raise HTTPException(422, {"message": e.message, "line": e.line, "column": e.column,
                                      "error": str(e)}) from None
        kind = "action" if program.is_action else "question"
        if req.definition is not None and kind == "action" and not rbac.allowed(
                self.master, user.username, "act", iset or "*"):
            raise HTTPException(403, f"{user.username} may not issue actions")
        devices = rbac.scope_for(self.master, user.username, req.devices)
        if devices is not None and not devices:
            raise HTTPException(422, "none of the requested devices is in your management groups")
        return Plan(name, kind, payload, params, devices, ittl, rttl, iset, req.scheduled_at)

    def create_instruction(self, user: User, plan: Plan) -> tuple[int, str]:
        now = time.time()
        if plan.kind == "action":
            status = ins.PENDING_APPROVAL
        elif plan.scheduled_at and plan.scheduled_at > now:
            status = ins.SCHEDULED
        else:
            status = ins.NEW
        iid = ins.create(self.master, created_by=user.username, name=plan.name, kind=plan.kind, payload=plan.payload,
                         parameters=plan.parameters, devices=plan.devices, instruction_ttl=plan.instruction_ttl,
                         response_ttl=plan.response_ttl, status=status, scheduled_at=plan.scheduled_at,
                         approval_expires_at=now + self.approval_ttl if plan.kind == "action" else None,
                         instruction_set=plan.instruction_set)
        if status == ins.NEW:
            ins.sign(self.master, self.signer, iid, expect=(ins.NEW,))
            status = ins.READY
        store.audit(self.master, user.username, "issue", f"instruction:{iid}", name=plan.name, kind=plan.kind,
                    devices=plan.devices, status=status, instruction_set=plan.instruction_set)
        return iid, status

    async def call_core(self, iid: int, verb: str, **kw: Any) -> dict[str, Any]:
        """``POST /Core/Instructions/{iid}/{verb}`` at this stack's Core (see ins.call_core)."""
        return await ins.call_core(self.core_url, self.core_token, iid, verb, verify=self.ca_file, **kw)

    async def core_issue(self, iid: int) -> dict[str, Any]:
        try:
            return await self.call_core(iid, "Issue")
        except ins.CoreError as e:
            raise HTTPException(502, str(e)) from None

    async def replicate(self, digest: str, data: bytes) -> list[str]:
        """Copy content to every DMZ Background Channel (Master -> DMZ web tier, 443)."""
        done = []
        client = http_client(self.ca_file)
        for base in self.replicate_to:
            try:
                r = await client.put(f"{base.rstrip('/')}/Background/{digest}", content=data, timeout=60,
                                     headers=bearer(self.replication_token))
                r.raise_for_status()
                done.append(base)
            except httpx.HTTPError as e:
                log.error("replicating %s to %s failed: %s", digest, base, e)
        return done

    async def coordinator(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        if self.coordinator_url is None:
            raise HTTPException(503, "no Coordinator is configured on this server")
        try:
            r = await http_client(self.ca_file).post(f"{self.coordinator_url}{path}", json=body or {}, timeout=30,
                                                     headers=bearer(self.coordinator_token))
        except httpx.HTTPError as e:
            raise HTTPException(503, f"the Coordinator is unreachable: {e}") from None
        if r.status_code >= 400:
            detail = r.json().get("detail", r.text) if r.headers.get("content-type", "").startswith("application/json") else r.text
            raise HTTPException(r.status_code, detail)
        return r.json()

    def status(self, iid: int) -> InstructionStatus | None:
        row = store.get_instruction(self.master, iid)
        if row is None:
            return None
        return InstructionStatus(id=iid, name=row["name"], kind=row["kind"], status=row["status"],
                                 targeted=row["targeted"], states=store.state_counts(self.responses, iid),
                                 created_by=row["created_by"], issued_at=row["issued_at"],
                                 expires_at=row["expires_at"], scheduled_at=row["scheduled_at"],
                                 decided_by=row["decided_by"], decision_reason=row["decision_reason"],
                                 payload=row["payload"], parameters=row["parameters"] or {},
                                 instruction_set=row["instruction_set"], devices=row["scope"])


_bearer = HTTPBearer(auto_error=False)


async def current_user(request: Request,
                       cred: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> User:
    """Authentication runs before the body or any parameter is looked at."""
    api: ConsumerApi = request.app.state.api
    if cred is None or cred.scheme.lower() != "bearer":
        raise HTTPException(401, "authentication required: POST /Consumer/Authentication/Token",
                            headers={"WWW-Authenticate": "Bearer"})
    user = await api.db(api.user_for, cred.credentials)
    if user is None:
        raise HTTPException(401, "invalid or expired token", headers={"WWW-Authenticate": "Bearer"})
    return user


CurrentUser = Annotated[User, Depends(current_user)]


def create_app(api: ConsumerApi) -> FastAPI:
    app = FastAPI(title="Quanta Consumer API", version="1", openapi_url="/Consumer/openapi.json",
                  docs_url="/Consumer/docs", redoc_url=None)
    app.state.api = api

    @app.exception_handler(sa.exc.OperationalError)
    @app.exception_handler(sa.exc.InterfaceError)
    async def database_unavailable(request: Request, exc: Exception) -> JSONResponse:
        log.error("database unavailable for %s %s: %s", request.method, request.url.path,
                  str(getattr(exc, "orig", exc)).strip()[:200])
        return JSONResponse({"detail": "database unavailable; nothing was changed, retry later"}, status_code=503)

    @app.get("/Consumer/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/Consumer/Authentication/Token", response_model=TokenResponse)
    async def token(req: TokenRequest) -> TokenResponse:
        t = await api.db(api.login, req.username, req.password)
        if t is None:
            raise HTTPException(401, "wrong username or password")
        return t

    @app.post("/Consumer/Instructions", status_code=201)
    async def issue(req: IssueRequest, user: CurrentUser) -> dict[str, Any]:
        plan = await api.db(api.plan, user, req)
        iid, status = await api.db(api.create_instruction, user, plan)
        if status == ins.PENDING_APPROVAL:
            try:
                await api.coordinator(f"/Coordinator/Instructions/{iid}/Submitted")
            except HTTPException as e:  # stored and pending either way; approvers can still find it
                log.warning("could not notify the Coordinator about instruction %d: %s", iid, e.detail)
            return {"id": iid, "status": status, "targeted": 0,
                    "message": "actions need a second person's approval before they run"}
        if status == ins.SCHEDULED:
            return {"id": iid, "status": status, "targeted": 0}
        issued = await api.core_issue(iid)
        return {"id": iid, "status": issued["status"], "targeted": issued["targeted"]}

    @app.post("/Consumer/Instructions/{instruction_id}/Cancel")
    async def cancel(instruction_id: int, user: CurrentUser) -> dict[str, Any]:
        """Stop an instruction: before it runs (pending approval, scheduled) or while it gathers."""
        row = await api.db(store.get_instruction, api.master, instruction_id)
        if row is None:
            raise HTTPException(404, f"instruction {instruction_id} not found")
        if user.role != ADMIN_ROLE and user.username != row["created_by"]:
            raise HTTPException(403, "only the requester or a Full Administrator may cancel an instruction")
        if row["status"] in (ins.PENDING_APPROVAL, ins.SCHEDULED):
            if not await api.db(ins.decide, api.master, instruction_id, status="cancelled", by=user.username,
                                reason="cancelled before it ran", expect=row["status"]):
                raise HTTPException(409, f"instruction {instruction_id} changed meanwhile; look again")
        elif row["status"] == "active":
            try:
                await api.call_core(instruction_id, "Cancel")
            except ins.CoreRefused:
                raise HTTPException(409, f"instruction {instruction_id} is no longer active") from None
            except ins.CoreError as e:
                raise HTTPException(502, str(e)) from None
        else:
            raise HTTPException(409, f"instruction {instruction_id} is {row['status']}: nothing to cancel")
        await api.db(store.audit, api.master, user.username, "cancel", f"instruction:{instruction_id}",
                     was=row["status"])
        return {"id": instruction_id, "status": "cancelled"}

    @app.post("/Consumer/Instructions/{instruction_id}/ApprovalCode")
    async def approval_code(instruction_id: int, user: CurrentUser) -> dict[str, Any]:
        """Email the caller a one-time code to approve this instruction with."""
        return await api.coordinator(f"/Coordinator/Instructions/{instruction_id}/Code",
                                     {"username": user.username, "role": user.role})

    @app.post("/Consumer/Instructions/{instruction_id}/Approve")
    async def approve(instruction_id: int, d: DecisionRequest, user: CurrentUser) -> dict[str, Any]:
        return await api.coordinator(f"/Coordinator/Instructions/{instruction_id}/Approve",
                                     {"username": user.username, "role": user.role, "code": d.code,
                                      "reason": d.reason})

    @app.post("/Consumer/Instructions/{instruction_id}/Reject")
    async def reject(instruction_id: int, d: DecisionRequest, user: CurrentUser) -> dict[str, Any]:
        return await api.coordinator(f"/Coordinator/Instructions/{instruction_id}/Reject",
                                     {"username": user.username, "role": user.role, "reason": d.reason})

    @app.get("/Consumer/Instructions/{instruction_id}", response_model=InstructionStatus)
    async def status(instruction_id: int, user: CurrentUser) -> InstructionStatus:
        s = await api.db(api.status, instruction_id)
        if s is None:
            raise HTTPException(404, f"instruction {instruction_id} not found")
        return s

    @app.get("/Consumer/Instructions/{instruction_id}/Wait", response_model=InstructionStatus)
    async def wait(instruction_id: int, user: CurrentUser,
                   timeout: Annotated[float, Query(ge=0, le=WAIT_MAX)] = 25.0) -> InstructionStatus:
        """The instruction's status once it is done (finished, cancelled, rejected, approval
        expired) or after ``timeout`` seconds, whichever comes first: a long poll. While it is
        active the Core tells the moment it ends; before it runs (approval, schedule) the status
        is looked at twice a second."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        core_ended = False
        while True:
            s = await api.db(api.status, instruction_id)
            if s is None:
                raise HTTPException(404, f"instruction {instruction_id} not found")
            left = deadline - loop.time()
            if s.status in ins.DONE_STATES or left <= 0:
                return s
            if s.status == "active" and not core_ended:
                try:
                    r = await api.call_core(instruction_id, "Wait", params={"timeout": round(min(left, CORE_WAIT), 3)},
                                            timeout=CORE_WAIT + 10)
                    # Ended there: the status says so now, unless this Core does not hold it (a
                    # Core restarting, another Response Stack's): then look at the status below.
                    core_ended = bool(r.get("ended"))
                    continue
                except ins.CoreError as e:  # Core away or restarting: fall back to looking
                    log.debug("Wait on instruction %d at the Core failed: %s", instruction_id, e)
            await asyncio.sleep(min(left, 0.5 if s.status != "active" else 0.2))

    @app.get("/Consumer/Instructions/{instruction_id}/Aggregate")
    async def aggregate(instruction_id: int, user: CurrentUser,
                        by: Annotated[list[str] | None, Query(max_length=8)] = None,
                        limit: Annotated[int, Query(ge=1, le=10_000)] = 1000) -> dict[str, Any]:
        """Rows of every successful answer grouped by columns (default: the definition's aggregation)."""
        row = await api.db(store.get_instruction, api.master, instruction_id)
        if row is None:
            raise HTTPException(404, f"instruction {instruction_id} not found")
        if not by:
            try:
                d = await api.db(load_definition, api.master, row["name"]) if row["instruction_set"] else None
            except DefinitionError:
                d = None
            if d is None or d.aggregation is None:
                raise HTTPException(422, "give by=COLUMN (this instruction's definition declares no aggregation)")
            by = list(d.aggregation.group_by)
        return await api.db(store.aggregate, api.responses, instruction_id, by, limit)

    @app.get("/Consumer/Instructions/{instruction_id}/Software")
    async def software(instruction_id: int, user: CurrentUser,
                       limit: Annotated[int, Query(ge=1, le=100_000)] = 10_000) -> dict[str, Any]:
        """Software inventory normalised by the Catalog: the answers' (Publisher, Product, Version)
        rows (e.g. from Software.GetInstallations) mapped to vendor/product/version/category,
        counting installations (a device with two packages of one product counts twice)."""
        if api.catalog is None:
            raise HTTPException(503, "no Catalog is configured for this server")
        agg = await api.db(store.aggregate, api.responses, instruction_id, ["Publisher", "Product", "Version"], limit)
        if agg["devices"] and agg["missing"] == agg["devices"]:
            raise HTTPException(422, "the answers have no Publisher, Product and Version columns")
        entries = [{"publisher": g["values"][0] or "", "title": g["values"][1] or "", "version": g["values"][2] or ""}
                   for g in agg["groups"]]

        def normalise() -> list[dict[str, Any]]:
            with api.catalog() as catalog:
                out: list[dict[str, Any]] = []
                for i in range(0, len(entries), 1000):
                    out += catalog.normalize(entries[i:i + 1000])
                return out

        try:
            normalised = await api.db(normalise) if entries else []
        except Exception as e:  # CatalogError: unreachable Catalog, missing key
            raise HTTPException(503, f"Catalog: {e}") from None
        merged: dict[tuple[Any, ...], dict[str, Any]] = {}
        unmatched = 0
        for g, n in zip(agg["groups"], normalised):
            if not n["matched"]:
                unmatched += g["devices"]
                continue
            key = (n["vendor"], n["product"], n["version"], n["category"])
            m = merged.setdefault(key, {"vendor": key[0], "product": key[1], "version": key[2], "category": key[3],
                                        "installations": 0})
            m["installations"] += g["devices"]
        items = sorted(merged.values(), key=lambda m: (-m["installations"], str(m["product"])))
        return {"instruction_id": instruction_id, "devices": agg["devices"], "normalised": items,
                "unmatched_installations": unmatched, "raw_entries": len(entries), "truncated": agg["truncated"]}

    @app.get("/Consumer/Instructions/{instruction_id}/Responses", response_model=ResultsPage)
    async def responses(instruction_id: int, user: CurrentUser, offset: Annotated[int, Query(ge=0)] = 0,
                        limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
                        state: str | None = None) -> ResultsPage:
        if state is not None and state not in p.ALL_STATES:
            raise HTTPException(422, f"unknown state {state!r}; known: {', '.join(p.ALL_STATES)}")
        rows = await api.db(store.page_results, api.responses, instruction_id, offset, limit, state)
        held = await api.db(held_store.held_counts, api.responses, instruction_id)
        return ResultsPage(instruction_id=instruction_id, offset=offset, limit=limit, held=held,
                           items=[DeviceResult(device=r["device_id"], status=r["state"], columns=r["columns"],
                                               rows=r["rows"], error=r["error"]) for r in rows])

    @app.get("/Consumer/Instructions/{instruction_id}/Held", response_model=HeldPage)
    async def held(instruction_id: int, user: CurrentUser,
                   kind: Annotated[Literal["late", "refused"], Query()] = "late",
                   offset: Annotated[int, Query(ge=0, le=2**31)] = 0,
                   limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> HeldPage:
        """Answers the Core kept without counting them: late ones (after the instruction ended), or,
        for Full Administrators, refused ones (not storable, from the wrong Switch, or for an unknown
        instruction; their content came from a device and may be hostile)."""
        if kind == "refused" and user.role != ADMIN_ROLE:
            raise HTTPException(403, "refused answers are for Full Administrators")
        rows = await api.db(held_store.list_held, api.responses, instruction_id=instruction_id, kind=kind,
                            offset=offset, limit=limit)
        return HeldPage(instruction_id=instruction_id, items=[
            HeldAnswer(id=r["id"], kind=r["kind"], device=r["device_id"], switch=r["switch"], status=r["state"],
                       reason=r["reason"], received_at=r["received_at"], columns=r["response"].get("columns", []),
                       rows=r["response"].get("rows", []), error=r["response"].get("error")) for r in rows])

    async def progress(instruction_id: int) -> Snapshot:
        s = await api.db(api.status, instruction_id)
        return None if s is None else (s.model_dump_json(exclude=STATIC_STATUS_FIELDS), s.status in ins.DONE_STATES)

    feed = app.state.feed = StatusFeed(progress)

    @app.get("/Consumer/Instructions/{instruction_id}/Stream")
    async def stream(instruction_id: int, user: CurrentUser, request: Request) -> StreamingResponse:
        """Server-sent events: one ``status`` event whenever the counts change, until it finishes.
        Every viewer of one instruction shares one poller (see :mod:`quanta.consumer_api.feed`)."""
        if await api.db(api.status, instruction_id) is None:
            raise HTTPException(404, f"instruction {instruction_id} not found")

        async def connected() -> bool:
            return not await request.is_disconnected()

        async def events() -> AsyncIterator[bytes]:
            async for data in feed.subscribe(instruction_id, connected):
                yield f"event: status\ndata: {data}\n\n".encode()

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/Consumer/Content", status_code=201)
    async def upload_content(request: Request, user: CurrentUser) -> dict[str, Any]:
        """Store a resource (script, file) in the Background Channel; returns its SHA-256."""
        if user.role != ADMIN_ROLE:
            raise HTTPException(403, "uploading content is for Full Administrators")
        if api.content is None:
            raise HTTPException(503, "no Background Channel on this server")
        declared = int(request.headers.get("content-length") or 0)
        if declared > MAX_CONTENT_BYTES:
            raise HTTPException(413, f"content exceeds {MAX_CONTENT_BYTES} bytes")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_CONTENT_BYTES:
                raise HTTPException(413, f"content exceeds {MAX_CONTENT_BYTES} bytes")
        if not data:
            raise HTTPException(422, "empty content")
        try:
            digest = await api.db(api.content.put, bytes(data))
        except ContentError as e:
            raise HTTPException(422, str(e)) from None
        await api.db(store.audit, api.master, user.username, "content_upload", digest, size=len(data))
        replicated = await api.replicate(digest, bytes(data))
        return {"sha256": digest, "size": len(data), "url": f"/Background/{digest}", "replicated_to": replicated}

    @app.get("/Consumer/Content")
    async def list_content(user: CurrentUser) -> list[dict[str, Any]]:
        return api.content.list() if api.content is not None else []

    @app.get("/Consumer/InstructionDefinitions")
    async def list_definitions(user: CurrentUser, instruction_set: str | None = None) -> list[dict[str, Any]]:
        """Definitions the caller may issue (or see), with their typed parameters."""
        def visible() -> list[dict[str, Any]]:
            with api.master.connect() as c:
                q = sa.select(definitions)
                if instruction_set:
                    q = q.where(definitions.c.instruction_set == instruction_set)
                rows = [dict(r._mapping) for r in c.execute(q.order_by(definitions.c.name))]
            may = rbac.rights(api.master, user.username)  # read once, not per row
            return [{"name": r["name"], "type": r["kind"], "instruction_set": r["instruction_set"],
                     "description": r["spec"]["description"], "parameters": r["spec"]["parameters"],
                     "schema": r["spec"]["schema"], "aggregation": r["spec"]["aggregation"], "ttl": r["spec"]["ttl"],
                     "pack": r["pack"], "publisher": r["publisher"]}
                    for r in rows if may("view", r["instruction_set"])]

        return await api.db(visible)

    @app.post("/Consumer/Packs", status_code=201)
    async def import_pack(request: Request, user: CurrentUser) -> dict[str, Any]:
        """Import a signed product pack (zip body). Only packs from trusted publishers are accepted."""
        if user.role != ADMIN_ROLE:
            raise HTTPException(403, "importing packs is for Full Administrators")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_PACK_BYTES:
                raise HTTPException(413, f"pack exceeds {MAX_PACK_BYTES} bytes")
        try:
            pack = await api.db(packs.import_pack, api.master, bytes(data), api.content)
        except packs.PackError as e:
            await api.db(store.audit, api.master, user.username, "pack_refused", "", reason=str(e))
            raise HTTPException(422, f"pack refused: {e}") from None
        await api.db(store.audit, api.master, user.username, "pack_import", pack.info.name,
                     version=pack.info.version, publisher=pack.info.publisher,
                     definitions=[d.name for d in pack.definitions])
        return {"pack": pack.info.name, "version": pack.info.version, "publisher": pack.info.publisher,
                "definitions": [d.name for d in pack.definitions], "resources": len(pack.resources)}

    @app.get("/Consumer/Devices", response_model=list[Device])
    async def devices(user: CurrentUser) -> list[Device]:
        rows = await api.db(store.list_devices, api.master)
        reach = await api.db(rbac.reachable_devices, api.master, user.username)  # management groups
        return [Device(**{k: r[k] for k in Device.model_fields}) for r in rows if reach is None or r["device_id"] in reach]

    @app.get("/Consumer/Instructions", response_model=InstructionPage)
    async def list_instructions(user: CurrentUser, offset: Annotated[int, Query(ge=0)] = 0,
                                limit: Annotated[int, Query(ge=1, le=500)] = 50,
                                status: Annotated[str | None, Query(description="comma-separated statuses")] = None
                                ) -> InstructionPage:
        """Recent instructions, newest first, with their counts per state (read-only; for the portal)."""
        statuses = [x.strip() for x in status.split(",") if x.strip()] if status else None

        def load() -> InstructionPage:
            total, rows = store.list_instructions(api.master, offset, limit, statuses)
            counts = store.state_counts_many(api.responses, [r["id"] for r in rows])
            return InstructionPage(offset=offset, limit=limit, total=total, items=[InstructionSummary(
                id=r["id"], name=r["name"], kind=r["kind"], status=r["status"], payload=r["payload"],
                parameters=r["parameters"] or {}, devices=r["scope"], targeted=r["targeted"],
                states=counts.get(r["id"], {}), created_by=r["created_by"], created_at=r["created_at"],
                issued_at=r["issued_at"], expires_at=r["expires_at"], scheduled_at=r["scheduled_at"],
                approval_expires_at=r["approval_expires_at"], decided_by=r["decided_by"],
                decision_reason=r["decision_reason"]) for r in rows])

        return await api.db(load)

    @app.get("/Consumer/Switches", response_model=list[SwitchInfo])
    async def switches(user: CurrentUser) -> list[SwitchInfo]:
        """The SwitchConfiguration rows, with the devices last seen on each and how many are online."""
        def load() -> list[SwitchInfo]:
            counts = store.switch_device_counts(api.master)
            return [SwitchInfo(name=r["Name"], host=r["Host"], port=r["Port"], poke_port=poke_port(r["Port"]),
                               enabled=bool(r["Enabled"]), online_devices=counts.get(r["Name"], {}).get("online", 0),
                               devices=counts.get(r["Name"], {}).get("devices", 0))
                    for r in store.switch_rows(api.master)]

        return await api.db(load)

    return app
