"""A tiny in-process stand-in for the Hugging Face Hub, enough for `create_repo`, `whoami`, `upload_file` and
`upload_folder` from huggingface_hub 2.x, so `--push_to_hub` can be tested without a network.

    with FakeHub() as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "hf_fake",
               "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0"}
        ... run the script ...
        assert hub.repos["tester/demo"]["files"]["README.md"].startswith(b"---")

HF_ENDPOINT is read when huggingface_hub is imported, so set it before the import (or in a subprocess's env).
HF_HUB_DISABLE_XET=1 is required: with hf_xet installed, the client otherwise uploads through a Xet CAS server,
which this fake does not speak. Without Xet the client falls back to the plain protocol served here:
preupload -> LFS batch -> PUT (+ verify) for large/binary files -> one NDJSON commit.
"""

import base64
import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

USER = "tester"
_REPO = r"(?P<repo>[^/]+/[^/]+|[^/]+)"  # "ns/name", or a bare name
_API_REPO = re.compile(
    rf"^/api/(?:models|datasets|spaces)/{_REPO}(?:/(?P<action>preupload|commit|revision)/(?P<rev>.+))?$")
_LFS_BATCH = re.compile(rf"^/(?:(?:datasets|spaces)/)?{_REPO}\.git/info/lfs/objects/batch$")
_LFS_OBJECT = re.compile(r"^/lfs-(?P<action>upload|verify)/(?P<oid>[0-9a-f]{64})$")


class HttpError(Exception):
    def __init__(self, status, message, code=None, **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


class FakeHub:
    """`with FakeHub() as hub:` serves on `hub.endpoint`; uploads land in `hub.repos`.

    hub.repos:    repo_id -> {"files": {path: bytes}, "commits": [summary], "private": bool, "type": str,
                              "lfs_paths": {paths committed through LFS}, "sha": head commit}
    hub.lfs:      sha256 hex -> bytes, every LFS object received
    hub.requests: [(method, path)] in arrival order, query string dropped
    """

    def __init__(self, lfs_threshold=10_000, require_auth=True, preupload_delay=0.0, fail_commits=False):
        self.lfs_threshold = lfs_threshold  # files this large (or with a NUL byte in the sample) go through LFS
        self.require_auth = require_auth  # writes need "Authorization: Bearer ...", like the real Hub
        self.preupload_delay = preupload_delay  # seconds: a slow Hub, so that uploads overlap with training
        self.fail_commits = fail_commits  # every commit is refused (a full quota, a revoked token...)
        self.repos, self.lfs, self.requests = {}, {}, []
        self.lock = threading.Lock()
        self._server = self._thread = None
        self._commit_count = 0

    def __enter__(self):
        handler = type("Handler", (_Handler,), {"hub": self})  # one subclass per server, so hubs don't mix
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # -- routes; each returns a JSON-able object or raises HttpError ------------------------------------------

    def route(self, method, path, body, headers):
        if m := _LFS_OBJECT.match(path):  # presigned-URL style: no auth, like S3
            if method == "PUT" and m["action"] == "upload":
                return self.lfs_upload(m["oid"], body)
            if method == "POST" and m["action"] == "verify":
                return self.lfs_verify(m["oid"], json.loads(body))
        if method == "GET" and path == "/api/whoami-v2":
            self.check_auth(headers)
            return {"type": "user", "name": USER, "fullname": "Test User", "orgs": [],
                    "auth": {"type": "access_token", "accessToken": {"displayName": "fake", "role": "write"}}}
        if method == "POST" and path == "/api/repos/create":
            self.check_auth(headers)
            return self.create_repo(json.loads(body))
        if method == "POST" and path == "/api/validate-yaml":  # called when README.md is committed
            return {"errors": [], "warnings": []}
        if method == "POST" and (m := _LFS_BATCH.match(path)):
            self.check_auth(headers)
            self.get_repo(m["repo"])
            return self.lfs_batch(json.loads(body))
        if m := _API_REPO.match(path):
            repo, action = self.get_repo(m["repo"]), m["action"]
            if method == "GET" and action in (None, "revision"):
                return self.repo_info(m["repo"], repo)
            if method == "POST" and action == "preupload":
                self.check_auth(headers)
                time.sleep(self.preupload_delay)
                return self.preupload(repo, json.loads(body))
            if method == "POST" and action == "commit":
                self.check_auth(headers)
                return self.commit(m["repo"], repo, body)
        if "/xet-" in path:  # e.g. /api/models/{repo}/xet-write-token/main
            raise HttpError(404, "FakeHub does not speak Xet: set HF_HUB_DISABLE_XET=1 before importing the client")
        raise HttpError(404, f"FakeHub has no route for {method} {path}")

    def check_auth(self, headers):
        if self.require_auth and not (headers.get("Authorization") or "").startswith("Bearer "):
            raise HttpError(401, "Invalid credentials in Authorization header")

    def get_repo(self, repo_id):
        repo = self.repos.get(repo_id)
        if repo is None:  # this error code makes the client raise RepositoryNotFoundError
            raise HttpError(404, "Repository not found", code="RepoNotFound")
        return repo

    def create_repo(self, payload):
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        kind = payload.get("type") or "model"
        url = f"{self.endpoint}/{repo_id}" if kind == "model" else f"{self.endpoint}/{kind}s/{repo_id}"
        with self.lock:
            if repo_id in self.repos:  # `exist_ok=True` swallows the 409, then reads "url" from this very reply
                raise HttpError(409, "You already created this model repo", url=url)
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            self.repos[repo_id] = {"files": {}, "commits": [], "private": private, "type": kind,
                                   "lfs_paths": set(), "sha": "0" * 40}
        return {"url": url, "name": repo_id, "id": repo_id}

    def repo_info(self, repo_id, repo):
        return {"id": repo_id, "author": repo_id.split("/")[0], "sha": repo["sha"], "private": repo["private"],
                "siblings": [{"rfilename": p} for p in sorted(repo["files"])]}

    def preupload(self, repo, payload):
        files = []
        for f in payload["files"]:
            lfs = f["size"] >= self.lfs_threshold or b"\0" in base64.b64decode(f.get("sample", ""))
            entry = {"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            old = repo["files"].get(f["path"])
            if old is not None:  # lets the client skip unchanged files, as on the real Hub
                entry["oid"] = hashlib.sha256(old).hexdigest() if lfs else _git_blob_sha1(old)
            files.append(entry)
        return {"files": files}

    def lfs_batch(self, payload):
        if payload.get("operation") != "upload":
            raise HttpError(400, "FakeHub only supports LFS uploads")
        objects = []
        for obj in payload["objects"]:
            oid, size = obj["oid"], obj["size"]
            item = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.lfs:  # no "actions" means "already stored", the client then skips it
                item["actions"] = {"upload": {"href": f"{self.endpoint}/lfs-upload/{oid}"},
                                   "verify": {"href": f"{self.endpoint}/lfs-verify/{oid}"}}
            objects.append(item)
        return {"transfer": "basic", "objects": objects}

    def lfs_upload(self, oid, body):
        if hashlib.sha256(body).hexdigest() != oid:  # a corrupted upload must never be stored
            raise HttpError(400, f"sha256 of uploaded content does not match oid {oid}")
        with self.lock:
            self.lfs[oid] = body
        return {}

    def lfs_verify(self, oid, payload):
        data = self.lfs.get(oid)
        if data is None or len(data) != payload.get("size"):
            raise HttpError(404, f"LFS object {oid} missing or of the wrong size")
        return {}

    def commit(self, repo_id, repo, body):
        if self.fail_commits:
            raise HttpError(403, "Forbidden: storage quota exceeded")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HttpError(400, "commit payload must start with a header line")
        # Build the new tree first, so that a bad line leaves the repo untouched.
        files, lfs_paths = dict(repo["files"]), set(repo["lfs_paths"])
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            path = value["path"]
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HttpError(400, f"unsupported encoding for {path}")
                files[path] = base64.b64decode(value["content"])
                lfs_paths.discard(path)
            elif key == "lfsFile":
                data = self.lfs.get(value["oid"])
                if data is None or ("size" in value and len(data) != value["size"]):
                    raise HttpError(400, f"LFS object for {path} was not uploaded")
                files[path] = data
                lfs_paths.add(path)
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    raise HttpError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
                lfs_paths.discard(path)
            elif key == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                for p in [p for p in files if p.startswith(prefix)]:
                    del files[p]
                    lfs_paths.discard(p)
            else:
                raise HttpError(400, f"FakeHub does not support commit operation {key!r}")
        with self.lock:
            self._commit_count += 1
            oid = hashlib.sha1(f"{repo_id}:{self._commit_count}".encode()).hexdigest()
            repo.update(files=files, lfs_paths=lfs_paths, sha=oid)
            repo["commits"].append(lines[0]["value"].get("summary", ""))
        url = f"{self.endpoint}/{repo_id}/commit/{oid}"
        return {"success": True, "commitOid": oid, "commitUrl": url,
                "pullRequestUrl": f"{self.endpoint}/{repo_id}/discussions/1"}


def _git_blob_sha1(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every reply carries a Content-Length
    hub = None  # the FakeHub, set on a per-server subclass

    def _body(self):
        # Always drain the body, or the next request on this kept-alive connection is garbled.
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":  # streamed file uploads
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # optional trailers
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self):
        path = unquote(urlsplit(self.path).path)
        body = self._body()
        self.hub.requests.append((self.command, path))
        headers = {}
        try:
            status, reply = 200, self.hub.route(self.command, path, body, self.headers)
        except HttpError as e:
            status, reply = e.status, {"error": e.message, **e.extra}
            if e.code:
                headers["X-Error-Code"] = e.code
        except Exception as e:  # malformed request or a bug in the fake: fail loudly; 400, as a 5xx gets retried
            status, reply = 400, {"error": f"FakeHub crashed: {type(e).__name__}: {e}"}
        data = json.dumps(reply).encode()
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", "Content-Length": str(len(data)), **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = _handle

    def log_message(self, *args):  # keep test output clean; see hub.requests instead
        pass
