"""Request and response models of the Consumer API. Requests are ``extra="forbid"``: a wrong
type or an unknown field is a 422 naming the field. Every integer is bounded, so an integer
beyond what the database stores (2^63 and up) is a 422 too, never a 500."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, field_validator, model_validator


# An integer a parameter may carry: what a 64-bit database column and SQLite hold.
Int64 = Annotated[int, Field(ge=-2**63, le=2**63 - 1)]
# A unix time a client may give (float, finite): year 1970 to well past 2500.
UnixTime = Annotated[float, Field(ge=0, le=2**34, allow_inf_nan=False)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TokenRequest(Strict):
    username: str = Field(min_length=1, max_length=128)
    password: str = Field(min_length=1, max_length=1024)


class TokenResponse(BaseModel):
    token: str
    expires_at: float = Field(description="unix time the token expires unless used (each use renews it)")
    username: str
    role: str
    absolute_expires_at: float | None = Field(default=None,
                                              description="unix time no renewal goes past; sign in again then")


ParamValue = str | Int64 | Annotated[float, Field(allow_inf_nan=False)] | bool


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
    scheduled_at: UnixTime | None = Field(default=None, description="unix time to issue it; default now")

    @field_validator("parameters", mode="before")
    @classmethod
    def _bounded_integers(cls, value: Any) -> Any:
        """An integer parameter out of the 64-bit range is refused, not silently made a float."""
        if isinstance(value, dict):
            for k, v in value.items():
                if isinstance(v, int) and not isinstance(v, bool) and not -2**63 <= v <= 2**63 - 1:
                    raise ValueError(f"parameter {k!r}: integer out of range (-2^63..2^63-1)")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> IssueRequest:
        if (self.payload is None) == (self.definition is None):
            raise ValueError("give exactly one of payload (raw SCALE) or definition")
        return self


class DecisionRequest(Strict):
    code: str | None = Field(default=None, max_length=16, description="one-time code, when required")
    reason: str | None = Field(default=None, max_length=2000)


class ApprovalRecord(BaseModel):
    """One approval of an action: who, when, and the reason they gave."""

    approver: str
    approved_at: float
    reason: str | None = None


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
    approvers_required: int | None = Field(default=None, description="distinct approvers an action needs; "
                                           "null: it never needed approval")
    approvals: list[ApprovalRecord] = Field(default_factory=list, description="approvals so far, in order")
    issue_error: str | None = Field(default=None, description="why an approved instruction is not issued yet "
                                    "(status created), or never was (status expired); null when all is well")


# fields of InstructionStatus the progress stream leaves out (they do not change; the payload may be large)
STATIC_STATUS_FIELDS = {"payload", "parameters", "instruction_set", "devices"}


class DeviceResult(BaseModel):
    device: str
    status: str
    columns: list[str] | None
    rows: list[list[Any]] | None
    error: str | None


class ResultRow(BaseModel):
    """One result row of one device (a device without rows: one row of empty ``cells``)."""

    device: str
    status: str
    cells: list[Any]  # aligned with ResultsPage.columns (null where the device's answer lacks a column)
    error: str | None
    index: int | None  # the row's position in the device's answer (None: the device has no rows)


class ResultsPage(BaseModel):
    """``/Responses`` (``paging=rows``, the default): one row per device and result row, paged,
    sorted and filtered server-side, with the total of matching rows the caller may see."""

    instruction_id: int
    paging: Literal["rows"] = "rows"
    offset: int = Field(description="rows skipped (past the last row: an empty page, the total still right)")
    limit: int = Field(description="rows asked for, 1-10,000")
    total: int = Field(description="rows that match the filters, of the caller's devices only")
    columns: list[str] = Field(description="the result columns of the answers, in order of first appearance")
    rows: list[ResultRow]
    sort: list[str] = []
    filters: list[str] = []
    # Answers kept but not counted, by kind (late: after the instruction ended; refused: see
    # /Held). Their rows are at /Consumer/Instructions/{id}/Held.
    held: dict[str, int] = {}


class DeviceResultsPage(BaseModel):
    """``/Responses?paging=device``, the named alternative for clients that want each device's
    answer whole (the CLI): one item per device in device order, ``offset``/``limit`` in devices.
    Stable while answers arrive (row offsets move when a pending device's rows land)."""

    instruction_id: int
    paging: Literal["device"] = "device"
    offset: int
    limit: int
    total: int = Field(description="matching devices, of the caller's devices only")
    items: list[DeviceResult]
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
    attributes: dict[str, str] = Field(default_factory=dict,
                                       description="server-assigned attributes (set by an administrator, not the device)")


class DeviceInstruction(BaseModel):
    """One recent instruction that targeted a device, with the device's own state in it."""

    id: int
    name: str
    kind: str
    status: str = Field(description="the instruction's status (active, finished, ...)")
    state: str = Field(description="this device's state for it (pending, sent, success, error, ...)")
    error: str | None = None
    created_by: str
    created_at: float
    updated_at: float = Field(description="unix time this device's state last changed")


class DeviceDetail(Device):
    address: str = Field(description="the IP address it last connected from, as its Switch saw it ('' if never)")
    first_seen: float | None = None
    groups: list[str] = Field(description="management groups whose rule matches the device (those the caller "
                                          "may know of: all for administrators, else the caller's own)")
    instructions: list[DeviceInstruction] = Field(description="recent instructions that targeted it, newest first "
                                                              "(those the caller may see)")


class AttributesRequest(RootModel[dict[Annotated[str, Field(min_length=1, max_length=64)],
                                       Annotated[str, Field(max_length=255)] | None]]):
    """Attributes to set (a string) or remove (null); names 1-64 of [A-Za-z0-9_.-]."""


class DeviceAttributes(BaseModel):
    device_id: str
    attributes: dict[str, str]


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

class User(BaseModel):
    id: int
    username: str
    role: str
    email: str | None = None
    session_id: int | None = None
    source: str = ""  # the address this request came from (audit rows)


# ---------------------------------------------------------------- sessions, users, groups, audit
# Strict: a wrong type is a 422 (no "yes" for true, no 5 for "5"); bounded: every string and list.
class StrictBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


Name = Annotated[str, Field(min_length=1, max_length=128)]
Password = Annotated[str, Field(min_length=1, max_length=1024)]
RoleName = Annotated[str, Field(min_length=1, max_length=64)]


class PasswordChange(StrictBody):
    old_password: Password
    new_password: Password


class PasswordReset(StrictBody):
    password: Password


class Assignment(StrictBody):
    role: RoleName
    instruction_set: Annotated[str, Field(min_length=1, max_length=128)] = Field(
        description="an instruction set, or * for every set")


class UserCreate(StrictBody):
    username: Name
    password: Password
    role: RoleName
    email: Annotated[str, Field(max_length=254)] | None = None
    groups: list[Name] = Field(default_factory=list, max_length=256, description="management groups")
    assignments: list[Assignment] = Field(default_factory=list, max_length=256,
                                          description="roles per instruction set")


class UserUpdate(StrictBody):
    """Only the fields given change; ``groups`` and ``assignments`` replace the lists; ``email``
    null (or "") clears it. Disabling ends the user's sessions at once."""

    role: RoleName | None = None
    email: Annotated[str, Field(max_length=254)] | None = None
    disabled: bool | None = None
    groups: list[Name] | None = Field(default=None, max_length=256)
    assignments: list[Assignment] | None = Field(default=None, max_length=256)

    @model_validator(mode="after")
    def _no_null(self) -> UserUpdate:
        for name in ("role", "disabled", "groups", "assignments"):
            if name in self.model_fields_set and getattr(self, name) is None:
                raise ValueError(f"{name} may not be null (leave it out to keep it)")
        if not self.model_fields_set:
            raise ValueError("nothing to change: give role, email, disabled, groups or assignments")
        return self


class AssignmentOut(BaseModel):
    role: str
    instruction_set: str


class UserOut(BaseModel):
    username: str
    role: str
    email: str | None
    disabled: bool
    created_at: float
    updated_at: float | None
    password_changed_at: float | None
    assignments: list[AssignmentOut]
    groups: list[str]
    sessions: int = Field(description="live sessions")
    locked_until: float | None = Field(description="unix time a login lock on this name ends; null: none")


class LockOut(BaseModel):
    kind: str = Field(description="user (a user name) or source (an address)")
    subject: str
    locked_at: float
    locked_until: float
    failures: int


class PasswordResetDone(BaseModel):
    username: str
    sessions_ended: int


DeviceName = Annotated[str, Field(min_length=1, max_length=255)]
RuleKey = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
RuleValue = Annotated[str, Field(max_length=255)]


class GroupRule(StrictBody):
    """A management group's rule: a device is in the group if it matches every key given
    (``devices``: one of these names; ``os_like``: a glob on the OS; ``tags``: what the device
    reports of itself; ``attributes``: server-assigned, which a device cannot set)."""

    devices: list[DeviceName] | None = Field(default=None, max_length=100_000)
    os_like: Annotated[str, Field(min_length=1, max_length=255)] | None = None
    tags: dict[RuleKey, RuleValue] | None = Field(default=None, max_length=64)
    attributes: dict[RuleKey, RuleValue] | None = Field(default=None, max_length=64)


class GroupOut(BaseModel):
    name: str
    rule: dict[str, Any]
    members: list[str]


class AuditEntryOut(BaseModel):
    id: int
    at: float
    time: str
    actor: str
    source: str
    action: str
    object: str
    before: Any = None
    after: Any = None
    details: dict[str, Any] = Field(default_factory=dict)


class AuditPageOut(BaseModel):
    total: int
    offset: int
    limit: int
    items: list[AuditEntryOut]


