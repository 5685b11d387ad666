"""The client against answers our server never gives (a proxy's HTML, JSON of another shape, a stream cut inside an
event) and inputs HTTP cannot carry (a malformed URL, a header that is not ASCII): each is a MultiplexError naming
what went wrong, never a raw KeyError, JSONDecodeError or httpx exception. A real HTTP server (http.server in a
thread) plays the odd peer."""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from collections.abc import Iterator

import pytest

from clients import Client, MultiplexError
from clients.cli import main as cli_main

ANSWERS = {  # path -> (content type, body)
    "/v1/completions": ("text/html", b"<html>502 Bad Gateway</html>"),
    "/v1/models": ("application/json", b'{"data": "not a list of models"}'),
}
CUT_STREAM = b'data: {"id":"c","choices":[{"text":"hi"}]}\n\ndata: {"choi'


class OddPeer(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length)
        if b'"stream": true' in body or b'"stream":true' in body:
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.end_headers()
            self.wfile.write(CUT_STREAM)  # then the connection closes inside the second event
            return
        self._answer()

    def _answer(self) -> None:
        content_type, body = ANSWERS.get(self.path, ("application/json", b"{}"))
        self.send_response(200)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def odd_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), OddPeer)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_answers_of_another_shape_are_multiplex_errors(odd_url: str) -> None:
    with Client(odd_url, timeout=10) as client:
        with pytest.raises(MultiplexError, match="not JSON: '<html>502") as html:
            client.complete("hi")
        assert html.value.error_type == "invalid_response"
        with pytest.raises(MultiplexError, match="unexpected shape"):
            client.models()
        with pytest.raises(MultiplexError, match="broke inside an event after 1 chunk") as cut:
            list(client.stream("hi"))
        assert cut.value.error_type == "incomplete_stream"


def test_inputs_http_cannot_carry_are_multiplex_errors(odd_url: str) -> None:
    with pytest.raises(MultiplexError) as bad_url:
        Client("http://[::1", timeout=5).health()
    assert bad_url.value.error_type == "invalid_url"
    with Client(odd_url, api_key="clé", timeout=5) as client, pytest.raises(MultiplexError, match="not ASCII"):
        client.complete("hi")


def test_the_cli_says_what_went_wrong_without_a_traceback(odd_url: str, capsys) -> None:
    assert cli_main(["complete", "--url", odd_url, "--no-stream", "hi"]) in (1, 2)
    assert "Traceback" not in capsys.readouterr().err
