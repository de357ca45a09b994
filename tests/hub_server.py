"""A Hub-compatible HTTP server on 127.0.0.1 for push tests: the routes `huggingface_hub` 2.x calls to publish
(`hf_api.py` / `_commit_api.py`):

- `POST /api/repos/create`                       -> `{"url": ENDPOINT/ns/name}` (`HfApi.create_repo`)
- `POST /api/validate-yaml`                      -> `{"errors": [], "warnings": []}` (a README.md in a commit)
- `POST /api/models/{ns}/{name}/preupload/{rev}` -> every file `uploadMode: regular` (content travels in the commit)
- `POST /api/models/{ns}/{name}/commit/{rev}`    -> NDJSON header + one `file` line per file, base64 content

Every commit is recorded with its message and files, so tests can check the exact file list and the bytes. With
`status=401` every route answers `401 {"error": "Invalid credentials in Authorization header"}` as the Hub does.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HubState:
    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.commits: list[dict] = []
        self.requests: list[tuple[str, str]] = []
        self.status: int | None = None  # force this status on every route
        self.lock = threading.Lock()


def _handler(state: HubState):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest output clean
            pass

        def _send(self, code: int, payload: dict):
            body = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def do_GET(self):
            state.requests.append(("GET", self.path))
            self._send(state.status or 404, {"error": "Not found"})

        def do_POST(self):
            body = self._body()
            path = self.path.split("?")[0]
            with state.lock:
                state.requests.append(("POST", path))
            if state.status is not None:
                return self._send(state.status, {"error": "Invalid credentials in Authorization header"})
            endpoint = f"http://{self.headers['Host']}"
            if path == "/api/repos/create":
                data = json.loads(body)
                repo_id = f"{data.get('organization') or 'test-user'}/{data['name']}"
                with state.lock:
                    state.repos.setdefault(repo_id, {"visibility": data.get("visibility"), "files": {}})
                return self._send(200, {"url": f"{endpoint}/{repo_id}"})
            if path == "/api/validate-yaml":
                return self._send(200, {"errors": [], "warnings": []})
            parts = path.split("/")  # ['', 'api', 'models', ns, name, kind, revision]
            if len(parts) >= 7 and parts[1:3] == ["api", "models"]:
                repo_id, kind = f"{parts[3]}/{parts[4]}", parts[5]
                if repo_id not in state.repos:
                    return self._send(404, {"error": "Repository not found"})
                if kind == "preupload":
                    files = json.loads(body)["files"]
                    return self._send(
                        200,
                        {
                            "files": [
                                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                            ]
                        },
                    )
                if kind == "commit":
                    lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                    header = lines[0]["value"]
                    files = {
                        line["value"]["path"]: base64.b64decode(line["value"]["content"])
                        for line in lines[1:]
                        if line["key"] == "file"
                    }
                    oid = hashlib.sha1(body).hexdigest()
                    with state.lock:
                        state.repos[repo_id]["files"].update(files)
                        state.commits.append({"repo_id": repo_id, "message": header["summary"], "files": files})
                    return self._send(
                        200,
                        {"commitUrl": f"{endpoint}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None},
                    )
            self._send(404, {"error": f"no route {path}"})

    return Handler


class LoopbackHub:
    """Context manager: a server thread on a free loopback port; `endpoint` is its base URL."""

    def __init__(self):
        self.state = HubState()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.state))
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
