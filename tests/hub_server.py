"""A local stand-in for the Hugging Face Hub's HTTP API, enough for `create_repo` + `upload_folder`.

`FakeHub` serves on 127.0.0.1 (a free port) from a background thread, keeps repos
in memory and records every request, so tests can drive the real
`huggingface_hub` client against it (`HfApi(endpoint=hub.url)`) and check
exactly which files arrived, byte for byte. It stops itself after `lifetime_s`
seconds, and each connection times out, so a test can never hang on it.

Endpoints (paths as the client in huggingface_hub 1.x/2.x sends them; models only):

    POST /api/repos/create                              create a repo; 409 (with its url) if it exists
    POST /api/models/{repo}/branch/{branch}             create a branch from main; 409 if it exists
    POST /api/validate-yaml                             README front matter must parse as a YAML mapping
    POST /api/models/{repo}/preupload/{revision}        upload mode per file: "lfs" for `lfs_patterns`, else "regular"
    POST /{repo}.git/info/lfs/objects/batch             LFS batch API, basic transfer, upload + verify actions
    PUT  /lfs-storage/{sha256}                          LFS object store (body must hash to the oid)
    POST /lfs-storage/{sha256}/verify                   LFS verify
    POST /api/models/{repo}/commit/{revision}           NDJSON commit: header, file (base64), lfsFile,
                                                        deletedFile, deletedFolder

Anything else is answered 404 and listed in `unhandled`; a request the handlers
choke on is answered 400 and listed in `errors`.
"""
from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional
from urllib.parse import unquote, urlsplit

import yaml


@dataclass
class FakeRepo:
    """A repo: files per branch, and the commits made to it."""

    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    commits: list[dict[str, Any]] = field(default_factory=list)


class HubError(Exception):
    """An HTTP error answer: status, message, and the X-Error-Code the client maps to its exceptions."""

    def __init__(self, status: int, message: str, code: Optional[str] = None, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


class FakeHub:
    """The in-memory Hub. Use as a context manager; `url` is the endpoint to give the client."""

    def __init__(self, lfs_patterns: tuple[str, ...] = ("*.safetensors",), lifetime_s: float = 60.0,
                 namespace: str = "fake-user"):
        self.lfs_patterns = lfs_patterns
        self.namespace = namespace
        self.repos: dict[str, FakeRepo] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # (method, path, headers)
        self.unhandled: list[tuple[str, str]] = []
        self.errors: list[str] = []  # exceptions raised while handling a request
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.block_on_close = False
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-hub", daemon=True)
        self._watchdog = threading.Timer(lifetime_s, self.stop)
        self._watchdog.daemon = True
        self._stopped = False

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeHub":
        self._thread.start()
        self._watchdog.start()
        return self

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._watchdog.cancel()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of a branch: path -> bytes."""
        return dict(self.repos[repo_id].branches[revision])

    def paths(self, method: str = "") -> list[str]:
        """The request paths seen (optionally of one method), in order."""
        return [path for m, path, _ in self.requests if not method or m == method]

    # ------------------------------------------------------------------ routes

    def route(self, method: str, path: str) -> tuple[Callable[..., Any], dict[str, str]]:
        for route_method, pattern, handler in self._routes():
            match = pattern.fullmatch(path)
            if route_method == method and match:
                return handler, {k: unquote(v) for k, v in match.groupdict().items()}
        self.unhandled.append((method, path))
        raise HubError(404, f"no such endpoint: {method} {path}")

    def _routes(self):
        return (
            ("POST", re.compile(r"/api/repos/create"), self.create_repo),
            ("POST", re.compile(r"/api/models/(?P<repo>.+)/branch/(?P<branch>[^/]+)"), self.create_branch),
            ("POST", re.compile(r"/api/validate-yaml"), self.validate_yaml),
            ("POST", re.compile(r"/api/models/(?P<repo>.+)/preupload/(?P<revision>[^/]+)"), self.preupload),
            ("POST", re.compile(r"/(?P<repo>.+)\.git/info/lfs/objects/batch"), self.lfs_batch),
            ("PUT", re.compile(r"/lfs-storage/(?P<oid>[0-9a-f]{64})"), self.lfs_put),
            ("POST", re.compile(r"/lfs-storage/(?P<oid>[0-9a-f]{64})/verify"), self.lfs_verify),
            ("POST", re.compile(r"/api/models/(?P<repo>.+)/commit/(?P<revision>[^/]+)"), self.commit),
        )

    def repo(self, repo_id: str, revision: Optional[str] = None) -> FakeRepo:
        if repo_id not in self.repos:
            raise HubError(404, f"Repository Not Found for url: {repo_id}", "RepoNotFound")
        repo = self.repos[repo_id]
        if revision is not None and revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo

    # ------------------------------------------------------------------ handlers: body -> JSON answer

    def create_repo(self, body: bytes) -> dict:
        payload = json.loads(body)
        repo_id = f"{payload.get('organization') or self.namespace}/{payload['name']}"
        with self._lock:
            if repo_id in self.repos:
                raise HubError(409, "You already created this model repo", url=f"{self.url}/{repo_id}")
            self.repos[repo_id] = FakeRepo(private=payload.get("visibility") == "private")
        return {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()}

    def create_branch(self, body: bytes, repo: str, branch: str) -> dict:
        fake = self.repo(repo)
        with self._lock:
            if branch in fake.branches:
                raise HubError(409, f"Reference already exists: {branch}")
            fake.branches[branch] = dict(fake.branches["main"])
        return {}

    def validate_yaml(self, body: bytes) -> dict:
        content = json.loads(body)["content"]
        match = re.match(r"\A---\n(.*?)\n---\n", content, flags=re.S)
        if match is None:
            return {"errors": [], "warnings": [{"message": "empty or missing yaml metadata in repo card"}]}
        try:
            parsed = yaml.safe_load(match.group(1))
        except yaml.YAMLError as err:
            raise HubError(400, f"Invalid YAML: {err}")
        if not isinstance(parsed, dict):
            raise HubError(400, "YAML front matter is not a mapping")
        return {"errors": [], "warnings": []}

    def preupload(self, body: bytes, repo: str, revision: str) -> dict:
        self.repo(repo, revision)
        files = json.loads(body)["files"]
        return {"files": [{"path": f["path"], "uploadMode": self._upload_mode(f["path"], f["size"]),
                           "shouldIgnore": False, "oid": None} for f in files]}

    def _upload_mode(self, path: str, size: int) -> str:
        lfs = size > 0 and any(fnmatch.fnmatch(path, p) for p in self.lfs_patterns)
        return "lfs" if lfs else "regular"

    def lfs_batch(self, body: bytes, repo: str) -> dict:
        self.repo(repo)
        payload = json.loads(body)
        assert payload["operation"] == "upload", payload
        return {"transfer": "basic", "objects": [self._lfs_object(o["oid"], o["size"]) for o in payload["objects"]]}

    def _lfs_object(self, oid: str, size: int) -> dict:
        answer = {"oid": oid, "size": size, "authenticated": True}
        if oid not in self.lfs:  # already stored objects get no actions: the client skips them
            answer["actions"] = {"upload": {"href": f"{self.url}/lfs-storage/{oid}"},
                                 "verify": {"href": f"{self.url}/lfs-storage/{oid}/verify"}}
        return answer

    def lfs_put(self, body: bytes, oid: str) -> dict:
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, f"content does not hash to {oid}")
        with self._lock:
            self.lfs[oid] = body
        return {}

    def lfs_verify(self, body: bytes, oid: str) -> dict:
        payload = json.loads(body)
        if oid not in self.lfs or len(self.lfs[oid]) != payload["size"]:
            raise HubError(404, f"LFS object {oid} missing or of the wrong size")
        return {}

    def commit(self, body: bytes, repo: str, revision: str) -> dict:
        fake = self.repo(repo, revision)
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "commit payload must start with a header line")
        with self._lock:
            files = dict(fake.branches[revision])
            record = {"revision": revision, **lines[0]["value"], "added": {}, "lfs": [], "deleted": []}
            for line in lines[1:]:
                self._apply(files, record, line["key"], line["value"])
            oid = hashlib.sha1(json.dumps([len(fake.commits), revision, sorted(files)]).encode()).hexdigest()
            record["oid"] = oid
            fake.branches[revision] = files
            fake.commits.append(record)
        return {"success": True, "commitOid": oid, "commitUrl": f"{self.url}/{repo}/commit/{oid}", "hookOutput": ""}

    def _apply(self, files: dict[str, bytes], record: dict, key: str, value: dict) -> None:
        path = value["path"]
        if key == "file":
            files[path] = record["added"][path] = base64.b64decode(value["content"])
        elif key == "lfsFile":
            if value["oid"] not in self.lfs:
                raise HubError(400, f"LFS object {value['oid']} of {path} was never uploaded")
            files[path] = record["added"][path] = self.lfs[value["oid"]]
            record["lfs"].append(path)
        elif key == "deletedFile":
            files.pop(path, None)
            record["deleted"].append(path)
        elif key == "deletedFolder":
            for name in [n for n in files if n.startswith(path.rstrip("/") + "/")]:
                del files[name]
            record["deleted"].append(path)
        else:
            raise HubError(400, f"unknown commit operation {key!r}")


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    """A request-handler class bound to `hub`."""
    return type("BoundFakeHubHandler", (FakeHubHandler,), {"hub": hub})


class FakeHubHandler(BaseHTTPRequestHandler):
    """Reads the body (plain or chunked), routes to the hub, answers JSON. Subclassed with `hub` set."""

    hub: FakeHub
    timeout = 10  # seconds per socket read: a stuck client cannot hold a thread

    def do_GET(self):
        self._serve()

    def do_POST(self):
        self._serve()

    def do_PUT(self):
        self._serve()

    def _serve(self) -> None:
        path = urlsplit(self.path).path
        body = self._read_body()
        self.hub.requests.append((self.command, path, dict(self.headers)))
        try:
            handler, params = self.hub.route(self.command, path)
            self._answer(200, handler(body, **params))
        except HubError as err:
            self._answer(err.status, {"error": err.message, **err.extra}, err.code)
        except Exception as err:  # a bug or a malformed request: answer 400 (the client does not retry it)
            self.hub.errors.append(repr(err))
            self._answer(400, {"error": f"fake hub failed: {err!r}"})

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _read_chunked(self) -> bytes:
        chunks = []
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            chunks.append(self.rfile.read(size))
            self.rfile.readline()  # CRLF after each chunk

    def _answer(self, status: int, payload: dict, error_code: Optional[str] = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if error_code:
            self.send_header("X-Error-Code", error_code)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):  # keep test output quiet
        pass
