"""What a hub repository holds: its commit, and the checkpoint files to fetch with their sizes and hashes.

Uses `HfApi.model_info(..., files_metadata=True)` (the hub's /api/models/{repo}/revision/{rev}): the commit sha the
revision resolves to, and per file its size, git blob id and, for LFS files, the sha256 of the content.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from owl_desktop.errors import DownloadError
from owl_desktop.hub.retry import RetryPolicy, with_retries
from owl_desktop.hub.settings import HubSettings
from owl_desktop.tasks import Task

REQUIRED = ("config.json", "tokenizer.model")
SIDE_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "generation_config.json",
)
_SHARD = {
    "pytorch_model.bin.index.json": re.compile(r"^pytorch_model-\d+-of-\d+\.bin$"),
    "model.safetensors.index.json": re.compile(r"^model-\d+-of-\d+\.safetensors$"),
}
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int
    sha256: str | None = None  # LFS files: the sha256 of the content
    blob_id: str | None = None  # regular files: the git blob sha1

    @property
    def lfs(self) -> bool:
        return self.sha256 is not None


@dataclass(frozen=True)
class RepoPlan:
    """The files of one repository at one commit that a pull fetches."""

    repo_id: str
    revision: str  # as asked ("main", a tag or a sha)
    commit: str  # the sha it resolved to
    files: tuple[RemoteFile, ...]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, name: str) -> RemoteFile:
        for f in self.files:
            if f.name == name:
                return f
        raise KeyError(name)


def check_repo_id(repo_id: str) -> str:
    repo_id = repo_id.strip()
    if not _REPO_ID.match(repo_id) or ".." in repo_id:
        raise DownloadError(f"'{repo_id}' is not a hub repository id; use the form owner/name")
    return repo_id


def select_files(repo_id: str, names: Iterable[str]) -> list[str]:
    """The files of an mPLUG-Owl checkpoint among a repository's files (safetensors preferred over pickles)."""
    available = set(names)
    missing = [n for n in REQUIRED if n not in available]
    if missing:
        raise DownloadError(f"{repo_id} is not an mPLUG-Owl checkpoint: it has no {' or '.join(missing)}")
    weights = _weights(available)
    if not weights:
        raise DownloadError(f"{repo_id} has no weights in a format owl-desktop reads (.bin or .safetensors)")
    return [*REQUIRED, *(n for n in SIDE_FILES if n in available), *weights]


def _weights(available: set[str]) -> list[str]:
    for single, index in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if single in available:
            return [single]
        shards = sorted(n for n in available if _SHARD[index].match(n))
        if index in available and shards:
            return [index, *shards]
    return []


def fetch_plan(repo_id: str, revision: str, settings: HubSettings, policy: RetryPolicy, task: Task) -> RepoPlan:
    """Ask the hub what `repo_id` at `revision` holds, and pick the checkpoint files."""
    from huggingface_hub import HfApi

    repo_id = check_repo_id(repo_id)
    settings.require_online(f"download {repo_id}")
    api = HfApi(endpoint=settings.endpoint, token=settings.token or False)
    task.report(f"asking {settings.endpoint} about {repo_id}", 0, None)
    info = with_retries(
        lambda: api.model_info(repo_id, revision=revision, files_metadata=True, timeout=policy.connect_timeout),
        settings=settings,
        repo_id=repo_id,
        filename=None,
        policy=policy,
        task=task,
    )
    siblings = {s.rfilename: s for s in (info.siblings or [])}
    files = []
    for name in select_files(repo_id, siblings):
        s = siblings[name]
        sha256 = s.lfs.sha256 if s.lfs is not None else None
        size = s.lfs.size if s.lfs is not None else s.size
        if size is None:
            raise DownloadError(f"{settings.endpoint} gave no size for {name} of {repo_id}; is HF_ENDPOINT a full hub?")
        files.append(RemoteFile(name, int(size), sha256, s.blob_id))
    if not info.sha:
        raise DownloadError(f"{settings.endpoint} gave no commit for {repo_id}; is HF_ENDPOINT a full hub?")
    return RepoPlan(repo_id, revision, info.sha, tuple(files))


class ContentHash:
    """The hash a file is checked against: sha256 for LFS files, git's blob sha1 for the others."""

    def __init__(self, file: RemoteFile) -> None:
        if file.sha256:
            self.algorithm, self.expected = "sha256", file.sha256.lower()
        elif file.blob_id:
            self.algorithm, self.expected = "git-sha1", file.blob_id.lower()
        else:
            raise DownloadError(f"the hub gave no hash for {file.name}, so it cannot be verified; not downloading it")
        self.size = file.size

    def new(self) -> Any:
        if self.algorithm == "sha256":
            return hashlib.sha256()
        h = hashlib.sha1()
        h.update(f"blob {self.size}\0".encode())
        return h


def fetch_small_file(plan: RepoPlan, name: str, settings: HubSettings, policy: RetryPolicy, task: Task) -> bytes:
    """A small file (config.json) into memory, checked against its hash; nothing is written to disk."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    remote = plan.file(name)
    url = hf_hub_url(plan.repo_id, name, revision=plan.commit, endpoint=settings.endpoint)

    def get() -> bytes:
        response = get_session().get(
            url, headers=build_hf_headers(token=settings.token or False), timeout=policy.connect_timeout
        )
        hf_raise_for_status(response)
        return response.content

    data = with_retries(get, settings=settings, repo_id=plan.repo_id, filename=name, policy=policy, task=task)
    digest = ContentHash(remote)
    h = digest.new()
    h.update(data)
    if len(data) != remote.size or h.hexdigest() != digest.expected:
        raise DownloadError(f"{name} of {plan.repo_id} arrived damaged (its hash does not match the hub's)")
    return data
