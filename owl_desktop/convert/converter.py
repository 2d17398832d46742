"""HF mPLUG-Owl (or UReader) checkpoint → model bundle, atomically.

    convert_checkpoint(src, out, quant="Q4_K_M", lora=None, task=None, bundle_id=None) -> out

1. open and validate the checkpoint (config, tokenizer, every tensor's name and shape) and the LoRA adapter;
2. check the target and the free space (bundle + intermediate GGUF, estimated from the tensor sizes);
3. in a temporary folder next to the target (same file system): vision.safetensors, the language model GGUF
   (F32/F16 directly; for Q8_0/Q5_K_M/Q4_K_M a BF16 or F16 GGUF first, then llama.cpp's quantizer), and
   bundle.json last, with the model family the checkpoint's tensors reveal and that family's image plan;
4. rename the folder into place. Any failure or cancel removes the temporary folder: no half bundle is left.

Target rule: `out` may be missing, an empty folder, or a bundle with the same id made only of bundle files
(it is then replaced, the old one removed only after the new one is in place). Anything else is refused.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch

from owl_desktop import __version__
from owl_desktop import bundle as bundle_mod
from owl_desktop.bundle import QUANTS, VISION_FILE, llm_filename, sanitize_bundle_id, write_manifest
from owl_desktop.convert.checkpoint import Checkpoint, open_checkpoint
from owl_desktop.convert.gguf_export import write_llm_gguf
from owl_desktop.convert.lora import LoraAdapter, load_adapter
from owl_desktop.convert.vision_export import export_vision
from owl_desktop.convert.vocab import Vocab, load_vocab
from owl_desktop.engine.llm_quantize import quantize_gguf
from owl_desktop.errors import ConversionError
from owl_desktop.tasks import Task

log = logging.getLogger(__name__)

# Bits per weight of each bundle quantization, rounded up (small models fall back to wider types on odd shapes).
BITS_PER_WEIGHT = {"F32": 32.0, "F16": 16.0, "Q8_0": 8.5, "Q5_K_M": 6.5, "Q4_K_M": 5.5}
_SPACE_MARGIN = 1.05
_SPACE_SLACK = 32 << 20
_WORK_TAG = ".converting-"
_OLD_TAG = ".replaced-"

FreeSpaceProbe = Callable[[Path], int]


def convert_checkpoint(
    src: Path,
    out: Path,
    *,
    quant: str = "Q4_K_M",
    lora: Path | None = None,
    task: Task | None = None,
    bundle_id: str | None = None,
    free_space: FreeSpaceProbe | None = None,
    threads: int | None = None,
    source_info: dict[str, Any] | None = None,
) -> Path:
    """Convert the checkpoint folder `src` into the bundle folder `out`; returns `out`.

    `free_space` reports the free bytes of a folder (default: shutil.disk_usage); `source_info` adds to the
    manifest's source record (e.g. the hub repo and revision a downloader knows).
    """
    task = task or Task()
    quant = quant.upper()
    if quant not in QUANTS:
        raise ConversionError(f"unknown quantization {quant}; choose one of {', '.join(QUANTS)}")
    src = Path(src).expanduser()
    out = Path(out).expanduser().absolute()
    task.report("reading checkpoint", 0, None)
    with open_checkpoint(src) as ckpt:
        vocab = load_vocab(ckpt.tokenizer_path, ckpt.config.text.vocab_size)
        for note in vocab.notes:
            log.warning("%s", note)
        adapter = load_adapter(lora, ckpt.layout.llm) if lora is not None else None
        source = {**describe_source(ckpt.path), **(source_info or {})}
        bundle_id = sanitize_bundle_id(bundle_id or default_bundle_id(source, quant))
        replacing = check_target(out, bundle_id)
        check_free_space(out.parent, estimate_bytes(ckpt, quant), free_space or _disk_free)
        work = _make_work_dir(out)
        try:
            _write_bundle(ckpt, work, bundle_id, quant=quant, vocab=vocab, adapter=adapter, task=task, threads=threads)
            ckpt.close()  # unmap the source before the (long) hashing
            source.update(format=ckpt.format, converter=f"owl-desktop {__version__}")
            if adapter is not None:
                source["lora"] = adapter.summary()
            write_manifest(
                work, bundle_id=bundle_id, quant=quant, config=ckpt.config, source=source, task=task, family=ckpt.family
            )
            task.check()
            task.report("installing bundle", 0, None)
            _install(work, out, replacing)
        except OSError as exc:
            error = disk_error(exc, out.parent)  # before the cleanup frees the space
            shutil.rmtree(work, ignore_errors=True)
            raise error from exc
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    return out


def _write_bundle(
    ckpt: Checkpoint,
    work: Path,
    name: str,
    *,
    quant: str,
    vocab: Vocab,
    adapter: LoraAdapter | None,
    task: Task,
    threads: int | None,
) -> None:
    export_vision(ckpt, work / VISION_FILE, dtype=torch.float32 if quant == "F32" else torch.float16, task=task)
    final = work / llm_filename(quant)
    if quant in ("F32", "F16"):
        write_llm_gguf(ckpt, final, outtype=quant, vocab=vocab, name=name, lora=adapter, task=task)
        return
    inter_type = intermediate_type(ckpt, adapter)
    intermediate = work / f"llm-intermediate-{inter_type}.gguf"
    write_llm_gguf(
        ckpt, intermediate, outtype=inter_type, vocab=vocab, name=name, lora=adapter, task=task,
        stage=f"writing {inter_type} language model",
    )  # fmt: skip
    quantize_gguf(intermediate, final, quant, task=task, threads=threads)
    intermediate.unlink()


def intermediate_type(ckpt: Checkpoint, adapter: LoraAdapter | None) -> str:
    """The GGUF type written before quantizing: BF16 keeps bf16 weights bit-exact; a merged LoRA update (or a
    non-bf16 source) is not bf16-exact, and F16's finer mantissa keeps more of it."""
    return "BF16" if ckpt.llm_dtype == torch.bfloat16 and adapter is None else "F16"


# -----------------------------------------------------------------------------------------------------------------
# identity and provenance


def describe_source(path: Path) -> dict[str, Any]:
    """The source record of the manifest: its path, and the hub repo + revision for a hub cache snapshot."""
    resolved = path.resolve()
    info: dict[str, Any] = {"path": str(resolved)}
    parts = resolved.parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        info["repo"] = parts[-3].removeprefix("models--").replace("--", "/")
        info["revision"] = parts[-1]
    return info


def default_bundle_id(source: dict[str, Any], quant: str) -> str:
    base = str(source.get("repo", "")).split("/")[-1] or Path(str(source["path"])).name
    return f"{base}-{quant.lower()}"


# -----------------------------------------------------------------------------------------------------------------
# preflight


def check_target(out: Path, bundle_id: str) -> bool:
    """Whether `out` is an existing bundle to replace; raises if `out` may not be written at all."""
    if not out.exists():
        if out.is_symlink():
            raise ConversionError(f"{out} is a broken link; choose another output folder")
        return False
    if not out.is_dir():
        raise ConversionError(f"{out} exists and is not a folder; choose another output folder")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return False
    existing_id = _bundle_id_of(out)
    if existing_id is None:
        raise ConversionError(f"{out} already exists and is not empty; choose another output folder")
    if existing_id != bundle_id:
        raise ConversionError(f"{out} holds another model bundle ('{existing_id}'); choose another output folder")
    foreign = [e for e in entries if not bundle_mod.is_bundle_file(e)]
    if foreign:
        raise ConversionError(f"{out} holds bundle '{bundle_id}' but also {foreign[0]}; move it away to replace it")
    return True


def _bundle_id_of(folder: Path) -> str | None:
    found = bundle_mod.describe(folder)
    return found.id if found is not None and found.problem != bundle_mod.UNREADABLE else None


def estimate_bytes(ckpt: Checkpoint, quant: str) -> int:
    """Peak disk use of a conversion: the bundle plus, for quantized types, the intermediate GGUF."""
    vision_params = sum(ckpt.tensors[n].numel for n in ckpt.layout.vision)
    llm_params = sum(ckpt.tensors["language_model." + n].numel for n in ckpt.layout.llm)
    vision = vision_params * (4 if quant == "F32" else 2)
    vocab = ckpt.config.text.vocab_size * 64  # token strings, scores and types in the GGUF metadata
    final = int(llm_params * BITS_PER_WEIGHT[quant] / 8) + vocab
    intermediate = 0 if quant in ("F32", "F16") else llm_params * 2 + vocab
    return int((vision + final + intermediate) * _SPACE_MARGIN) + _SPACE_SLACK


def check_free_space(folder: Path, needed: int, probe: FreeSpaceProbe) -> None:
    where = _existing_ancestor(folder)
    try:
        free = probe(where)
    except OSError as exc:
        raise disk_error(exc, folder) from exc
    if free < needed:
        raise ConversionError(
            f"not enough disk space in {where}: the conversion needs about {_gib(needed)}, {_gib(free)} is free"
        )


def _disk_free(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def _existing_ancestor(folder: Path) -> Path:
    p = folder
    while not p.exists() and p.parent != p:
        p = p.parent
    return p


def _nearly_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(_existing_ancestor(folder)).free < _SPACE_SLACK
    except OSError:
        return False


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 28 else f"{n / (1 << 20):.1f} MiB"


# -----------------------------------------------------------------------------------------------------------------
# the temporary folder and the final rename


def _make_work_dir(out: Path) -> Path:
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_work_dirs(out)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}{_WORK_TAG}{os.getpid()}-", dir=parent))
    except OSError as exc:
        raise disk_error(exc, parent) from exc


def _remove_stale_work_dirs(out: Path) -> None:
    """Temporary folders left by a conversion that was killed (its process is gone)."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}({re.escape(_WORK_TAG)}|{re.escape(_OLD_TAG)})(\d+)-")
    for entry in out.parent.iterdir():
        m = pattern.match(entry.name)
        if m and entry.is_dir() and not psutil.pid_exists(int(m.group(2))):
            shutil.rmtree(entry, ignore_errors=True)


def _install(work: Path, out: Path, replacing: bool) -> None:
    if not replacing:
        if out.is_dir():
            out.rmdir()  # empty, checked before
        os.rename(work, out)
        return
    old = out.parent / f".{out.name}{_OLD_TAG}{os.getpid()}-{os.urandom(4).hex()}"
    os.rename(out, old)
    try:
        os.rename(work, out)
    except OSError:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def disk_error(exc: OSError, where: Path) -> ConversionError:
    """A one-line message for an OSError met while writing under `where`."""
    code = exc.errno
    if code is None and _nearly_full(where):
        code = errno.ENOSPC  # numpy's tofile reports a short write without errno
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return ConversionError(f"not enough disk space in {where}")
    if code == errno.EROFS:
        return ConversionError(f"cannot write to {where} (read-only file system)")
    if code in (errno.EACCES, errno.EPERM):
        return ConversionError(f"cannot write to {where} (permission denied)")
    if code in (errno.ENOTDIR, errno.EEXIST):
        return ConversionError(f"cannot write to {where}: part of that path is a file, not a folder")
    return ConversionError(f"cannot write to {where}: {exc.strerror or exc}")
