"""A loopback Hugging Face Hub for tests: the few Hub-API endpoints huggingface_hub 2.4 calls.

Repos live in memory as git-like commit chains with 40-hex commit shas. Every preupload is
answered with ``uploadMode: "regular"`` so huggingface_hub sends file content base64-encoded
inside the NDJSON commit and never goes through Xet or LFS (see
``/work/shared/reference/offline-assets.md`` section 2). Any request the server does not know is
answered 404 and recorded in ``HubServer.unknown_requests``, so a test can see which calls a new
huggingface_hub version makes.

Use ``HubServer`` as a context manager, ``running_hub(monkeypatch, hf_home)`` to also point
huggingface_hub at it (temporary ``HF_HOME``, online, Xet disabled), or the ``hub_server``
fixture (register it in ``tests/conftest.py`` with ``from hub_server import hub_server``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

__all__ = ["HubServer", "HubRepo", "configure_hf_env", "running_hub", "hub_server", "git_blob_sha1"]

logger = logging.getLogger(__name__)

DEFAULT_BRANCH = "main"
_POLL_INTERVAL_S = 0.02  # how fast stop() returns; serve_forever checks for shutdown this often
_QUIET_404_PATHS = ("/api/agent-harnesses",)  # huggingface_hub probes it; a 404 is harmless


def git_blob_sha1(content: bytes) -> str:
    """The git blob id of ``content``: what the Hub serves as a regular file's oid and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class HubRepo:
    """One in-memory model repo: commits (sha -> file tree), branches and a privacy flag."""

    repo_id: str
    private: bool = False
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> str | None:
        """A branch name or a full commit sha -> the commit sha, or None."""
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None

    def commit(self, branch: str, tree: dict[str, bytes], summary: str) -> str:
        """Record ``tree`` as a new commit on ``branch``; returns its sha."""
        parent = self.branches.get(branch, "")
        digest = hashlib.sha1()
        digest.update(f"{self.repo_id}\0{parent}\0{len(self.commits)}\0{summary}\0".encode())
        for path in sorted(tree):
            digest.update(f"{path}\0{git_blob_sha1(tree[path])}\0".encode())
        sha = digest.hexdigest()
        self.commits[sha] = dict(tree)
        self.branches[branch] = sha
        return sha


class _HubError(Exception):
    """An error response: status, Hub ``X-Error-Code`` and message."""

    def __init__(
        self,
        status: int,
        code: str | None,
        message: str,
        *,
        commit: str | None = None,
        body: dict[str, Any] | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.body = body or {}
        self.status = status
        self.code = code
        self.message = message
        self.commit = commit


class HubServer:
    """A threaded Hub-API server bound to 127.0.0.1 on a random port.

    ``token``: when set, requests must carry ``Authorization: Bearer <token>``; private repos are
    hidden (404 RepoNotFound, as on the real Hub) from anyone else, and writes are refused (401).
    """

    def __init__(self, *, token: str | None = None) -> None:
        self.token = token
        self.repos: dict[str, HubRepo] = {}
        self.requests: list[tuple[str, str]] = []
        self.unknown_requests: list[tuple[str, str]] = []
        self.auth_headers: list[str | None] = []
        self._fail_next: list[tuple[str, int, int | None]] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        server = self

        class Handler(_HubHandler):
            hub = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": _POLL_INTERVAL_S},
            name="hub-server",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        assert self._thread is not None
        self._thread.join()
        self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- test helpers --------------------------------------------------------------------------
    def fail_next(self, path_contains: str, status: int = 503, *, retry_after_s: int | None = None) -> None:
        """Inject a fault: the next request whose path contains ``path_contains`` gets ``status``
        (with a ``Retry-After`` header when ``retry_after_s`` is given)."""
        with self._lock:
            self._fail_next.append((path_contains, status, retry_after_s))

    def add_commit(self, repo_id: str, files: dict[str, bytes], *, summary: str = "fixture") -> str:
        """Commit ``files`` (merged over the branch head) directly, bypassing the HTTP API."""
        with self._lock:
            repo = self.repos.setdefault(repo_id, _new_repo(repo_id, private=False))
            tree = {**repo.commits[repo.branches[DEFAULT_BRANCH]], **files}
            return repo.commit(DEFAULT_BRANCH, tree, summary)

    def files_at(self, repo_id: str, revision: str) -> dict[str, bytes]:
        with self._lock:
            repo = self.repos[repo_id]
            sha = repo.resolve(revision)
            assert sha is not None, f"unknown revision {revision}"
            return dict(repo.commits[sha])

    def resolve_paths(self) -> list[str]:
        """The paths of every file-content request (HEAD or GET on /resolve/) seen so far."""
        return [path for _, path in self.requests if "/resolve/" in path]

    def _take_fault(self, path: str) -> tuple[int, int | None] | None:
        with self._lock:
            for i, (needle, status, retry_after_s) in enumerate(self._fail_next):
                if needle in path:
                    del self._fail_next[i]
                    return status, retry_after_s
        return None


def _new_repo(repo_id: str, *, private: bool) -> HubRepo:
    repo = HubRepo(repo_id=repo_id, private=private)
    repo.commit(DEFAULT_BRANCH, {}, "initial commit")
    return repo


def _split_repo(segments: list[str]) -> tuple[str, list[str]]:
    """``[ns, name, *rest]`` -> (``ns/name``, rest); connito repos always have a namespace."""
    if len(segments) < 2:
        raise _HubError(404, "RepoNotFound", "repository not found")
    return f"{segments[0]}/{segments[1]}", segments[2:]


class _HubHandler(BaseHTTPRequestHandler):
    hub: HubServer  # set on the per-server subclass
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        logger.debug("hub %s", format % args)

    # -- dispatch ------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        path = split.path
        query = parse_qs(split.query)
        self.hub.requests.append((method, path))
        self.hub.auth_headers.append(self.headers.get("Authorization"))
        body = self._read_body() if method == "POST" else b""
        fault = self.hub._take_fault(path)
        if fault is not None:
            self._send_error(_HubError(fault[0], None, "injected fault", retry_after_s=fault[1]), method)
            return
        segments = [unquote(s) for s in path.strip("/").split("/")]
        try:
            self._route(method, segments, query, body)
        except _HubError as e:
            if e.status == 404 and e.code is None and path not in _QUIET_404_PATHS:
                self.hub.unknown_requests.append((method, self.path))
                logger.warning("hub_server unknown request method=%s path=%s", method, self.path)
            self._send_error(e, method)

    def _route(self, method: str, segments: list[str], query: dict[str, list[str]], body: bytes) -> None:
        if segments[:3] == ["api", "repos", "create"] and method == "POST":
            return self._create_repo(json.loads(body or b"{}"))
        if segments[:2] == ["api", "validate-yaml"] and method == "POST":
            return self._validate_yaml(json.loads(body or b"{}"))
        if segments[:2] == ["api", "datasets"] and len(segments) >= 4 and method == "GET":
            repo_id, rest = _split_repo(segments[2:])  # dataset repos live under "datasets/<id>"
            revision = rest[1] if rest[:1] == ["revision"] and len(rest) >= 2 else DEFAULT_BRANCH
            return self._model_info(f"datasets/{repo_id}", revision, query)
        if segments[:2] == ["api", "models"] and len(segments) >= 4:
            repo_id, rest = _split_repo(segments[2:])
            return self._api_models(method, repo_id, rest, query, body)
        if "resolve" in segments[2:3] and method in ("GET", "HEAD"):
            repo_id, rest = _split_repo(segments)
            return self._resolve(method, repo_id, rest[1], "/".join(rest[2:]))
        raise _HubError(404, None, "unknown endpoint")

    def _validate_yaml(self, payload: dict[str, Any]) -> None:
        """The Hub checks a README.md's metadata block before a commit that adds one."""
        import yaml

        content = str(payload.get("content", ""))
        front = content[3:].partition("\n---")[0] if content.startswith("---") else ""
        try:
            metadata = yaml.safe_load(front) if front else {}
        except yaml.YAMLError as e:
            raise _HubError(400, None, "invalid YAML", body={"errors": [{"message": str(e)}]}) from None
        if metadata is not None and not isinstance(metadata, dict):
            raise _HubError(
                400, None, "metadata must be a mapping", body={"errors": [{"message": "not a mapping"}]}
            )
        self._send_json({"errors": [], "warnings": []})

    def _api_models(
        self, method: str, repo_id: str, rest: list[str], query: dict[str, list[str]], body: bytes
    ) -> None:
        if method == "GET" and not rest:
            return self._model_info(repo_id, DEFAULT_BRANCH, query)
        if len(rest) < 2:
            raise _HubError(404, None, "unknown endpoint")
        action, revision, sub = rest[0], rest[1], rest[2:]
        if method == "GET" and action == "revision":
            return self._model_info(repo_id, revision, query)
        if method == "GET" and action == "tree":
            return self._tree(repo_id, revision, "/".join(sub), query)
        if method == "POST" and action == "preupload":
            return self._preupload(repo_id, revision, json.loads(body))
        if method == "POST" and action == "commit":
            return self._commit(repo_id, revision, body)
        if method == "POST" and action == "paths-info":
            return self._paths_info(repo_id, revision, body)
        raise _HubError(404, None, "unknown endpoint")

    # -- auth and lookups ----------------------------------------------------------------------
    def _is_authorized(self) -> bool:
        return self.hub.token is None or self.headers.get("Authorization") == f"Bearer {self.hub.token}"

    def _require_write(self) -> None:
        if not self._is_authorized():
            raise _HubError(401, None, "invalid credentials")

    def _repo(self, repo_id: str) -> HubRepo:
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and not self._is_authorized()):
            raise _HubError(404, "RepoNotFound", f"Repository {repo_id} not found")
        return repo

    def _tree_at(self, repo: HubRepo, revision: str) -> tuple[str, dict[str, bytes]]:
        sha = repo.resolve(revision)
        if sha is None:
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return sha, repo.commits[sha]

    # -- endpoints -----------------------------------------------------------------------------
    def _create_repo(self, payload: dict[str, Any]) -> None:
        self._require_write()
        if payload.get("type") not in (None, "model"):
            raise _HubError(400, None, "only model repos are supported")
        name = payload["name"]
        repo_id = f"{payload['organization']}/{name}" if payload.get("organization") else name
        with self.hub._lock:
            if repo_id in self.hub.repos:
                # The real Hub's 409 body carries the url; create_repo(exist_ok=True) reads it.
                url = f"{self.hub.url}/{repo_id}"
                raise _HubError(409, None, "You already created this model repo", body={"url": url})
            # huggingface_hub 2.x sends "visibility"; 1.x sent "private".
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            self.hub.repos[repo_id] = _new_repo(repo_id, private=private)
        self._send_json({"url": f"{self.hub.url}/{repo_id}", "name": repo_id})

    def _model_info(self, repo_id: str, revision: str, query: dict[str, list[str]]) -> None:
        repo = self._repo(repo_id)
        sha, tree = self._tree_at(repo, revision)
        with_blobs = query.get("blobs", ["false"])[0].lower() == "true"
        siblings = [
            {"rfilename": path, **({"size": len(data), "blobId": git_blob_sha1(data)} if with_blobs else {})}
            for path, data in sorted(tree.items())
        ]
        public_id = repo_id.removeprefix("datasets/")
        self._send_json({"id": public_id, "sha": sha, "private": repo.private, "siblings": siblings})

    def _tree(self, repo_id: str, revision: str, prefix: str, query: dict[str, list[str]]) -> None:
        repo = self._repo(repo_id)
        _, tree = self._tree_at(repo, revision)
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        base = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        entries: dict[str, dict[str, Any]] = {}
        for path, data in sorted(tree.items()):
            if not path.startswith(base):
                continue
            parts = path[len(base) :].split("/")
            for depth in range(1, len(parts)):  # folders on the way to the file
                folder = base + "/".join(parts[:depth])
                if recursive or depth == 1:
                    entries.setdefault(folder, {"type": "directory", "path": folder, "oid": "0" * 40})
            if recursive or len(parts) == 1:
                entries[path] = _file_entry(path, data)
        if base and not entries:
            raise _HubError(404, "EntryNotFound", f"{prefix} does not exist")
        self._send_json(list(entries.values()))

    def _paths_info(self, repo_id: str, revision: str, body: bytes) -> None:
        repo = self._repo(repo_id)
        _, tree = self._tree_at(repo, revision)
        content_type = self.headers.get("Content-Type", "")
        if content_type.startswith("application/json"):
            paths = json.loads(body).get("paths", [])
        else:
            paths = parse_qs(body.decode()).get("paths", [])
        self._send_json([_file_entry(path, tree[path]) for path in paths if path in tree])

    def _preupload(self, repo_id: str, revision: str, payload: dict[str, Any]) -> None:
        self._require_write()
        repo = self._repo(repo_id)
        sha, tree = self._tree_at(repo, revision)
        files = []
        for item in payload["files"]:
            existing = tree.get(item["path"])
            oid = git_blob_sha1(existing) if existing is not None else None
            files.append({"path": item["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
        self._send_json({"files": files, "commitOid": sha})

    def _commit(self, repo_id: str, revision: str, body: bytes) -> None:
        self._require_write()
        repo = self._repo(repo_id)
        if revision not in repo.branches:
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        summary = ""
        with self.hub._lock:
            tree = dict(repo.commits[repo.branches[revision]])
            for line in body.splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "header":
                    summary = value.get("summary", "")
                elif key == "file":
                    tree[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    tree.pop(value["path"], None)
                elif key == "deletedFolder":
                    folder = value["path"].rstrip("/") + "/"
                    tree = {p: d for p, d in tree.items() if not p.startswith(folder)}
                else:
                    raise _HubError(400, None, f"unsupported commit line key={key} (regular uploads only)")
            sha = repo.commit(revision, tree, summary)
        self._send_json(
            {"commitUrl": f"{self.hub.url}/{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None}
        )

    def _resolve(self, method: str, repo_id: str, revision: str, path: str) -> None:
        repo = self._repo(repo_id)
        sha, tree = self._tree_at(repo, revision)
        data = tree.get(path)
        if data is None:
            raise _HubError(404, "EntryNotFound", f"{path} does not exist at {sha}", commit=sha)
        start = _range_start(self.headers.get("Range"))
        payload = data[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(payload)))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("ETag", f'"{git_blob_sha1(data)}"')
        self.send_header("X-Repo-Commit", sha)
        self.end_headers()
        if method == "GET":
            self.wfile.write(payload)

    # -- responses -----------------------------------------------------------------------------
    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send_json(self, obj: Any, status: int = 200) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, error: _HubError, method: str) -> None:
        data = json.dumps({"error": error.message, **error.body}).encode()
        self.send_response(error.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if error.code:
            self.send_header("X-Error-Code", error.code)
            self.send_header("X-Error-Message", error.message)
        if error.commit:
            self.send_header("X-Repo-Commit", error.commit)
        if error.retry_after_s is not None:
            self.send_header("Retry-After", str(error.retry_after_s))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)


def _file_entry(path: str, data: bytes) -> dict[str, Any]:
    return {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}


def _range_start(header: str | None) -> int:
    if not header or not header.startswith("bytes="):
        return 0
    return int(header[len("bytes=") :].split("-")[0] or 0)


def configure_hf_env(monkeypatch: pytest.MonkeyPatch, endpoint: str, hf_home: Path) -> None:
    """Point huggingface_hub at ``endpoint`` with a private ``HF_HOME``, online, Xet disabled.

    huggingface_hub reads its environment once at import into ``huggingface_hub.constants``, so
    both the variables (for subprocesses) and the constants (for this process) are patched. No
    token leaks in from the developer's machine: HF_TOKEN is unset and the token file lives in
    the temporary home.
    """
    from huggingface_hub import constants

    hf_home.mkdir(parents=True, exist_ok=True)
    env = {
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hf_home / "hub"),
        "HF_ENDPOINT": endpoint,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    patched = {
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hf_home / "hub"),
        "HF_XET_CACHE": str(hf_home / "xet"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(hf_home / ".agent_harnesses.json"),
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
    }
    for name, value in patched.items():
        monkeypatch.setattr(constants, name, value)


@contextmanager
def running_hub(
    monkeypatch: pytest.MonkeyPatch, hf_home: Path, *, token: str | None = None
) -> Iterator[HubServer]:
    """Start a ``HubServer`` and point huggingface_hub at it (see ``configure_hf_env``)."""
    with HubServer(token=token) as server:
        configure_hf_env(monkeypatch, server.url, hf_home)
        yield server


@pytest.fixture
def hub_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[HubServer]:
    """A running loopback Hub with huggingface_hub pointed at it, for ``tests/conftest.py`` to share."""
    with running_hub(monkeypatch, tmp_path / "hf_home") as server:
        yield server
