"""``quanta export``'s client side against a server that has the Export route and one that has not.

The route (GET /Consumer/Instructions/{id}/Export) is being built on another branch, so a small
real HTTP server on a real socket stands in for it here; the fallback (paging /Responses) runs
against a real Quanta server in tests/test_cli_operator.py."""

from __future__ import annotations

import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest

from quanta.client import ApiError, ConsumerClient

BIG = b"device,status,N\n" + b"".join(b"dev%d,success,%d\n" % (i, i) for i in range(50_000))


class Handler(BaseHTTPRequestHandler):
    mode = "stream"
    seen: list[str] = []

    def log_message(self, *a: object) -> None:
        pass

    def _json(self, code: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._json(200, {"token": "tok", "expires_at": time.time() + 900})

    def do_GET(self) -> None:  # noqa: N802
        Handler.seen.append(self.path)
        assert self.headers["Authorization"] == "Bearer tok"
        if self.mode == "old-server" and "/Responses?" in self.path:
            # a server older than row paging and the Export route: it pages by device whatever it
            # is asked (an unknown query parameter is ignored); two devices, the second page empty
            offset = int(self.path.split("offset=")[1].split("&")[0])
            items = [{"device": "dev1", "status": "success", "columns": ["N", "Name"], "rows": [[1, "=x"], [2, "b"]],
                      "error": None},
                     {"device": "dev2", "status": "error", "columns": None, "rows": None, "error": "boom"}]
            self._json(200, {"instruction_id": 7, "offset": offset, "limit": 1000, "items": items[offset:]})
        elif self.mode in ("no-route", "old-server"):
            self._json(404, {"detail": "Not Found"})
        elif self.mode == "no-instruction":
            self._json(404, {"detail": "no instruction 7"})
        elif self.mode == "bad-format":
            self._json(422, {"detail": "format must be csv, json or ndjson"})
        else:  # chunked, as a streaming response is
            self.send_response(200)
            self.send_header("Content-Type", "text/csv")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(BIG), 7000):
                part = BIG[i:i + 7000]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")


@pytest.fixture
def api() -> Iterator[ConsumerClient]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        with ConsumerClient(f"http://127.0.0.1:{httpd.server_address[1]}", None, "u", "p") as c:
            yield c
    finally:
        httpd.shutdown()


def test_streams_the_export_route(api: ConsumerClient) -> None:
    Handler.mode = "stream"
    sink = io.BytesIO()
    assert api.export(7, "csv", sink) is True
    assert sink.getvalue() == BIG
    assert Handler.seen[-1] == "/Consumer/Instructions/7/Export?format=csv"
    # the connection is usable afterwards
    Handler.mode = "no-route"
    assert api.export(7, "csv", io.BytesIO()) is False


def test_a_missing_route_falls_back_but_a_missing_instruction_is_an_error(api: ConsumerClient) -> None:
    Handler.mode = "no-route"
    sink = io.BytesIO()
    assert api.export(7, "ndjson", sink) is False and sink.getvalue() == b""
    Handler.mode = "no-instruction"
    with pytest.raises(ApiError, match="no instruction 7"):
        api.export(7, "csv", io.BytesIO())
    Handler.mode = "bad-format"
    with pytest.raises(ApiError, match="422"):
        api.export(7, "xml", io.BytesIO())


def test_the_fallback_pages_by_device_by_name(api: ConsumerClient) -> None:
    """Against a server without the Export route, ``quanta export`` pages ``/Responses`` asking
    ``paging=device`` by name (today's servers page by rows unless asked)."""
    from quanta.cli.client_cmds import _write_fallback

    Handler.mode = "old-server"
    Handler.seen.clear()
    assert api.export(7, "csv", io.BytesIO()) is False
    sink = io.BytesIO()
    _write_fallback(api, 7, "csv", sink)
    pages = [p for p in Handler.seen if "/Responses?" in p]
    assert pages == ["/Consumer/Instructions/7/Responses?paging=device&offset=0&limit=1000"]
    # the Export route's CSV: CRLF, and a cell a spreadsheet would run as a formula made text
    assert sink.getvalue().decode() == "device,status,N,Name,error\r\ndev1,success,1,'=x,\r\ndev1,success,2,b,\r\n" \
        "dev2,error,,,boom\r\n"
    sink = io.BytesIO()
    _write_fallback(api, 7, "ndjson", sink)
    assert [json.loads(x) for x in sink.getvalue().splitlines()][2] == {"device": "dev2", "status": "error", "error": "boom"}
