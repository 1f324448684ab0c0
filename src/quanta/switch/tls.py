"""How the Switch's TLS is driven: lean per-connection state.

The Switch serves agents through picows on aiofastnet's transports (``use_aiofastnet=True``).
aiofastnet's direct engine drives OpenSSL itself; with the socket BIO, OpenSSL reads and writes
the connection's socket directly, so a connection has no memory BIOs and no read buffer of its
own beyond OpenSSL's record buffer, which ``SSL_MODE_RELEASE_BUFFERS`` (set by Python's ``ssl``)
frees while the connection is idle. Measured on this kind of machine (``bench/connect.py``):
about 12 KiB less per idle mutual-TLS connection than uvloop's ``SSLProtocol`` with its two
memory BIOs and its 256 KiB read buffer.

aiofastnet spells the socket-BIO switch as an attribute on the context; it is honoured only by
its direct engine (an OpenSSL it can load), so it is set only when that engine is there.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from pathlib import Path

log = logging.getLogger("quanta.switch")


def direct_engine_available() -> bool:
    try:
        from aiofastnet import ssl_transport
    except ImportError:  # pragma: no cover - aiofastnet is a dependency of picows
        return False
    return getattr(ssl_transport, "SSLEngineDirect", None) is not None


def lean_tls(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """Mark a server context for aiofastnet's socket-BIO engine when it is available."""
    if direct_engine_available():
        ctx._aiofastnet_force_socket_bio = True  # type: ignore[attr-defined]
    else:  # pragma: no cover - depends on the OpenSSL aiofastnet finds
        log.warning("aiofastnet's direct OpenSSL engine is unavailable; TLS uses memory BIOs "
                    "(more memory per connection)")
    return ctx


# ---------------------------------------------------------------------------- session tickets
# TLS 1.3 resumption: a reconnecting agent offers the ticket its last connection got, and the
# Switch skips the certificate exchange (and its signatures and chain checks) and the parsing
# of the device certificate. A ticket is encrypted with the Switch process's ticket key; OpenSSL
# draws that key at random per context, so without help no ticket survives a Switch restart, and
# a restart is when the whole fleet reconnects at once. Python's ``ssl`` has no call for the key,
# so it is set through OpenSSL's ``SSL_CTX_ctrl`` (``SSL_CTX_set_tlsext_ticket_keys``) on the
# context's ``SSL_CTX``, which CPython's context object holds right after its object header, as
# aiofastnet's direct engine also reads it. The pointer is checked against the context's options
# and verify mode before anything is written; if it does not match, tickets stay per process.
#
# The key is derived from a secret the Switches of one data directory share (``pki/ticket.secret``,
# 0600) and the UTC day, so every Switch of a host accepts every other's tickets, a restarted
# Switch accepts its predecessor's, and the key changes daily. A resumed session skips the CRL
# check of the handshake; the Switch checks every connection's certificate serial against the
# revoked set before it reads a frame (``AgentConnection.on_ws_connected``).

SSL_CTRL_SET_TLSEXT_TICKET_KEYS = 59
TICKET_KEYS_LEN = 80  # key name 16 + HMAC key 32 + AES key 32 (OpenSSL 1.1.0 and later)
TICKET_PERIOD = 86400.0


def _libssl():  # type: ignore[no-untyped-def]
    import ctypes

    import _ssl

    lib = ctypes.CDLL(_ssl.__file__)  # symbols resolve in _ssl's own libssl/libcrypto
    lib.SSL_CTX_get_options.restype = ctypes.c_uint64
    lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
    lib.SSL_CTX_get_verify_mode.restype = ctypes.c_int
    lib.SSL_CTX_get_verify_mode.argtypes = [ctypes.c_void_p]
    lib.SSL_CTX_ctrl.restype = ctypes.c_long
    lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    return lib


def _ssl_ctx_pointer(ctx: ssl.SSLContext):  # type: ignore[no-untyped-def]
    """(libssl, SSL_CTX*) of a Python context, or None when the layout is not the expected one."""
    import ctypes

    try:
        lib = _libssl()
    except (OSError, AttributeError, ImportError):
        return None
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not ptr:
        return None
    verify = {ssl.CERT_NONE: 0, ssl.CERT_OPTIONAL: 1, ssl.CERT_REQUIRED: 3}[ctx.verify_mode]
    if lib.SSL_CTX_get_options(ptr) != int(ctx.options) or lib.SSL_CTX_get_verify_mode(ptr) != verify:
        return None
    return lib, ptr


def ticket_keys(secret: bytes, period: int) -> bytes:
    """The 80 bytes of ticket key material for one period: key name, HMAC key, AES key."""
    import hashlib
    import hmac

    out = b"".join(hmac.new(secret, f"quanta session ticket {period} {i}".encode(), hashlib.sha256).digest()
                   for i in range(3))
    return out[:TICKET_KEYS_LEN]


def load_ticket_secret(path: Path) -> bytes:
    """The shared secret, created (0600, 32 random bytes) by whichever Switch starts first."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32))
    for _ in range(50):  # another Switch may be between creating and writing it
        data = path.read_bytes()
        if len(data) == 32:
            return data
        time.sleep(0.02)
    raise ValueError(f"{path}: expected 32 bytes of session-ticket secret")


def set_ticket_keys(ctx: ssl.SSLContext, keys: bytes) -> bool:
    """Give the context these session-ticket keys; False if it cannot be done here."""
    import ctypes

    if len(keys) != TICKET_KEYS_LEN:
        raise ValueError("session-ticket keys are 80 bytes")
    found = _ssl_ctx_pointer(ctx)
    if found is None:
        return False
    lib, ptr = found
    buf = ctypes.create_string_buffer(keys, TICKET_KEYS_LEN)
    return lib.SSL_CTX_ctrl(ptr, SSL_CTRL_SET_TLSEXT_TICKET_KEYS, TICKET_KEYS_LEN, buf) == 1


class TicketKeys:
    """Keeps a server context's ticket key on the shared secret's key of the current period."""

    def __init__(self, ctx: ssl.SSLContext, secret_file: Path) -> None:
        self.ctx = ctx
        self.secret = load_ticket_secret(secret_file)
        self.period = -1
        self.shared = False

    def refresh(self, now: float | None = None) -> None:
        period = int((time.time() if now is None else now) // TICKET_PERIOD)
        if period == self.period:
            return
        self.period = period
        self.shared = set_ticket_keys(self.ctx, ticket_keys(self.secret, period))
        if not self.shared:
            log.warning("session tickets cannot be shared between Switch processes here; "
                        "agents resume TLS sessions only until this Switch restarts")
