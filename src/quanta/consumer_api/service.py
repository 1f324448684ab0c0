"""The Consumer API's service: sign-in, issuing, and the reads, each computed over what the
caller may see (:class:`quanta.rbac.Access`). No FastAPI here: errors are the domain errors of
:mod:`quanta.consumer_api.errors`; the routers in :mod:`quanta.consumer_api.routers` call this.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx
import sqlalchemy as sa
from quanta import instructions as ins
from quanta import rbac
from quanta.accounts import Accounts, Policy, Session, audit
from quanta.accounts import hash_password as hash_password  # noqa: PLC0414 - importable from here, as ever
from quanta.background import ContentStore
from quanta.consumer_api.errors import BadGateway, Forbidden, Invalid, NotFound, Unavailable, Upstream
from quanta.consumer_api.models import (Device, DeviceDetail, DeviceInstruction, DeviceResult, DeviceResultsPage,
                                        HeldAnswer, HeldPage, InstructionPage,
                                        InstructionStatus, InstructionSummary, IssueRequest, ResultRow, ResultsPage,
                                        TokenResponse, User)
from quanta.consumer_api.models import ApprovalRecord
from quanta.db import store
from quanta.definitions import DefinitionError, bind_parameters, load_definition
from quanta.internal import bearer, http_client
from quanta.pki import Signer
from quanta.states import ALL_STATES

log = logging.getLogger("quanta.consumer_api")

ADMIN_ROLE = rbac.FULL_ADMIN


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


def token_response(session: Session) -> TokenResponse:
    return TokenResponse(token=session.token, expires_at=session.expires_at,
                         absolute_expires_at=session.absolute_expires_at, username=session.user.username,
                         role=session.user.role)


def _scope_meets(scope: list[str] | None, reach: frozenset[str]) -> bool:
    """Whether an instruction's requested devices (None: every device) include one of ``reach``."""
    return bool(reach) if scope is None else any(d in reach for d in scope)


class ConsumerApi:
    def __init__(self, master: sa.Engine, responses: sa.Engine, signer: Signer, core_url: str,
                 core_token: str, ca_file: str | None = None, content: ContentStore | None = None,
                 coordinator_url: str | None = None, approval_ttl: float = 24 * 3600,
                 replicate_to: list[str] | None = None, catalog: Any = None,
                 coordinator_token: str | None = None, replication_token: str | None = None,
                 policy: Policy | None = None) -> None:
        # Sessions, lockout, users and the audit log (quanta.accounts): the one token authority.
        self.accounts = Accounts(master, policy or Policy())
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
    # Tokens are sessions of quanta.accounts (hashed, short-lived, renewed while in use, revocable);
    # the old ``api_tokens`` table is gone (master_0024).
    def login(self, username: str, password: str, source: str) -> TokenResponse:
        """A new session, or the accounts error (BadCredentials 401, Locked 429 + Retry-After)."""
        return token_response(self.accounts.login(username, password, source))

    def user_for(self, token: str) -> User | None:
        """The user of a live session (renewing it), or None."""
        u = self.accounts.authenticate(token)
        return None if u is None else User(id=u.id, username=u.username, role=u.role, email=u.email,
                                           session_id=u.session_id)

    # ------------------------------------------------------------- instructions
    def plan(self, user: User, req: IssueRequest) -> Plan:
        """Everything checked before anything is stored: rights, definition checksum, typed
        parameters, TTL bounds, management-group scope, and a compile of the final payload."""
        from quanta.scale import ScaleError, compile_scale

        if req.payload is not None:
            if user.role != ADMIN_ROLE:
                raise Forbidden("raw SCALE is allowed for Full Administrators only; "
                                         "ask with an instruction definition")
            payload, params, iset, name = req.payload, dict(req.parameters), None, req.name
            ittl, rttl = req.instruction_ttl or 60, req.response_ttl or 7 * 86400
        else:
            try:
                d = load_definition(self.master, req.definition or "")
                params = bind_parameters(d, dict(req.parameters))
            except DefinitionError as e:
                raise (NotFound if "no instruction definition" in str(e) else Invalid)(str(e)) from None
            if not rbac.allowed(self.master, user.username, "act" if d.type == "action" else "ask",
                                d.instruction_set):
                raise Forbidden(f"{user.username} may not issue {d.type}s of instruction set "
                                         f"{d.instruction_set!r}")
            ittl = req.instruction_ttl or d.ttl.instruction_default
            rttl = req.response_ttl or d.ttl.response_default
            if not d.ttl.instruction_min <= ittl <= d.ttl.instruction_max:
                raise Invalid(f"instruction_ttl must be within {d.ttl.instruction_min}-"
                                         f"{d.ttl.instruction_max} s for {d.name}")
            if not d.ttl.response_min <= rttl <= d.ttl.response_max:
                raise Invalid(f"response_ttl must be within {d.ttl.response_min}-{d.ttl.response_max} s "
                                         f"for {d.name}")
            payload, iset, name = d.payload, d.instruction_set, d.name
        try:
            program = compile_scale(payload, params)
        except ScaleError as e:
            raise Invalid({"message": e.message, "line": e.line, "column": e.column,
                                      "error": str(e)}) from None
        kind = "action" if program.is_action else "question"
        if req.definition is not None and kind == "action" and not rbac.allowed(
                self.master, user.username, "act", iset or "*"):
            raise Forbidden(f"{user.username} may not issue actions")
        devices = rbac.scope_for(self.master, user.username, req.devices)
        if devices is not None and not devices:
            raise Invalid("none of the requested devices is in your management groups")
        return Plan(name, kind, payload, params, devices, ittl, rttl, iset, req.scheduled_at)

    def create_instruction(self, user: User, plan: Plan) -> tuple[int, str]:
        """Store the planned instruction, signed unless it waits (approval, schedule), with its audit
        row: one transaction."""
        now = time.time()
        if plan.kind == "action":
            status = ins.PENDING_APPROVAL
        elif plan.scheduled_at and plan.scheduled_at > now:
            status = ins.SCHEDULED
        else:
            status = ins.NEW

        def audited(c: sa.Connection, iid: int, final: str) -> None:
            audit.write(c, user.username, user.source, "issue", f"instruction:{iid}",
                        details=dict(name=plan.name, kind=plan.kind, devices=plan.devices, status=final,
                                     instruction_set=plan.instruction_set))

        return ins.create(self.master, created_by=user.username, name=plan.name, kind=plan.kind, payload=plan.payload,
                          parameters=plan.parameters, devices=plan.devices, instruction_ttl=plan.instruction_ttl,
                          response_ttl=plan.response_ttl, status=status, scheduled_at=plan.scheduled_at,
                          approval_expires_at=now + self.approval_ttl if plan.kind == "action" else None,
                          instruction_set=plan.instruction_set, signer=self.signer, then=audited)

    def plan_and_create(self, user: User, req: IssueRequest) -> tuple[int, str]:
        """:meth:`plan` then :meth:`create_instruction`, in one call (one worker-thread hop)."""
        return self.create_instruction(user, self.plan(user, req))

    async def call_core(self, iid: int, verb: str, **kw: Any) -> dict[str, Any]:
        """``POST /Core/Instructions/{iid}/{verb}`` at this stack's Core (see ins.call_core)."""
        return await ins.call_core(self.core_url, self.core_token, iid, verb, verify=self.ca_file, **kw)

    async def core_issue(self, iid: int) -> dict[str, Any]:
        try:
            return await self.call_core(iid, "Issue")
        except ins.CoreError as e:
            raise BadGateway(str(e)) from None

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
        return (await self.coordinator_reply(path, body))[1]

    async def coordinator_reply(self, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        """POST to the Coordinator: its status (200, or 202: the approval counted but the
        instruction is not running yet) and body; a refusal (>= 400) is raised as it is."""
        if self.coordinator_url is None:
            raise Unavailable("no Coordinator is configured on this server")
        try:
            r = await http_client(self.ca_file).post(f"{self.coordinator_url}{path}", json=body or {}, timeout=30,
                                                     headers=bearer(self.coordinator_token))
        except httpx.HTTPError as e:
            raise Unavailable(f"the Coordinator is unreachable: {e}") from None
        if r.status_code >= 400:
            detail = r.json().get("detail", r.text) if r.headers.get("content-type", "").startswith("application/json") else r.text
            raise Upstream(r.status_code, detail)
        return r.status_code, r.json()

    # ------------------------------------------------------------- what a caller may see
    def access(self, user: User) -> rbac.Access:
        """The caller's scope. A Full Administrator (its role read with the token) costs nothing."""
        if user.role == ADMIN_ROLE:
            return rbac.Access(user.username, user.role, True, None, True, frozenset())
        return rbac.access_for(self.master, user.username)

    def visible_instruction(self, iid: int, access: rbac.Access) -> dict[str, Any]:
        """The instruction row as ``access`` may see it, or :class:`NotFound` -- the same answer
        whether it does not exist, is of an instruction set the caller holds no right on, or
        touches none of the caller's devices (so a 404 reveals nothing)."""
        row = store.get_instruction(self.master, iid)
        if row is None or not self.may_see(row, access):
            raise NotFound(f"instruction {iid} not found")
        return row

    def may_see(self, row: dict[str, Any], access: rbac.Access) -> bool:
        if access.admin:
            return True
        if not access.may_view_set(row["instruction_set"]):
            return False
        if access.devices is None:
            return True
        has_rows, visible = store.visible_rows(self.responses, row["id"], access.devices)
        if has_rows:
            return visible
        return _scope_meets(row["scope"], access.devices)

    def status(self, iid: int, access: rbac.Access | None = None,
               row: dict[str, Any] | None = None) -> InstructionStatus | None:
        """The instruction's status with its counts over the caller's devices (``access`` None:
        every device, for the unscoped internal feed)."""
        row = row if row is not None else store.get_instruction(self.master, iid)
        if row is None:
            return None
        scope = access.devices if access is not None else None
        states = store.state_counts(self.responses, iid, scope)
        targeted = row["targeted"] if scope is None else sum(states.values())
        devices = row["scope"]
        if scope is not None and devices is not None:
            devices = [d for d in devices if d in scope]
        # who approved an action so far (when, why), of how many needed; why an approved one is not
        # issued (only while it waits for the Core, or once it never was: None when all is well)
        approvals = ([ApprovalRecord(**a) for a in ins.approvals_of(self.master, iid)]
                     if row["kind"] == "action" else [])
        issue_error = row.get("issue_error") if row["status"] in (ins.READY, ins.NEVER_ISSUED) else None
        return InstructionStatus(id=iid, name=row["name"], kind=row["kind"], status=row["status"],
                                 approvers_required=row.get("approvers_required"), approvals=approvals,
                                 issue_error=issue_error,
                                 targeted=targeted, states=states,
                                 created_by=row["created_by"], issued_at=row["issued_at"],
                                 expires_at=row["expires_at"], scheduled_at=row["scheduled_at"],
                                 decided_by=row["decided_by"], decision_reason=row["decision_reason"],
                                 payload=row["payload"], parameters=row["parameters"] or {},
                                 instruction_set=row["instruction_set"], devices=devices)

    def list_instructions(self, access: rbac.Access, offset: int, limit: int,
                          statuses: list[str] | None, match: store.InstructionMatch | None = None) -> InstructionPage:
        """Newest first: for a Full Administrator (or a reader of every set and device) one page
        query, as ever; otherwise only the instructions :meth:`may_see` lets through. ``match``:
        the history search (who, name, when), in SQL."""
        sets = None if access.all_sets else access.sets
        ids: set[int] | None = None
        if access.devices is not None:
            candidates = store.instruction_scopes(self.master, statuses, sets=sets, raw=access.all_sets, match=match)
            with_rows = store.instructions_with_rows(self.responses)
            seen = store.instructions_with_rows(self.responses, access.devices)
            ids = {i for i, scope in candidates
                   if ((i in seen) if i in with_rows else _scope_meets(scope, access.devices))}
        total, rows = store.list_instructions(self.master, offset, limit, statuses, sets=sets, raw=access.all_sets,
                                              ids=ids, match=match)
        counts = store.state_counts_many(self.responses, [r["id"] for r in rows], access.devices)
        items = []
        for r in rows:
            states = counts.get(r["id"], {})
            devices = r["scope"]
            if access.devices is not None and devices is not None:
                devices = [d for d in devices if d in access.devices]
            items.append(InstructionSummary(
                id=r["id"], name=r["name"], kind=r["kind"], status=r["status"], payload=r["payload"],
                parameters=r["parameters"] or {}, devices=devices,
                targeted=r["targeted"] if access.devices is None else sum(states.values()),
                states=states, created_by=r["created_by"], created_at=r["created_at"],
                issued_at=r["issued_at"], expires_at=r["expires_at"], scheduled_at=r["scheduled_at"],
                approval_expires_at=r["approval_expires_at"], decided_by=r["decided_by"],
                decision_reason=r["decision_reason"]))
        return InstructionPage(offset=offset, limit=limit, total=total, items=items)

    def device_results_page(self, iid: int, access: rbac.Access, offset: int, limit: int,
                            state: str | None) -> DeviceResultsPage:
        """paging=device (named, not the default): one item per device (``total``: the matching devices)."""
        rows = store.page_results(self.responses, iid, offset, limit, state, access.devices)
        held = store.held_counts(self.responses, iid, access.devices)
        counts = store.state_counts(self.responses, iid, access.devices)
        total = counts.get(state, 0) if state else sum(counts.values())
        return DeviceResultsPage(instruction_id=iid, offset=offset, limit=limit, held=held, total=total,
                                 items=[DeviceResult(device=r["device_id"], status=r["state"], columns=r["columns"],
                                                     rows=r["rows"], error=r["error"]) for r in rows])

    def row_query(self, iid: int, access: rbac.Access, sort: list[str], filters: list[str], device: str | None,
                  states: list[str]) -> tuple[list[store.Layout], store.RowQuery]:
        """The instruction's column layouts and the checked query (see :func:`parse_row_query`)."""
        layouts = store.result_layouts(self.responses, iid, access.devices)
        return layouts, parse_row_query(layouts, sort, filters, device, states)

    def result_rows_page(self, iid: int, access: rbac.Access, offset: int, limit: int, sort: list[str],
                         filters: list[str], device: str | None, states: list[str]) -> ResultsPage:
        """The default page: one row per device and result row, sorted and filtered in SQL, with
        the total of matching rows (all of the caller's devices only)."""
        layouts, q = self.row_query(iid, access, sort, filters, device, states)
        columns = store.result_columns(layouts)
        total, rows = store.page_result_rows(self.responses, iid, offset, limit, access.devices, layouts, q)
        held = store.held_counts(self.responses, iid, access.devices)
        align = Aligner(columns)
        return ResultsPage(instruction_id=iid, offset=offset, limit=limit, held=held, total=total,
                           columns=columns, sort=list(sort), filters=list(filters),
                           rows=[ResultRow(device=r["device_id"], status=r["state"], error=r["error"],
                                           index=r["index"], cells=align(r["columns"], r["row"])) for r in rows])

    def held_page(self, iid: int, access: rbac.Access, kind: str, offset: int, limit: int) -> HeldPage:
        if kind == "refused" and not access.admin:
            raise Forbidden("refused answers are for Full Administrators")
        rows = store.page_held(self.responses, iid, kind, offset, limit, access.devices)
        return HeldPage(instruction_id=iid, items=[
            HeldAnswer(id=r["id"], kind=r["kind"], device=r["device_id"], switch=r["switch"], status=r["state"],
                       reason=r["reason"], received_at=r["received_at"], columns=r["response"].get("columns", []),
                       rows=r["response"].get("rows", []), error=r["response"].get("error")) for r in rows])

    def aggregate(self, row: dict[str, Any], access: rbac.Access, by: list[str] | None,
                  limit: int) -> dict[str, Any]:
        """Rows of every successful answer (of the caller's devices) grouped by columns."""
        if not by:
            try:
                d = load_definition(self.master, row["name"]) if row["instruction_set"] else None
            except DefinitionError:
                d = None
            if d is None or d.aggregation is None:
                raise Invalid("give by=COLUMN (this instruction's definition declares no aggregation)")
            by = list(d.aggregation.group_by)
        return store.aggregate(self.responses, row["id"], by, limit, access.devices)

    def software(self, iid: int, access: rbac.Access, limit: int) -> dict[str, Any]:
        """Software inventory normalised by the Catalog, over the caller's devices' answers."""
        if self.catalog is None:
            raise Unavailable("no Catalog is configured for this server")
        agg = store.aggregate(self.responses, iid, ["Publisher", "Product", "Version"], limit, access.devices)
        if agg["devices"] and agg["missing"] == agg["devices"]:
            raise Invalid("the answers have no Publisher, Product and Version columns")
        entries = [{"publisher": g["values"][0] or "", "title": g["values"][1] or "", "version": g["values"][2] or ""}
                   for g in agg["groups"]]
        normalised: list[dict[str, Any]] = []
        if entries:
            try:
                with self.catalog() as catalog:
                    for i in range(0, len(entries), 1000):
                        normalised += catalog.normalize(entries[i:i + 1000])
            except Exception as e:  # CatalogError: unreachable Catalog, missing key
                raise Unavailable(f"Catalog: {e}") from None
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
        return {"instruction_id": iid, "devices": agg["devices"], "normalised": items,
                "unmatched_installations": unmatched, "raw_entries": len(entries), "truncated": agg["truncated"]}

    def devices(self, access: rbac.Access) -> list[Device]:
        rows = store.list_devices(self.master, access.devices)
        attrs = rbac.attributes_of(self.master)  # one read, whatever the number of devices
        return [Device(**{k: r[k] for k in Device.model_fields if k != "attributes"},
                       attributes=attrs.get(r["device_id"], {})) for r in rows]

    def device(self, access: rbac.Access, device_id: str, recent: int) -> DeviceDetail:
        """One device as the caller may see it: :class:`NotFound` for a device outside the caller's
        management groups, the same answer as for one that does not exist. Its groups (all that
        match it for a Full or Group Administrator; of the others', only the caller's own) and the
        ``recent`` newest instructions that targeted it of the instruction sets the caller may view."""
        from quanta.db.tables import management_groups, user_groups

        rows = [] if access.devices is not None and device_id not in access.devices else \
            store.list_devices(self.master, [device_id])
        if not rows:
            raise NotFound(f"device {device_id} not found")
        attrs = rbac.attributes_of(self.master, [device_id]).get(device_id, {})
        device = Device(**{k: rows[0][k] for k in Device.model_fields if k != "attributes"}, attributes=attrs)
        with self.master.connect() as c:
            groups = c.execute(sa.select(management_groups.c.name, management_groups.c.rule)
                               .order_by(management_groups.c.name)).all()
            known = None if access.admin or rbac.allowed(self.master, access.username, "groups", "*") else set(
                c.execute(sa.select(user_groups.c.group_name).where(user_groups.c.username == access.username)).scalars())
        as_rule = {**device.model_dump(), "attributes": attrs}
        names = [g.name for g in groups if (known is None or g.name in known) and rbac.matches(g.rule or {}, as_rule)]
        mine = store.device_results(self.responses, device_id, recent)
        _, seen = store.list_instructions(self.master, 0, recent, sets=None if access.all_sets else access.sets,
                                          raw=access.all_sets, ids=[r["instruction_id"] for r in mine])
        by_id = {r["id"]: r for r in seen}
        recent_rows = [DeviceInstruction(id=r["instruction_id"], name=i["name"], kind=i["kind"], status=i["status"],
                                         state=r["state"], error=r["error"], created_by=i["created_by"],
                                         created_at=i["created_at"], updated_at=r["updated_at"])
                       for r in mine if (i := by_id.get(r["instruction_id"])) is not None]
        return DeviceDetail(**device.model_dump(), address=rows[0]["address"] or "", first_seen=rows[0]["first_seen"],
                            groups=names, instructions=recent_rows)

    def set_attributes(self, user: User, device_id: str, changes: dict[str, str | None]) -> dict[str, str]:
        try:
            after = rbac.set_attributes(self.master, device_id, changes, user.username)
        except rbac.UnknownDevice:
            raise NotFound(f"device {device_id} not found") from None
        except ValueError as e:
            raise Invalid(str(e)) from None
        store.audit(self.master, user.username, "device_attributes", device_id, source=user.source, changes=changes)
        return after


# ------------------------------------------------------------- result rows: sort, filter, export
MAX_SORTS = 4
MAX_FILTERS = 8
MAX_FILTER_VALUE = 1000  # characters of one filter value


class Aligner:
    """Cells of a device's row in the order of ``columns`` (by name, whatever the device's layout)."""

    def __init__(self, columns: list[str]) -> None:
        self.columns = columns
        self._maps: dict[tuple[str, ...], list[int | None]] = {}

    def __call__(self, cols: Any, row: list[Any] | None) -> list[Any]:
        if not row:
            return [None] * len(self.columns)
        key = tuple(cols) if isinstance(cols, list) and all(isinstance(c, str) for c in cols) else ()
        where = self._maps.get(key)
        if where is None:
            if len(self._maps) > 1024:
                self._maps.clear()
            pos = {c: i for i, c in enumerate(key)}
            where = self._maps[key] = [pos.get(c) for c in self.columns]
        return [row[i] if i is not None and i < len(row) else None for i in where]


def _valid_names(columns: list[str]) -> str:
    shown = [*store.RESULT_FIELDS, *columns]
    more = len(shown) - 50
    return ", ".join(shown[:50]) + (f" and {more} more" if more > 0 else "")


def _check_text(what: str, value: str) -> None:
    if "\x00" in value:
        raise Invalid(f"{what} must not contain NUL")
    if len(value) > MAX_FILTER_VALUE:
        raise Invalid(f"{what} is longer than {MAX_FILTER_VALUE} characters")


def parse_row_query(layouts: list[store.Layout], sort: list[str], filters: list[str], device: str | None,
                    states: list[str]) -> store.RowQuery:
    """Check the user's sort and filter terms against the instruction's columns.

    ``sort``: ``NAME`` (ascending) or ``-NAME`` (descending), NAME one of device, status, error or
    a result column. ``filters``: ``NAME:OP:VALUE``, OP one of :data:`store.FILTER_OPS` (the first
    ``:OP:`` splits, so a value may hold colons; ``empty``/``nonempty`` take no value). A number
    VALUE compares numerically with number cells; anything else compares as text. Unknown names
    or operators are a 422 that names the valid ones; values are bound, never pasted into SQL."""
    import re

    columns = store.result_columns(layouts)
    known = set(store.RESULT_FIELDS) | set(columns)
    if len(layouts) > store.MAX_LAYOUTS and (any(t.lstrip("-") not in store.RESULT_FIELDS for t in sort)
                                             or any(f.split(":", 1)[0] not in store.RESULT_FIELDS for f in filters)):
        raise Invalid(f"these answers have more than {store.MAX_LAYOUTS} column layouts: sort and filter by "
                      "device, status or error only")
    if len(sort) > MAX_SORTS:
        raise Invalid(f"at most {MAX_SORTS} sort terms")
    if len(filters) > MAX_FILTERS:
        raise Invalid(f"at most {MAX_FILTERS} filters")
    sorts = []
    for term in sort:
        _check_text("sort", term)
        name = term[1:] if term.startswith("-") else term
        if name not in known:
            raise Invalid(f"unknown sort column {name[:100]!r}; valid: {_valid_names(columns)}")
        sorts.append(store.RowSort(name, term.startswith("-")))
    pattern = re.compile(r"^(.*?):(" + "|".join(store.FILTER_OPS) + r")(?::(.*))?$", re.S)
    parsed = []
    for term in filters:
        _check_text("filter", term)
        m = pattern.match(term)
        if m is None:
            raise Invalid(f"a filter is COLUMN:OP:VALUE with OP one of {', '.join(store.FILTER_OPS)}")
        name, op, value = m.group(1), m.group(2), m.group(3) or ""
        if name not in known:
            raise Invalid(f"unknown filter column {name[:100]!r}; valid: {_valid_names(columns)}")
        if op in ("lt", "le", "gt", "ge") and name in ("device", "status", "error") and not value:
            raise Invalid(f"filter {op} needs a value")
        if name == "status" and op in ("eq", "ne") and value not in ALL_STATES:
            raise Invalid(f"unknown status {value[:100]!r}; known: {', '.join(ALL_STATES)}")
        parsed.append(store.RowFilter(name, op, value))
    if device is not None:
        _check_text("device", device)
    for st in states:
        if st not in ALL_STATES:
            raise Invalid(f"unknown status {st[:100]!r}; known: {', '.join(ALL_STATES)}")
    return store.RowQuery(sorts, parsed, device or None, list(dict.fromkeys(states)))
