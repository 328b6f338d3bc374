"""Local stand-ins for a Kubernetes API server, on loopback: one that answers lists and watches from a script,
and one that accepts connections and never answers (a hung API server).

They stand in for what a unit test cannot start: the cluster tests run the
controller against a real API server.
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from kubernetes import client


def api_client(url: str) -> client.ApiClient:
    cfg = client.Configuration()
    cfg.host = url
    return client.ApiClient(cfg)


class HungServer:
    """Accepts every connection and reads nothing, answers nothing: a stalled API server."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


class ScriptedServer:
    """Serves `GET /api/v1/pods`: a listing of `items`, or (watch=true) the next script of events.

    `watches` is a list of scripts, one per watch request: each a list of
    events ({"type", "object"}) or an int status to answer the watch with
    (410 Gone). Every request's query is recorded in `requests`.
    """

    def __init__(self, items: list[dict[str, Any]], resource_version: str = "100",
                 watches: list[list[dict[str, Any]] | int] | None = None):
        self.items = items
        self.resource_version = resource_version
        self.watches = list(watches or [])
        self.requests: list[dict[str, list[str]]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 (the http.server API)
                query = parse_qs(urlparse(self.path).query)
                stub.requests.append(query)
                if query.get("watch") == ["true"]:
                    return self._watch()
                # Paged as the API server pages a listing: `limit` items, then a `continue` token.
                start = int(query.get("continue", ["0"])[0])
                limit = int(query["limit"][0]) if "limit" in query else len(stub.items)
                page = stub.items[start:start + limit]
                meta = {"resourceVersion": stub.resource_version}
                if start + limit < len(stub.items):
                    meta["continue"] = str(start + limit)
                self._json(200, {"kind": "PodList", "apiVersion": "v1", "items": page, "metadata": meta})

            def _watch(self) -> None:
                script = stub.watches.pop(0) if stub.watches else []
                if isinstance(script, int):
                    return self._json(script, {"kind": "Status", "code": script, "message": "too old"})
                body = b"".join(json.dumps(e).encode() + b"\n" for e in script)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _json(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def pod(name: str, rv: str, phase: str = "Running") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "team", "uid": f"uid-{name}", "resourceVersion": rv,
                         "labels": {"app.kubernetes.io/managed-by": "evalrunner-controller"}},
            "spec": {"nodeName": "node-0", "containers": [{"name": "runner"}]}, "status": {"phase": phase}}
