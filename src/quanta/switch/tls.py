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


# aiofastnet's engine decodes every peer certificate into a dict when a handshake completes (its
# transports' ``peercert`` extra), by writing the certificate to a temporary file and reading it
# back with ssl's test decoder: measured here 0.3-0.6 ms of CPU per handshake and a file created
# and removed in the temporary directory (on a busy disk the event loop waits for it), and the
# dict is kept for the connection's life. The Switch never reads that dict: it parses the
# certificate itself from its DER (``quanta.pki.peer_device``). ``skip_peer_decoding`` makes the
# engine's decode an empty dict with no file, by giving that one module a ``tempfile`` whose
# NamedTemporaryFile writes nothing and an ``ssl`` whose test decoder returns {}; every other name
# in its ``ssl`` is the real module's. Applied only when the module still holds the real modules.


class _NoFile:
    name = ""  # aiofastnet removes the file only ``if path``

    def __enter__(self) -> _NoFile:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def write(self, data: str) -> int:
        return len(data)


def skip_peer_decoding() -> bool:
    """Make aiofastnet's direct engine skip decoding peer certificates (see above); True once done."""
    import tempfile
    import types

    try:
        from aiofastnet import ssl_engine_direct as engine
    except ImportError:  # pragma: no cover - depends on the OpenSSL aiofastnet finds
        return False
    if getattr(engine, "_quanta_skip_peer_decoding", False):
        return True
    if getattr(engine, "tempfile", None) is not tempfile or getattr(engine, "ssl", None) is not ssl:
        log.warning("aiofastnet's engine is not the one this was written for; peer certificates are decoded "
                    "at every handshake as before")
        return False
    fake_ssl = types.ModuleType("ssl")
    fake_ssl.__dict__.update(ssl.__dict__)
    fake_ssl._ssl = types.SimpleNamespace(_test_decode_cert=lambda path: {})  # type: ignore[attr-defined]
    fake_ssl.DER_cert_to_PEM_cert = lambda der: ""  # type: ignore[attr-defined]
    fake_tempfile = types.SimpleNamespace(NamedTemporaryFile=lambda *a, **kw: _NoFile())
    engine.ssl = fake_ssl  # type: ignore[attr-defined]
    engine.tempfile = fake_tempfile  # type: ignore[attr-defined]
    engine._quanta_skip_peer_decoding = True  # type: ignore[attr-defined]
    return True


def lean_tls(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """Mark a server context for aiofastnet's socket-BIO engine when it is available, and skip the
    engine's decoding of every peer certificate (``skip_peer_decoding``)."""
    if direct_engine_available():
        ctx._aiofastnet_force_socket_bio = True  # type: ignore[attr-defined]
        skip_peer_decoding()
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


# ---------------------------------------------------------------------------- device purpose
# Only device certificates may connect (``quanta.pki.device_refusal``). OpenSSL refuses a client
# certificate without clientAuth by itself; the device purpose is Quanta's own extended key usage,
# which OpenSSL has no setting for, so a verify callback (``SSL_CTX_set_verify``) checks it on the
# leaf once the chain, validity and CRL checks have passed, and refuses the handshake
# (X509_V_ERR_INVALID_PURPOSE) otherwise. The callback also logs every refused leaf with the
# reason, its subject and serial. It runs only for full handshakes: a resumed session skips
# verification, which is why ``AgentConnection.on_ws_connected`` checks the purpose again.

X509_V_ERR_INVALID_PURPOSE = 26
SSL_VERIFY_PEER = 0x01
SSL_VERIFY_FAIL_IF_NO_PEER_CERT = 0x02


def _verify_lib():  # type: ignore[no-untyped-def]
    import ctypes

    lib = _libssl()
    vp = ctypes.c_void_p
    for name, restype, args in (
            ("X509_STORE_CTX_get_error_depth", ctypes.c_int, [vp]),
            ("X509_STORE_CTX_get_error", ctypes.c_int, [vp]),
            ("X509_STORE_CTX_set_error", None, [vp, ctypes.c_int]),
            ("X509_STORE_CTX_get_current_cert", vp, [vp]),
            ("X509_STORE_CTX_get_ex_data", vp, [vp, ctypes.c_int]),
            ("SSL_get_ex_data_X509_STORE_CTX_idx", ctypes.c_int, []),
            ("SSL_get_fd", ctypes.c_int, [vp]),
            ("X509_verify_cert_error_string", ctypes.c_char_p, [ctypes.c_long]),
            ("i2d_X509", ctypes.c_int, [vp, ctypes.POINTER(vp)])):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, args
    return lib


def _peer_address(lib, store: int) -> str:  # type: ignore[no-untyped-def]
    """The peer's address of the connection being verified, when OpenSSL holds its socket."""
    import socket

    ssl_ptr = lib.X509_STORE_CTX_get_ex_data(store, lib.SSL_get_ex_data_X509_STORE_CTX_idx())
    fd = lib.SSL_get_fd(ssl_ptr) if ssl_ptr else -1
    if fd < 0:
        return "?"
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return "?"
    try:
        host, port = sock.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "?"
    finally:
        sock.detach()  # the descriptor stays the connection's


def _leaf_der(lib, store: int) -> bytes | None:  # type: ignore[no-untyped-def]
    import ctypes

    cert = lib.X509_STORE_CTX_get_current_cert(store)
    if not cert:
        return None
    n = lib.i2d_X509(cert, None)
    if n <= 0:
        return None
    buf = ctypes.create_string_buffer(n)
    out = ctypes.c_void_p(ctypes.addressof(buf))
    if lib.i2d_X509(cert, ctypes.byref(out)) != n:
        return None
    return buf.raw


def refuse_non_devices(ctx: ssl.SSLContext) -> bool:
    """Make the handshake of a mutual-TLS server context refuse every certificate that is not a
    device certificate, with a log line; False (and a warning) where this OpenSSL cannot be reached,
    which leaves the check to ``on_ws_connected``."""
    import ctypes

    from cryptography import x509

    from quanta.pki import describe, device_refusal

    found = _ssl_ctx_pointer(ctx)
    try:
        lib = _verify_lib() if found is not None else None
    except AttributeError:
        lib = None
    if found is None or lib is None:
        log.warning("the TLS handshake cannot check the device purpose here; connections without a device "
                    "certificate are refused before their first frame instead")
        return False
    ptr = found[1]

    def verify(ok: int, store: int) -> int:
        try:
            if lib.X509_STORE_CTX_get_error_depth(store) != 0:
                return ok
            der = _leaf_der(lib, store)
            if der is None:
                return ok
            cert = x509.load_der_x509_certificate(der)
            if ok:
                why = device_refusal(cert)
                if why is None:
                    return 1
                lib.X509_STORE_CTX_set_error(store, X509_V_ERR_INVALID_PURPOSE)
            else:
                err = lib.X509_STORE_CTX_get_error(store)
                why = (device_refusal(cert) if err == X509_V_ERR_INVALID_PURPOSE else None) or \
                    (lib.X509_verify_cert_error_string(err) or b"?").decode()
            log.warning("refused TLS handshake from %s: %s (%s)", _peer_address(lib, store), why, describe(cert))
            return 0
        except Exception:  # noqa: BLE001 - a callback must not raise into OpenSSL; refuse instead
            log.exception("device certificate check failed; refusing the handshake")
            return 0

    prototype = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p)  # int (*)(int, X509_STORE_CTX *)
    cb = prototype(verify)
    ctx._quanta_verify_callback = cb  # type: ignore[attr-defined]  # lives as long as the context
    lib.SSL_CTX_set_verify.restype = None
    lib.SSL_CTX_set_verify.argtypes = [ctypes.c_void_p, ctypes.c_int, prototype]
    lib.SSL_CTX_set_verify(ptr, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, cb)
    return True
