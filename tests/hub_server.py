"""A small Hugging Face Hub-compatible HTTP server for the test-suite (standard library only).

It implements the subset of the Hub API that the real `huggingface_hub` client uses to create repos,
push commits (preupload -> LFS "basic" batch transfer -> NDJSON commit) and download files
(`/resolve/` HEAD/GET), with branches, commit-addressed revisions, private repos and token roles.

Run: `python tests/hub_server.py --port 0 --root DIR --tokens '{"tok": {"user": "alice", "role": "write"}}'`
(`--tokens @file.json` reads the mapping from a file). It prints `READY <port>` once listening and
exits cleanly on SIGTERM. Token values are never logged.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import secrets
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qs, unquote, urlsplit

# Files at least this large always go through LFS (same threshold as the public Hub).
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
LFS_SUFFIXES = (".bin", ".safetensors", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf",
                ".npy", ".npz", ".pkl", ".pickle", ".zip", ".gz", ".tar", ".parquet", ".arrow")
GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES)
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
API_PLURAL = {"models": "model", "datasets": "dataset", "spaces": "space"}
_REPO = r"(?:(datasets|spaces)/)?([^/]+)/([^/]+?)"
RESOLVE_RE = re.compile(rf"^/{_REPO}/resolve/([^/]+)/(.+)$")
LFS_RE = re.compile(rf"^/{_REPO}\.git/info/lfs/objects/(batch|verify)$")
API_REPO_RE = re.compile(r"^/api/(models|datasets|spaces)/([^/]+)/([^/]+)(?:/(.*))?$")
UPLOAD_RE = re.compile(r"^/lfs-upload/([0-9a-f]{32})$")
SHA_RE = re.compile(r"^[0-9a-f]{7,40}$")


class HubError(Exception):
    """An HTTP error answered with the `X-Error-Code`/`X-Error-Message` headers the client maps."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.extra = extra or {}  # more fields of the JSON error body


def repo_not_found(repo_id: str) -> HubError:
    return HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")


def git_blob_oid(content: bytes) -> str:
    """The git object id of a blob, as the Hub reports it for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Identity:
    """Who a token belongs to and what it may do."""

    user: str
    role: str
    orgs: tuple[str, ...] = ()

    def owns(self, namespace: str) -> bool:
        return namespace == self.user or namespace in self.orgs

    def can_write_namespace(self, namespace: str) -> bool:
        return self.role == "write" and self.owns(namespace)


class RepoStore:
    """Repos with commits, branches and a content-addressed object store, persisted under `root`.

    A repo is a dict: private flag, branches {name: commit sha}, commits {sha: {parent, title, message,
    author, date, files}}, and the LFS objects uploaded for it. `files` maps a path to
    {sha256, size, lfs}; contents live once in `root/objects/<sha256>`.
    """

    def __init__(self, root: Path):
        self.root = root
        self.objects = root / "objects"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.state_path = root / "state.json"
        self.lock = threading.RLock()
        self.repos: dict[str, dict] = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        self.upload_tickets: dict[str, tuple[str, str, int]] = {}

    @staticmethod
    def key(repo_type: str, repo_id: str) -> str:
        return f"{repo_type}s/{repo_id}"

    def save(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.repos))
        os.replace(tmp, self.state_path)

    def put_object(self, content: bytes) -> str:
        sha256 = hashlib.sha256(content).hexdigest()
        path = self.objects / sha256
        if not path.exists():
            tmp = self.objects / f"tmp-{secrets.token_hex(8)}"
            tmp.write_bytes(content)
            os.replace(tmp, path)
        return sha256

    def get_repo(self, repo_type: str, repo_id: str, identity: Identity | None) -> dict:
        """The repo if it exists and `identity` may see it; private repos look missing to others."""
        repo = self.repos.get(self.key(repo_type, repo_id))
        namespace = repo_id.split("/")[0]
        visible = repo is not None and (not repo["private"] or (identity is not None and identity.owns(namespace)))
        if not visible:
            raise repo_not_found(repo_id)
        return repo

    @staticmethod
    def resolve(repo: dict, revision: str) -> str:
        """Commit sha for a branch name, a full sha or an unambiguous sha prefix."""
        if revision in repo["branches"]:
            return repo["branches"][revision]
        if SHA_RE.match(revision):
            matches = [sha for sha in repo["commits"] if sha.startswith(revision)]
            if len(matches) == 1:
                return matches[0]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def create_repo(self, repo_type: str, repo_id: str, private: bool, author: str) -> dict:
        repo = {"private": private, "created_at": now_iso(), "branches": {}, "commits": {}, "lfs_oids": []}
        self.repos[self.key(repo_type, repo_id)] = repo
        self.commit(repo, "main", {".gitattributes": self.regular_file(GITATTRIBUTES.encode())},
                    "initial commit", "", author, parent=None)
        return repo

    def regular_file(self, content: bytes) -> dict:
        """Tree entry of a file stored in git itself."""
        return {"sha256": self.put_object(content), "size": len(content), "lfs": False,
                "blob_oid": git_blob_oid(content)}

    @staticmethod
    def lfs_file(sha256: str, size: int) -> dict:
        """Tree entry of an LFS file: git holds only the pointer, whose blob oid the Hub reports."""
        return {"sha256": sha256, "size": size, "lfs": True, "blob_oid": git_blob_oid(lfs_pointer(sha256, size))}

    def commit(self, repo: dict, branch: str, files: dict, title: str, message: str, author: str,
               parent: str | None) -> str:
        """Record a new commit whose tree is `files` on top of `parent`, and move `branch` to it."""
        record = {"parent": parent, "title": title, "message": message, "author": author, "date": now_iso(),
                  "files": files}
        sha = hashlib.sha1(json.dumps([record, secrets.token_hex(8)], sort_keys=True).encode()).hexdigest()
        repo["commits"][sha] = record
        repo["branches"][branch] = sha
        self.save()
        return sha


def tree_entries(files: dict, prefix: str, recursive: bool) -> list[dict] | None:
    """Tree listing entries under folder `prefix` ('' = root); None when `prefix` is no folder."""
    base = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
    entries: dict[str, dict] = {}
    for path, info in sorted(files.items()):
        if not path.startswith(base):
            continue
        parts = path[len(base):].split("/")
        folders = parts[:-1] if recursive else parts[:1] if len(parts) > 1 else []
        for depth in range(1, len(folders) + 1):
            folder = base + "/".join(parts[:depth])
            entries.setdefault(folder, {"type": "directory", "path": folder, "size": 0, "oid": None})
        if recursive or len(parts) == 1:
            entries[path] = file_entry_json(path, info)
    if base and not entries:
        return None
    for entry in entries.values():
        if entry["type"] == "directory":
            children = sorted((p, f["blob_oid"]) for p, f in files.items() if p.startswith(entry["path"] + "/"))
            entry["oid"] = hashlib.sha1(json.dumps(children).encode()).hexdigest()
    return list(entries.values())


def file_entry_json(path: str, info: dict) -> dict:
    entry = {"type": "file", "path": path, "size": info["size"], "oid": info["blob_oid"]}
    if info["lfs"]:
        pointer_size = len(lfs_pointer(info["sha256"], info["size"]))
        entry["lfs"] = {"oid": info["sha256"], "size": info["size"], "pointerSize": pointer_size}
    return entry


def wants_lfs(path: str, size: int, sample: bytes) -> bool:
    return size >= LFS_SIZE_THRESHOLD or path.endswith(LFS_SUFFIXES) or b"\0" in sample


def safe_repo_path(path: str) -> str:
    parts = PurePosixPath(path).parts
    if not path or path.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


class HubHandler(BaseHTTPRequestHandler):
    """Routes each request to a Hub endpoint; the store and tokens hang off the server object."""

    protocol_version = "HTTP/1.1"  # keep-alive: every response carries a Content-Length
    server: HubServer

    # ---- plumbing -------------------------------------------------------------------------------

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - signature of the base class
        """One line per request: method, path, status and the Range asked for (tests read it back)."""
        wanted = getattr(self, "headers", None) and self.headers.get("Range")
        sys.stderr.write(f"[hub_server] {self.command} {self.path.split('?')[0]} {args[1] if len(args) > 1 else ''}"
                         f"{f' range={wanted}' if wanted else ''}\n")

    def _iter_body(self):
        """Request body chunks, for Content-Length and chunked transfer encoding alike."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                yield self.rfile.read(size)
                self.rfile.readline()
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 1 << 20))
            if not chunk:
                return
            remaining -= len(chunk)
            yield chunk

    def _body_json(self) -> dict:
        try:
            return json.loads(self.body or b"{}")
        except json.JSONDecodeError as error:
            raise HubError(400, f"Invalid JSON body: {error}") from error

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, payload, status: int = 200, headers: dict | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _identity(self) -> Identity | None:
        """The caller's identity; an unknown token is rejected outright, like the Hub does."""
        header = self.headers.get("Authorization", "")
        if not header:
            return None
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        info = self.server.tokens.get(token)
        if info is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return Identity(info["user"], info.get("role", "read"), tuple(info.get("orgs", ())))

    def _require_write(self, namespace: str) -> Identity:
        identity = self._identity()
        if identity is None:
            raise HubError(401, "You must be authenticated to access this resource (no token).")
        if not identity.can_write_namespace(namespace):
            raise HubError(403, f"Token of '{identity.user}' ({identity.role}) cannot write to '{namespace}'")
        return identity

    def _base_url(self) -> str:
        return f"http://{self.headers.get('Host') or '127.0.0.1:%d' % self.server.server_port}"

    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        self.route, self.query = split.path, parse_qs(split.query)
        if self.command == "PUT" and UPLOAD_RE.match(self.route):
            self.body = b""  # streamed by the handler itself
        else:
            self.body = b"".join(self._iter_body())
        try:
            self._route()
        except HubError as error:
            headers = dict(error.headers)
            # header values must be latin-1 and single-line
            headers["X-Error-Message"] = " ".join(error.message.encode("ascii", "backslashreplace").decode().split())
            if error.code:
                headers["X-Error-Code"] = error.code
            self._send_json({"error": error.message, **error.extra}, error.status, headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as error:  # a server bug: answer it instead of dropping the connection
            traceback.print_exc()
            self._send_json({"error": f"internal error: {error!r}"}, 500, {"X-Error-Message": "internal error"})

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    def _route(self) -> None:
        route, method = self.route, self.command
        plain = {
            ("GET", "/api/whoami-v2"): self.whoami,
            ("POST", "/api/repos/create"): self.create_repo,
            ("DELETE", "/api/repos/delete"): self.delete_repo,
            ("POST", "/api/validate-yaml"): lambda: self._send_json({"errors": [], "warnings": []}),
            ("GET", "/api/agent-harnesses"): lambda: self._send_json({"standardEnvVars": [], "harnesses": {}}),
        }
        if (method, route) in plain:
            return plain[(method, route)]()
        if method == "PUT" and (match := UPLOAD_RE.match(route)):
            return self.lfs_upload(match.group(1))
        if method in ("GET", "HEAD") and (match := RESOLVE_RE.match(route)):
            kind, namespace, name, revision, path = match.groups()
            return self.resolve(API_PLURAL.get(kind or "models"), f"{unquote(namespace)}/{unquote(name)}",
                                unquote(revision), unquote(path))
        if method == "POST" and (match := LFS_RE.match(route)):
            kind, namespace, name, action = match.groups()
            repo_type, repo_id = API_PLURAL.get(kind or "models"), f"{unquote(namespace)}/{unquote(name)}"
            return self.lfs_batch(repo_type, repo_id) if action == "batch" else self.lfs_verify(repo_type, repo_id)
        if match := API_REPO_RE.match(route):
            plural, namespace, name, rest = match.groups()
            return self.repo_api(API_PLURAL[plural], f"{unquote(namespace)}/{unquote(name)}", rest or "")
        raise HubError(404, f"No such endpoint: {method} {route}")

    # ---- account and repo management --------------------------------------------------------------

    def whoami(self) -> None:
        identity = self._identity()
        if identity is None:
            raise HubError(401, "You must be authenticated to access this resource (no token).")
        self._send_json({
            "type": "user", "id": hashlib.sha1(identity.user.encode()).hexdigest()[:24], "name": identity.user,
            "fullname": identity.user, "email": f"{identity.user}@example.invalid", "emailVerified": True,
            "orgs": [{"type": "org", "name": org} for org in identity.orgs],
            "auth": {"type": "access_token", "accessToken": {"displayName": "test-token", "role": identity.role}},
        })

    def _repo_target(self) -> tuple[str, str, str]:
        payload = self._body_json()
        repo_type = payload.get("type") or "model"
        if repo_type not in URL_PREFIX:
            raise HubError(400, f"Unsupported repo type: {repo_type}")
        identity = self._identity()
        namespace = payload.get("organization") or (identity.user if identity else "")
        name = payload.get("name") or ""
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}", name) or ".." in name or "--" in name:
            raise HubError(400, f"Invalid repo name: {name!r}")
        return repo_type, f"{namespace}/{name}", namespace

    def create_repo(self) -> None:
        repo_type, repo_id, namespace = self._repo_target()
        identity = self._require_write(namespace)
        payload = self._body_json()
        private = payload.get("visibility", "private" if payload.get("private") else "public") == "private"
        url = f"{self._base_url()}/{URL_PREFIX[repo_type]}{repo_id}"
        store = self.server.store
        with store.lock:
            if store.key(repo_type, repo_id) in store.repos:
                # the client reads "url" from this answer when called with exist_ok=True
                raise HubError(409, "You already created this repo", extra={"url": url})
            store.create_repo(repo_type, repo_id, private, identity.user)
        self._send_json({"url": url, "name": repo_id, "id": repo_id})

    def delete_repo(self) -> None:
        repo_type, repo_id, namespace = self._repo_target()
        identity = self._require_write(namespace)
        store = self.server.store
        with store.lock:
            store.get_repo(repo_type, repo_id, identity)
            del store.repos[store.key(repo_type, repo_id)]
            store.save()
        self._send_json({})

    # ---- per-repo API -------------------------------------------------------------------------------

    def repo_api(self, repo_type: str, repo_id: str, rest: str) -> None:
        action, _, remainder = rest.partition("/")
        revision, _, sub_path = remainder.partition("/")
        revision, sub_path = unquote(revision), unquote(sub_path)
        method = self.command
        if method == "GET" and action in ("", "revision"):
            return self.repo_info(repo_type, repo_id, revision if action else "main")
        if method == "GET" and action == "tree":
            return self.tree(repo_type, repo_id, revision, sub_path)
        if method == "GET" and action == "refs":
            return self.refs(repo_type, repo_id)
        if method == "GET" and action == "commits":
            return self.commits(repo_type, repo_id, revision or "main")
        if method == "POST" and action == "preupload":
            return self.preupload(repo_type, repo_id, revision)
        if method == "POST" and action == "commit":
            return self.create_commit(repo_type, repo_id, revision)
        if method in ("POST", "DELETE") and action == "branch":
            return self.branch(repo_type, repo_id, revision)
        raise HubError(404, f"No such endpoint: {method} /api/{repo_type}s/{repo_id}/{rest}")

    def _readable(self, repo_type: str, repo_id: str, revision: str) -> tuple[dict, str]:
        store = self.server.store
        with store.lock:
            repo = store.get_repo(repo_type, repo_id, self._identity())
            return repo, store.resolve(repo, revision)

    def repo_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo, sha = self._readable(repo_type, repo_id, revision)
        commit = repo["commits"][sha]
        with_blobs = self.query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = []
        for path, info in sorted(commit["files"].items()):
            sibling = {"rfilename": path}
            if with_blobs:
                entry = file_entry_json(path, info)
                sibling.update(size=info["size"], blobId=info["blob_oid"])
                if "lfs" in entry:
                    sibling["lfs"] = {"size": info["size"], "sha256": info["sha256"],
                                      "pointerSize": entry["lfs"]["pointerSize"]}
            siblings.append(sibling)
        self._send_json({
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id, "author": repo_id.split("/")[0],
            "sha": sha, "lastModified": commit["date"], "createdAt": repo["created_at"], "private": repo["private"],
            "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
        })

    def tree(self, repo_type: str, repo_id: str, revision: str, sub_path: str) -> None:
        repo, sha = self._readable(repo_type, repo_id, revision)
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        entries = tree_entries(repo["commits"][sha]["files"], sub_path, recursive)
        if entries is None:
            raise HubError(404, f"Entry not found: {sub_path}", "EntryNotFound", {"X-Repo-Commit": sha})
        self._send_json(entries)

    def refs(self, repo_type: str, repo_id: str) -> None:
        repo, _ = self._readable(repo_type, repo_id, "main")
        with self.server.store.lock:
            branches = [{"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha}
                        for name, sha in sorted(repo["branches"].items())]
        self._send_json({"branches": branches, "converts": [], "tags": [], "pullRequests": []})

    def commits(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo, sha = self._readable(repo_type, repo_id, revision)
        history = []
        while sha is not None:
            commit = repo["commits"][sha]
            history.append({"id": sha, "title": commit["title"], "message": commit["message"],
                            "authors": [{"user": commit["author"]}], "date": commit["date"]})
            sha = commit["parent"]
        self._send_json(history)

    def _writable(self, repo_type: str, repo_id: str, branch: str) -> tuple[Identity, dict, str]:
        """Identity, repo and head sha of `branch`; commits can only target existing branches."""
        identity = self._identity()
        store = self.server.store
        repo = store.get_repo(repo_type, repo_id, identity)
        identity = self._require_write(repo_id.split("/")[0])
        if branch not in repo["branches"]:
            raise HubError(404, f"Invalid rev id: {branch} (commits must target an existing branch)",
                           "RevisionNotFound")
        return identity, repo, repo["branches"][branch]

    def branch(self, repo_type: str, repo_id: str, name: str) -> None:
        store = self.server.store
        with store.lock:
            identity = self._identity()
            repo = store.get_repo(repo_type, repo_id, identity)
            self._require_write(repo_id.split("/")[0])
            if self.command == "DELETE":
                if name == "main":
                    raise HubError(403, "The main branch cannot be deleted")
                if name not in repo["branches"]:
                    raise HubError(404, f"Invalid rev id: {name}", "RevisionNotFound")
                del repo["branches"][name]
            else:
                if name in repo["branches"]:
                    raise HubError(409, f"Reference already exists: refs/heads/{name}")
                start = self._body_json().get("startingPoint") or "main"
                repo["branches"][name] = store.resolve(repo, start)
            store.save()
        self._send_json({})

    def preupload(self, repo_type: str, repo_id: str, branch: str) -> None:
        store = self.server.store
        with store.lock:
            _, repo, head = self._writable(repo_type, repo_id, branch)
            head_files = repo["commits"][head]["files"]
        answers = []
        for item in self._body_json().get("files", []):
            path = safe_repo_path(item["path"])
            sample = base64.b64decode(item.get("sample", ""))
            lfs = wants_lfs(path, int(item.get("size", 0)), sample)
            existing = head_files.get(path)
            remote_oid = None if existing is None else (existing["sha256"] if existing["lfs"] else existing["blob_oid"])
            answers.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                            "oid": remote_oid})
        self._send_json({"files": answers, "commitOid": head})

    def create_commit(self, repo_type: str, repo_id: str, branch: str) -> None:
        if self.query.get("create_pr"):
            raise HubError(400, "Pull requests are not supported by the test hub server")
        try:
            lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise HubError(400, f"Invalid NDJSON commit payload: {error}") from error
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The commit payload must start with a header line")
        header = lines[0]["value"]
        store = self.server.store
        with store.lock:
            identity, repo, head = self._writable(repo_type, repo_id, branch)
            parent_commit = header.get("parentCommit")
            if parent_commit and not head.startswith(parent_commit):
                raise HubError(412, f"A commit has happened since {parent_commit}; head is {head}")
            files = dict(repo["commits"][head]["files"])
            for line in lines[1:]:
                self._apply_operation(repo, files, line["key"], line["value"])
            sha = store.commit(repo, branch, files, header.get("summary", ""), header.get("description", ""),
                               identity.user, parent=head)
        url = f"{self._base_url()}/{URL_PREFIX[repo_type]}{repo_id}/commit/{sha}"
        self._send_json({"success": True, "commitOid": sha, "commitUrl": url, "hookOutput": "",
                         "pullRequestUrl": None})

    def _apply_operation(self, repo: dict, files: dict, key: str, value: dict) -> None:
        path = safe_repo_path(value.get("path", "").rstrip("/") if key == "deletedFolder" else value.get("path", ""))
        store = self.server.store
        if key == "file":
            if value.get("encoding", "base64") != "base64":
                raise HubError(400, f"Unsupported encoding for {path}")
            files[path] = store.regular_file(base64.b64decode(value["content"]))
        elif key == "lfsFile":
            oid = value["oid"]
            if oid not in repo["lfs_oids"] or not (store.objects / oid).exists():
                raise HubError(422, f"LFS object {oid} for {path} was not uploaded to this repo")
            files[path] = store.lfs_file(oid, (store.objects / oid).stat().st_size)
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
        elif key == "deletedFolder":
            doomed = [p for p in files if p.startswith(path + "/")]
            if not doomed:
                raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
            for doomed_path in doomed:
                del files[doomed_path]
        else:
            raise HubError(400, f"Unsupported commit operation: {key}")

    # ---- LFS -----------------------------------------------------------------------------------------

    def lfs_batch(self, repo_type: str, repo_id: str) -> None:
        payload = self._body_json()
        if payload.get("operation") != "upload":
            raise HubError(400, "Only LFS uploads are supported (downloads go through /resolve/)")
        store = self.server.store
        with store.lock:
            identity = self._identity()
            repo = store.get_repo(repo_type, repo_id, identity)
            self._require_write(repo_id.split("/")[0])
            branch = (payload.get("ref") or {}).get("name")
            if branch and branch not in repo["branches"]:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            objects = []
            for item in payload.get("objects", []):
                oid, size = str(item["oid"]), int(item["size"])
                answer = {"oid": oid, "size": size, "authenticated": True}
                if not re.fullmatch(r"[0-9a-f]{64}", oid):
                    answer["error"] = {"code": 422, "message": "oid must be a sha256 hex digest"}
                elif oid not in repo["lfs_oids"] or not (store.objects / oid).exists():
                    ticket = secrets.token_hex(16)
                    store.upload_tickets[ticket] = (store.key(repo_type, repo_id), oid, size)
                    base = self._base_url()
                    answer["actions"] = {
                        "upload": {"href": f"{base}/lfs-upload/{ticket}", "expires_in": 3600},
                        "verify": {"href": f"{base}/{URL_PREFIX[repo_type]}{repo_id}.git/info/lfs/objects/verify"},
                    }
                objects.append(answer)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def lfs_upload(self, ticket: str) -> None:
        """PUT of an LFS object; the unguessable ticket from the batch answer is the credential."""
        store = self.server.store
        digest, size = hashlib.sha256(), 0
        tmp = store.objects / f"tmp-{secrets.token_hex(8)}"
        try:
            with tmp.open("wb") as sink:
                for chunk in self._iter_body():
                    digest.update(chunk)
                    size += len(chunk)
                    sink.write(chunk)
            with store.lock:
                target = store.upload_tickets.pop(ticket, None)
                if target is None:
                    raise HubError(403, "Unknown or already used upload ticket")
                repo_key, oid, expected_size = target
                if digest.hexdigest() != oid or size != expected_size:
                    raise HubError(400, f"Uploaded content does not match oid {oid} / size {expected_size}")
                os.replace(tmp, store.objects / oid)
                repo = store.repos.get(repo_key)
                if repo is not None and oid not in repo["lfs_oids"]:
                    repo["lfs_oids"].append(oid)
                    store.save()
        finally:
            tmp.unlink(missing_ok=True)
        self._send(200, b"", content_type="text/plain")

    def lfs_verify(self, repo_type: str, repo_id: str) -> None:
        payload = self._body_json()
        store = self.server.store
        with store.lock:
            repo = store.get_repo(repo_type, repo_id, self._identity())
            oid = str(payload.get("oid"))
            path = store.objects / oid
            if oid not in repo["lfs_oids"] or not path.exists() or path.stat().st_size != payload.get("size"):
                raise HubError(404, f"LFS object {oid} not found")
        self._send_json({"success": True})

    # ---- downloads -----------------------------------------------------------------------------------

    def resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        repo, sha = self._readable(repo_type, repo_id, revision)
        info = repo["commits"][sha]["files"].get(path)
        if info is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": sha})
        object_path = self.server.store.objects / info["sha256"]
        total = info["size"]
        headers = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes",
                   "ETag": f'"{info["sha256"] if info["lfs"] else info["blob_oid"]}"'}
        if info["lfs"]:
            headers.update({"X-Linked-Etag": f'"{info["sha256"]}"', "X-Linked-Size": str(total)})
        start, end, status = 0, total - 1, 200
        if (wanted := re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))) and total:
            start, end = int(wanted.group(1)), min(int(wanted.group(2) or total - 1), total - 1)
            if start > end:
                raise HubError(416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{total}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{total}"
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command == "GET":
            with object_path.open("rb") as source:
                source.seek(start)
                remaining = end - start + 1
                while remaining > 0:
                    chunk = source.read(min(remaining, 1 << 20))
                    self.wfile.write(chunk)
                    remaining -= len(chunk)


class HubServer(ThreadingHTTPServer):
    """Threaded HTTP server carrying the repo store and the token table."""

    daemon_threads = True

    def __init__(self, port: int, root: Path, tokens: dict):
        self.store = RepoStore(root)
        self.tokens = tokens
        super().__init__(("127.0.0.1", port), HubHandler)


def load_tokens(value: str) -> dict:
    """Token table from JSON text, or from a file when given as `@path`."""
    tokens = json.loads(Path(value[1:]).read_text() if value.startswith("@") else value)
    for info in tokens.values():
        if info.get("role", "read") not in ("read", "write") or not info.get("user"):
            raise SystemExit("each token needs a 'user' and a role of 'read' or 'write'")
    return tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0 = pick a free one)")
    parser.add_argument("--root", type=Path, required=True, help="folder holding the repos")
    parser.add_argument("--tokens", default="{}", help='JSON {"token": {"user": ..., "role": "read"|"write"}} or @file')
    args = parser.parse_args(argv)
    server = HubServer(args.port, args.root, load_tokens(args.tokens))

    def stop(signum, frame) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"READY {server.server_port}", flush=True)
    started = time.monotonic()
    server.serve_forever(poll_interval=0.1)
    server.server_close()
    sys.stderr.write(f"[hub_server] stopped after {time.monotonic() - started:.1f}s\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
