"""A local stand-in for the parts of the Hugging Face Hub API that `create_repo` and `upload_folder` call.

It listens on 127.0.0.1 only, accepts one bearer token, bounds request sizes, and records the repositories,
committed files and every request line with its headers, so tests can check what a push sent. Files are
taken as regular (base64) commit entries: the preupload answer tells the client so, which keeps LFS and Xet
transfers out of the test.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

MAX_BODY = 256 * 1024 * 1024
FORBIDDEN_ORG = "not-yours"  # creating a repository under this namespace is refused (403)
HUB_TOKEN = "hf_StandInToken0123456789abcdefXYZ"  # what the tests' stand-in accepts


class HubStandIn:
    def __init__(self, token: str) -> None:
        self.token = token
        self.repos: dict[str, dict] = {}  # repo id -> {"private": bool, "files": {path: bytes}, "commits": [...]}
        self.requests: list[dict] = []
        self.cards: list[dict] = []  # model-card front matter sent for validation
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def _reply(self, status: int, payload: dict) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self) -> bytes | None:
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY:
                    self._reply(413, {"error": "request too large"})
                    return None
                return self.rfile.read(length) if length else b""

            def _authorised(self) -> bool:
                if self.headers.get("Authorization") == f"Bearer {hub.token}":
                    return True
                self._reply(401, {"error": "Invalid credentials in Authorization header"})
                return False

            def do_GET(self) -> None:
                self._record(b"")
                self._reply(404, {"error": "not implemented in the stand-in"})

            def do_POST(self) -> None:
                body = self._body()
                if body is None:
                    return
                self._record(body)
                if not self._authorised():
                    return
                path = urlparse(self.path).path
                parts = path.strip("/").split("/")
                if path == "/api/repos/create":
                    return self._create(json.loads(body))
                if path == "/api/validate-yaml":
                    return self._validate(json.loads(body))
                # /api/models/<owner>/<name>/(preupload|commit)/<revision>
                if len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] in ("preupload", "commit"):
                    repo_id = f"{parts[2]}/{parts[3]}"
                    if repo_id not in hub.repos:
                        return self._reply(404, {"error": "Repository not found"})
                    if parts[4] == "preupload":
                        return self._preupload(json.loads(body))
                    return self._commit(repo_id, body)
                self._reply(404, {"error": "not implemented in the stand-in"})

            def _record(self, body: bytes) -> None:
                with hub._lock:
                    hub.requests.append({"method": self.command, "path": self.path,
                                         "headers": dict(self.headers.items()), "size": len(body)})

            def _create(self, payload: dict) -> None:
                repo_id = f"{payload.get('organization') or 'me'}/{payload['name']}"
                if payload.get("organization") == FORBIDDEN_ORG:
                    return self._reply(403, {"error": "You don't have the rights to create a model under this namespace"})
                with hub._lock:
                    if repo_id in hub.repos:
                        return self._reply(409, {"error": "You already created this model repo"})
                    hub.repos[repo_id] = {"private": payload.get("visibility") == "private", "files": {},
                                          "commits": []}
                self._reply(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})

            def _validate(self, payload: dict) -> None:
                import yaml

                content = payload.get("content", "")
                try:
                    meta = yaml.safe_load(content.split("---")[1]) if content.startswith("---") else None
                except (yaml.YAMLError, IndexError):
                    meta = None
                if not isinstance(meta, dict):
                    return self._reply(400, {"errors": [{"message": "no valid YAML front matter"}]})
                with hub._lock:
                    hub.cards.append(meta)
                self._reply(200, {"errors": [], "warnings": []})

            def _preupload(self, payload: dict) -> None:
                files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                         for f in payload["files"]]
                self._reply(200, {"files": files, "commitOid": "0" * 40})

            def _commit(self, repo_id: str, body: bytes) -> None:
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                header = next(item["value"] for item in lines if item["key"] == "header")
                with hub._lock:
                    repo = hub.repos[repo_id]
                    for item in lines:
                        if item["key"] == "file":
                            repo["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    oid = hashlib.sha1(body).hexdigest()
                    repo["commits"].append({"summary": header["summary"], "oid": oid})
                self._reply(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid,
                                  "pullRequestUrl": None})

        return Handler
