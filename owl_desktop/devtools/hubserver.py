"""A stand-in for the Hugging Face hub on 127.0.0.1, with faults to inject. For the tests and `bench gui-stall`
(a download while the window is timed); the app itself never starts it.

It speaks what huggingface_hub 2.4 and owl-desktop use:
  GET  /api/models/{owner}/{name}[/revision/{rev}]   model info: sha, siblings with size, blobId and lfs {sha256,…}
  HEAD/GET /{owner}/{name}/resolve/{rev}/{file}       small files: 200 with ETag (git blob sha1), X-Repo-Commit;
                                                      LFS files: 302 to the "CDN" with X-Linked-Etag (sha256),
                                                      X-Linked-Size, X-Repo-Commit
  GET  {cdn}/cdn/{sha256}                             the CDN: a second server on another port (another origin, so
                                                      the token must not reach it), with Range / 206 / 416
Errors carry the hub's X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo) and X-Error-Message.

`ChildHub` runs one in a process of its own (as a real hub is elsewhere: its sending does not compete with the
process being timed), serving `checkpoint_shaped_files`.

Faults (`inject`): "drop" closes the connection after byte `at` of a file, "stall" sends up to `at` and then
nothing for `seconds`, "corrupt" flips the byte at `at`, "status" answers `status` instead. Each applies to `times`
requests (-1: all). `throttle(bytes_per_s)` slows every file body to that rate (0: full speed) from its next chunk on,
so a download can be watched mid-way and then sped up. `bytes_sent(file)` counts body bytes sent; `hits` records
every request. Everything stops with `stop()` (or the context manager): stalls and throttled sends wake up, threads
are daemons, and nothing listens beyond loopback.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import subprocess
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".bin", ".safetensors", ".model", ".gguf", ".pt")
SEND_CHUNK = 64 << 10


@dataclass
class HostedFile:
    name: str
    data: bytes
    lfs: bool

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @cached_property
    def blob_id(self) -> str:
        return hashlib.sha1(f"blob {len(self.data)}\0".encode() + self.data).hexdigest()


@dataclass
class HostedRepo:
    repo_id: str
    files: dict[str, HostedFile]
    commit: str
    gated: bool = False


@dataclass
class Fault:
    kind: str  # "drop" | "stall" | "corrupt" | "status"
    file: str | None = None  # only requests for this file; None: every request
    at: int = 0  # byte offset within the file
    status: int = 500
    times: int = 1  # how many requests it spoils; -1: all
    seconds: float = 30.0  # the longest a stall lasts


@dataclass
class Hit:
    server: str  # "hub" | "cdn"
    method: str
    path: str
    status: int
    range: str | None
    authorized: bool
    file: str | None = None


@dataclass
class _State:
    token: str | None
    repos: dict[str, HostedRepo] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    sent: Counter[str] = field(default_factory=Counter)
    hits: list[Hit] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    cdn: str = ""
    rate: float = 0.0  # bytes per second for file bodies; 0: as fast as the socket takes them


class HubServer:
    def __init__(self, token: str | None = None) -> None:
        self.state = _State(token)
        self._hub = _server(self.state, "hub")
        self._cdn = _server(self.state, "cdn")
        self.state.cdn = f"http://127.0.0.1:{self._cdn.server_address[1]}"
        self._threads: list[threading.Thread] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._hub.server_address[1]}"

    def add_repo(self, repo_id: str, folder: Path, *, gated: bool = False) -> HostedRepo:
        """The files of `folder` (not its subfolders) as repository `repo_id`."""
        found = {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}
        return self.add_files(repo_id, found, gated=gated)

    def add_files(self, repo_id: str, contents: dict[str, bytes], *, gated: bool = False) -> HostedRepo:
        """Repository `repo_id` holding `contents` (name → bytes), e.g. made in memory."""
        files = {name: HostedFile(name, data, name.endswith(LFS_SUFFIXES)) for name, data in sorted(contents.items())}
        commit = hashlib.sha1(repo_id.encode() + b"".join(f.sha256.encode() for f in files.values())).hexdigest()
        repo = HostedRepo(repo_id, files, commit, gated)
        with self.state.lock:
            self.state.repos[repo_id] = repo
        return repo

    def inject(self, fault: Fault) -> Fault:
        with self.state.lock:
            self.state.faults.append(fault)
        return fault

    def throttle(self, bytes_per_s: float) -> None:
        with self.state.lock:
            self.state.rate = float(bytes_per_s)

    def clear_faults(self) -> None:
        with self.state.lock:
            self.state.faults.clear()

    def bytes_sent(self, file: str) -> int:
        with self.state.lock:
            return self.state.sent[file]

    @property
    def hits(self) -> list[Hit]:
        with self.state.lock:
            return list(self.state.hits)

    def start(self) -> HubServer:
        for srv in (self._hub, self._cdn):
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self.state.stop.set()
        for srv in (self._hub, self._cdn):
            srv.shutdown()
            srv.server_close()
        for t in self._threads:
            t.join(timeout=5)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _server(state: _State, role: str) -> ThreadingHTTPServer:
    handler = type(f"{role.title()}Handler", (_Handler,), {"state": state, "role": role})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    srv.block_on_close = False
    return srv


_API = re.compile(r"^/api/models/([^/]+/[^/]+?)(?:/revision/([^/]+))?/?$")
_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
_CDN = re.compile(r"^/cdn/([0-9a-f]{64})$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: _State
    role: str

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def do_HEAD(self) -> None:
        self._handle(body=False)

    def do_GET(self) -> None:
        self._handle(body=True)

    # ---------------------------------------------------------------------------------------------------------

    def _handle(self, body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        self._file: str | None = None
        try:
            if self.role == "cdn":
                self._cdn(path, body)
            elif m := _API.match(path):
                self._api(m.group(1), m.group(2) or "main")
            elif m := _RESOLVE.match(path):
                self._resolve(m.group(1), m.group(2), m.group(3), body)
            else:
                self._error(404, "NotFound", "no such endpoint")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _authorized(self) -> bool:
        token = self.state.token
        return token is not None and self.headers.get("authorization") == f"Bearer {token}"

    def _record(self, status: int) -> None:
        with self.state.lock:
            self.state.hits.append(
                Hit(
                    self.role,
                    self.command,
                    self.path,
                    status,
                    self.headers.get("range"),
                    self.headers.get("authorization") is not None,
                    self._file,
                )
            )

    def _take_fault(
        self, kinds: tuple[str, ...], file: str | None, span: tuple[int, int] | None = None
    ) -> Fault | None:
        """The first live fault of these kinds for this file (within the bytes of `span`), used up once."""
        with self.state.lock:
            for fault in self.state.faults:
                if fault.kind not in kinds or fault.times == 0 or fault.file not in (None, file):
                    continue
                if span is None or span[0] <= fault.at < span[1]:
                    if fault.times > 0:
                        fault.times -= 1
                    return fault
        return None

    def _status_fault(self, file: str | None) -> bool:
        fault = self._take_fault(("status",), file)
        if fault is None:
            return False
        self._error(fault.status, "", f"injected {fault.status}")
        return True

    def _error(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        payload = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
        self._record(status)

    def _repo(self, repo_id: str) -> HostedRepo | None:
        repo = self.state.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        if repo.gated and not self._authorized():
            if self.headers.get("authorization"):
                self._error(401, "", "Invalid credentials in Authorization header")
            else:
                msg = f"Access to model {repo_id} is restricted. You must be authenticated to access it."
                self._error(401, "GatedRepo", msg)
            return None
        return repo

    def _repo_at(self, repo_id: str, revision: str) -> HostedRepo | None:
        """The repository if it exists at `revision` ("main" or its commit); otherwise the error is sent."""
        repo = self._repo(repo_id)
        if repo is not None and revision not in ("main", repo.commit):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return repo

    def _api(self, repo_id: str, revision: str) -> None:
        if self._status_fault(None):
            return
        repo = self._repo_at(repo_id, revision)
        if repo is None:
            return
        siblings = []
        for f in repo.files.values():
            entry: dict[str, Any] = {"rfilename": f.name, "size": len(f.data), "blobId": f.blob_id}
            if f.lfs:
                entry["lfs"] = {"sha256": f.sha256, "size": len(f.data), "pointerSize": 134}
            siblings.append(entry)
        info = {
            "_id": repo.commit[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "sha": repo.commit,
            "private": False,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "tags": [],
            "siblings": siblings,
        }
        payload = json.dumps(info).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        self._record(200)

    def _resolve(self, repo_id: str, revision: str, name: str, body: bool) -> None:
        self._file = name
        if self._status_fault(name):
            return
        repo = self._repo_at(repo_id, revision)
        if repo is None:
            return
        f = repo.files.get(name)
        if f is None:
            self._error(404, "EntryNotFound", f"{name} does not exist", {"X-Repo-Commit": repo.commit})
            return
        if f.lfs:
            self.send_response(302)
            self.send_header("Location", f"{self.state.cdn}/cdn/{f.sha256}")
            self.send_header("X-Repo-Commit", repo.commit)
            self.send_header("X-Linked-Etag", f'"{f.sha256}"')
            self.send_header("X-Linked-Size", str(len(f.data)))
            self.send_header("ETag", f'"{f.sha256}"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            self._record(302)
            return
        self._send_file(f, body, {"X-Repo-Commit": repo.commit, "ETag": f'"{f.blob_id}"'})

    def _cdn(self, path: str, body: bool) -> None:
        m = _CDN.match(path)
        found = None
        if m:
            found = next(
                (f for r in self.state.repos.values() for f in r.files.values() if f.sha256 == m.group(1)), None
            )
        if found is None:
            self._error(404, "", "no such object")
            return
        self._file = found.name
        if self._status_fault(found.name):
            return
        self._send_file(found, body, {"ETag": f'"{found.sha256}"'})

    def _send_file(self, f: HostedFile, body: bool, headers: dict[str, str]) -> None:
        size = len(f.data)
        start, end, status = 0, size, 200
        wanted = self.headers.get("range")
        if wanted:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted.strip())
            if m is None or int(m.group(1)) >= size:
                self._error(416, "", "Range Not Satisfiable", {"Content-Range": f"bytes */{size}"})
                return
            start = int(m.group(1))
            end = min(size, int(m.group(2)) + 1) if m.group(2) else size
            status = 206
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        self._record(status)
        if not body:
            return
        fault = self._take_fault(("drop", "stall", "corrupt"), f.name, (start, end))
        data = f.data
        if fault is not None and fault.kind == "corrupt":
            spoiled = bytearray(data)
            spoiled[fault.at] ^= 0xFF
            data = bytes(spoiled)
        stop_at = fault.at if fault is not None and fault.kind in ("drop", "stall") else end
        self._write(f.name, data, start, stop_at)
        if stop_at < end:
            if fault is not None and fault.kind == "stall":
                self.state.stop.wait(fault.seconds)
            self.close_connection = True

    def _write(self, name: str, data: bytes, start: int, end: int) -> None:
        pos = start
        while pos < end:
            with self.state.lock:
                rate = self.state.rate
            step = SEND_CHUNK if rate <= 0 else max(1024, min(SEND_CHUNK, int(rate / 20)))
            chunk = data[pos : min(end, pos + step)]
            self.wfile.write(chunk)
            if rate > 0:
                self.wfile.flush()
            with self.state.lock:
                self.state.sent[name] += len(chunk)
            pos += len(chunk)
            if rate > 0 and self.state.stop.wait(len(chunk) / rate):
                break
        self.wfile.flush()


def point_hub_clients_at(server: HubServer, monkeypatch: Any, tmp_path: Path) -> None:
    """HF_ENDPOINT at `server`, conftest's offline mode lifted (also huggingface_hub's import-time copy), no token."""
    import huggingface_hub

    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))


def checkpoint_shaped_files(megabytes: int, shards: int = 3, seed: int = 7) -> dict[str, bytes]:
    """The files a pull downloads: a tiny model's config.json, a tokenizer stand-in and `megabytes` of random weight
    shards with their index. For timing a download only: a conversion would refuse the random shards."""
    from owl_desktop.devtools.tiny_checkpoint import hf_config_dict, preset_config

    rng = random.Random(seed)
    names = [f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin" for i in range(shards)]
    files = {name: rng.randbytes(megabytes * 2**20 // shards) for name in names}
    index = {"metadata": {"total_size": sum(map(len, files.values()))}, "weight_map": {}}
    files["pytorch_model.bin.index.json"] = json.dumps(index).encode()
    files["config.json"] = json.dumps(hf_config_dict(preset_config("tiny"))).encode()
    files["tokenizer.model"] = rng.randbytes(4096)
    return files


class ChildHub:
    """A HubServer on 127.0.0.1 in a child process, serving checkpoint_shaped_files(megabytes) as `repo_id`; it
    stops when the context ends (or when this process does: it serves until its stdin closes)."""

    def __init__(self, repo_id: str, megabytes: int) -> None:
        self.repo_id, self.megabytes = repo_id, megabytes
        self.endpoint = ""
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> ChildHub:
        cmd = [sys.executable, "-m", "owl_desktop.devtools.hubserver", self.repo_id, str(self.megabytes)]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout is not None
        self.endpoint = self._proc.stdout.readline().strip()
        if not self.endpoint.startswith("http://127.0.0.1:"):
            self.__exit__()
            raise RuntimeError("the local hub did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is None:
            return
        assert self._proc.stdin is not None
        self._proc.stdin.close()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None


def _serve_until_stdin_closes(repo_id: str, megabytes: int) -> None:
    server = HubServer()
    server.add_files(repo_id, checkpoint_shaped_files(megabytes))
    with server:
        print(server.endpoint, flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    _serve_until_stdin_closes(sys.argv[1], int(sys.argv[2]))
