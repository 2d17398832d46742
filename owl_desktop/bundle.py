"""The model bundle: what conversion writes and the engine loads. The only module that reads bundle.json.

<bundle dir>/
  bundle.json          written last; format version, source, sha256 of each file, model config, prompt template,
                       model family and image plan (model_family.py); optionally the display name the user gave
                       it (rename(); without one, default_name())
  vision.safetensors   vision_model.*, abstractor.*, query_tokens (names as in the HF checkpoint)
  llm-<QUANT>.gguf     the LLaMA language model with its SentencePiece vocabulary
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from owl_desktop import paths
from owl_desktop.atomic import write_json_atomic
from owl_desktop.errors import BundleError
from owl_desktop.hashing import sha256_file
from owl_desktop.model_config import OwlConfig
from owl_desktop.model_family import MPLUG_OWL, UREADER, ImagePlan, default_plan
from owl_desktop.tasks import Task

FORMAT_VERSION = 2  # the newest this code reads; a bundle records the oldest format that describes it
_FIRST_FORMAT = {MPLUG_OWL: 1, UREADER: 2}  # format 2 added the family and its image plan
MANIFEST = "bundle.json"
VISION_FILE = "vision.safetensors"
QUANTS = ("F32", "F16", "Q8_0", "Q5_K_M", "Q4_K_M")
DEFAULT_QUANT = "Q4_K_M"
UNREADABLE = f"unreadable {MANIFEST}"  # the problem of a folder whose manifest cannot be parsed

DEFAULT_SYSTEM = (
    "The following is a conversation between a curious human and AI assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# UReader's benchmark prompt has no system text: "Human: <image>\nHuman: {q}\nAI: " (UReader/pipeline/evaluation.py)
UREADER_SYSTEM = ""


NAME_MAX = 80  # characters of a model's display name
_NAME_FORBIDDEN = {"Cc", "Cf", "Cs", "Zl", "Zp"}  # control, format (e.g. bidi overrides), surrogates, line breaks
_NAME_ALLOWED = {"\u200d"}  # the joiner inside emoji sequences


_BUNDLE_FILE = re.compile(r"^(bundle\.json|vision\.safetensors|llm-[A-Z0-9_]+\.gguf)$")


def llm_filename(quant: str) -> str:
    return f"llm-{quant}.gguf"


def sanitize_bundle_id(raw: str) -> str:
    """A folder-safe id: letters, digits, '.', '_' and '-' only, no leading dot, at most 80 characters."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip(".-")
    cleaned = re.sub(r"-{2,}", "-", cleaned)[:80].rstrip(".-")
    return cleaned or "model"


def check_name(raw: str) -> str:
    """A model's display name as typed, trimmed; BundleError says why when it cannot be one."""
    name = raw.strip()
    if not name:
        raise BundleError("a model's name cannot be empty")
    if len(name) > NAME_MAX:
        raise BundleError(f"a model's name can be at most {NAME_MAX} characters (this one has {len(name)})")
    if any(unicodedata.category(ch) in _NAME_FORBIDDEN and ch not in _NAME_ALLOWED for ch in name):
        raise BundleError("a model's name cannot contain control characters or line breaks")
    return name


def default_name(bundle_id: str, quant: str) -> str:
    """The name a bundle without one shows: its id without the quantization suffix, then the quantization."""
    base = bundle_id.removesuffix(f"-{quant.lower()}") or bundle_id
    return f"{base} · {quant}"


def _name_in(raw: dict[str, Any], bundle_id: str, quant: str) -> str:
    """The manifest's display name when it is a valid one (the file is untrusted), else the default."""
    value = raw.get("name")
    if isinstance(value, str):
        try:
            return check_name(value)
        except BundleError:
            pass
    return default_name(bundle_id, quant)


def is_bundle_file(name: str) -> bool:
    """Whether `name` is one of the files a bundle folder holds (manifest, vision weights, a GGUF)."""
    return _BUNDLE_FILE.match(name) is not None


@dataclass(frozen=True)
class PromptTemplate:
    """mPLUG-Owl's plain-text chat template; `<image>` lines are replaced by image rows."""

    system: str = DEFAULT_SYSTEM
    human: str = "Human: "
    ai: str = "AI: "
    image: str = "<image>"

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PromptTemplate:
        return cls(**{k: str(v) for k, v in raw.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class FileRecord:
    sha256: str
    size: int


@dataclass(frozen=True)
class Bundle:
    path: Path
    id: str
    quant: str
    config: OwlConfig
    prompt: PromptTemplate
    files: dict[str, FileRecord]
    source: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    family: str = MPLUG_OWL
    image_plan: ImagePlan = field(default_factory=ImagePlan)
    name: str = ""  # the display name (the manifest's, or default_name)

    @property
    def vision_path(self) -> Path:
        return self.path / VISION_FILE

    @property
    def llm_path(self) -> Path:
        return self.path / llm_filename(self.quant)

    @property
    def size(self) -> int:
        return sum(r.size for r in self.files.values())


def write_manifest(
    directory: Path,
    *,
    bundle_id: str,
    quant: str,
    config: OwlConfig,
    source: dict[str, Any],
    prompt: PromptTemplate | None = None,
    task: Task | None = None,
    family: str = MPLUG_OWL,
    image_plan: ImagePlan | None = None,
) -> Path:
    """Hash every payload file of `directory` and write bundle.json (the last file of a bundle)."""
    plan = image_plan or default_plan(family, config.vision.image_size)
    files = {}
    for name in (VISION_FILE, llm_filename(quant)):
        p = directory / name
        files[name] = {"sha256": sha256_file(p, task), "size": p.stat().st_size}
    manifest = {
        "format_version": _FIRST_FORMAT[family],
        "id": bundle_id,
        "quantization": quant,
        "source": source,
        "files": files,
        "config": config.to_dict(),
        "prompt": (prompt or default_prompt(family)).to_dict(),
        "family": family,
        "image_plan": plan.to_dict(),
    }
    out = directory / MANIFEST
    write_json_atomic(out, manifest)
    return out


def default_prompt(family: str) -> PromptTemplate:
    """The prompt a family's reference inference uses (mPLUG-Owl: its system line; UReader: none)."""
    return PromptTemplate(system=UREADER_SYSTEM) if family == UREADER else PromptTemplate()


def _family(raw: dict[str, Any], where: str) -> str:
    family = str(raw.get("family", MPLUG_OWL))
    if family not in _FIRST_FORMAT:
        raise BundleError(f"{where}: model family {family[:40]!r} is unknown to this owl-desktop")
    return family


def resolve(ref: str | Path) -> Path:
    """A bundle folder path, or the id of a bundle installed in the data dir."""
    p = Path(ref).expanduser()
    if (p / MANIFEST).is_file():
        return p
    installed = paths.models_dir() / str(ref)
    if (installed / MANIFEST).is_file():
        return installed
    if p.exists():
        raise BundleError(f"{p} is not a model bundle (no {MANIFEST}); convert a checkpoint with `owl-desktop convert`")
    raise BundleError(f"no model bundle '{ref}': not a folder, and not installed in {paths.models_dir()}")


def load(ref: str | Path, *, verify: bool | None = None, task: Task | None = None) -> Bundle:
    """Read a bundle's manifest and check its files.

    Sizes are always checked. Hashes are checked when `verify` is True, or, when `verify` is None, the first
    time this exact set of files (path, size, mtime) is loaded on this machine.
    """
    root = resolve(ref)
    bundle = _parse_manifest(root)
    for name, rec in bundle.files.items():
        p = root / name
        if p.is_symlink():
            raise BundleError(f"bundle {bundle.id}: {name} is a link; a bundle holds plain files")
        if not p.is_file():
            raise BundleError(f"bundle {bundle.id}: file {name} is missing; delete the bundle and convert again")
        if p.stat().st_size != rec.size:
            raise BundleError(f"bundle {bundle.id}: file {name} has the wrong size (corrupted or incomplete)")
    stamp = _stamp(bundle)
    if verify or (verify is None and stamp not in _verified_stamps()):
        verify_hashes(bundle, task)
        _remember_verified(stamp)
    return bundle


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _parse_manifest(root: Path) -> Bundle:
    """bundle.json, treated as untrusted input: every field checked before any path is built from it."""
    where = f"bundle {root.name}"
    try:
        raw = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise BundleError(f"{where}: {MANIFEST} is not a JSON object")
        if int(raw.get("format_version", -1)) > FORMAT_VERSION:
            raise BundleError(
                f"{where} has format {raw['format_version']}; this owl-desktop reads up to {FORMAT_VERSION}"
            )
        bundle_id, quant = str(raw["id"]), str(raw["quantization"])
        if sanitize_bundle_id(bundle_id) != bundle_id:
            raise BundleError(f"{where}: its id {bundle_id[:80]!r} is not a plain name; refused")
        if quant not in QUANTS:
            raise BundleError(f"{where}: unknown quantization {quant[:20]!r} (known: {', '.join(QUANTS)})")
        files: dict[str, FileRecord] = {}
        for name, rec in dict(raw["files"]).items():
            name = str(name)
            if not is_bundle_file(name) or name == MANIFEST:
                raise BundleError(f"{where}: {MANIFEST} names a file {name[:80]!r} that no bundle holds; refused")
            sha, size = str(rec["sha256"]).lower(), int(rec["size"])
            if not _SHA256.match(sha) or size < 0:
                raise BundleError(f"{where}: the record of {name} is malformed")
            files[name] = FileRecord(sha, size)
        if set(files) != {VISION_FILE, llm_filename(quant)}:
            raise BundleError(f"{where}: {MANIFEST} must list {VISION_FILE} and {llm_filename(quant)}, and only them")
        source = raw.get("source", {})
        config = OwlConfig.from_dict({"model_type": "mplug-owl", **raw["config"]})
        family = _family(raw, where)
        plan = (
            ImagePlan.from_dict(raw["image_plan"])
            if "image_plan" in raw
            else default_plan(family, config.vision.image_size)
        )
        if plan.crops != (family == UREADER):
            raise BundleError(f"{where}: its image plan does not fit the {family} model family")
        return Bundle(
            path=root,
            id=bundle_id,
            quant=quant,
            config=config,
            prompt=PromptTemplate.from_dict(raw.get("prompt", {})),
            files=files,
            source=dict(source) if isinstance(source, dict) else {},
            format_version=int(raw["format_version"]),
            family=family,
            image_plan=plan,
            name=_name_in(raw, bundle_id, quant),
        )
    except BundleError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BundleError(f"{where}: unreadable {MANIFEST} ({exc})") from exc


def rename(folder: Path, name: str) -> str:
    """Give the bundle in `folder` a new display name, stored in its manifest whole or not at all (the id, the
    folder and every other field stay as they are); returns the name as stored."""
    name = check_name(name)
    _parse_manifest(folder)  # a manifest this code reads, or BundleError
    manifest = folder / MANIFEST
    try:
        raw = json.loads(manifest.read_text(encoding="utf-8"))
        raw["name"] = name
        write_json_atomic(manifest, raw)
    except (OSError, ValueError) as exc:
        raise BundleError(f"could not rename {folder.name}: {exc}") from exc
    return name


def mark_verified(bundle: Bundle) -> None:
    """Record that this exact set of files was hashed and matched (e.g. while being copied in), so the first load
    does not hash them again."""
    _remember_verified(_stamp(bundle))


def verify_hashes(bundle: Bundle, task: Task | None = None) -> None:
    for name, rec in bundle.files.items():
        if sha256_file(bundle.path / name, task) != rec.sha256:
            raise BundleError(f"bundle {bundle.id}: file {name} is corrupted (sha256 mismatch); convert it again")


def _stamp(bundle: Bundle) -> str:
    parts = [str(bundle.path.resolve())]
    for name in sorted(bundle.files):
        st = (bundle.path / name).stat()
        parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}:{bundle.files[name].sha256}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def _verified_file() -> Path:
    return paths.cache_dir() / "verified-bundles.json"


def _verified_stamps() -> set[str]:
    try:
        return set(json.loads(_verified_file().read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return set()


def _remember_verified(stamp: str) -> None:
    stamps = _verified_stamps() | {stamp}
    try:
        write_json_atomic(_verified_file(), sorted(stamps), indent=None)
    except OSError:
        pass  # a read-only cache only costs a re-hash next time


# ---------------------------------------------------------------------------------------------------- listing


@dataclass(frozen=True)
class InstalledModel:
    """A bundle folder as its manifest describes it; listing reads manifests and sizes only, hashes nothing."""

    id: str
    path: Path
    quant: str
    size: int  # bytes of the bundle's payload files
    source: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None  # None: every file is present with its recorded size
    name: str = ""  # the display name (the manifest's, or default_name)

    @property
    def ok(self) -> bool:
        return self.problem is None

    @property
    def source_repo(self) -> str | None:
        """The hub repository it was converted from, when known."""
        repo = self.source.get("repo")
        return repo if isinstance(repo, str) else None

    @property
    def revision(self) -> str | None:
        """The commit it was converted from, when known."""
        rev = self.source.get("revision")
        return rev if isinstance(rev, str) else None


def describe(folder: Path) -> InstalledModel | None:
    """The bundle in `folder`, or None when there is none (no bundle.json)."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return None
    try:
        raw = json.loads(manifest.read_text(encoding="utf-8"))
        files = {str(k): int(v["size"]) for k, v in raw["files"].items()}
        source = raw.get("source") or {}
        if not isinstance(source, dict):
            source = {}
        bundle_id, quant = str(raw["id"]), str(raw["quantization"])
        shown_as = _name_in(raw, bundle_id, quant)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return InstalledModel(folder.name, folder, "?", 0, {}, UNREADABLE, folder.name)
    problem = None
    for name, size in files.items():
        p = folder / name
        if not p.is_file():
            problem = f"{name} is missing"
            break
        if p.stat().st_size != size:
            problem = f"{name} has the wrong size"
            break
    return InstalledModel(bundle_id, folder, quant, sum(files.values()), dict(source), problem, shown_as)


def scan(models_dir: Path | None = None) -> list[InstalledModel]:
    """Every bundle folder in the models folder (the data dir's by default), broken ones included, by folder name."""
    models_dir = models_dir or paths.models_dir()
    try:
        folders = sorted(p for p in models_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []
    found = (describe(p) for p in folders)
    return [m for m in found if m is not None]
