"""Quantize a GGUF with llama.cpp's `llama_model_quantize`.

llama.cpp's bindings live in three modules only: engine/llm.py (inference), engine/llm_backends.py (which backend
modules load) and this sibling (quantization, used by the converter). Nothing else imports llama_cpp.

It runs in a child process (multiprocessing, spawn): the C call cannot be interrupted, and a failed GGML_ASSERT
inside it would abort the whole app. The child forwards llama.cpp's per-tensor log lines as progress and its
error lines as the failure reason; cancelling kills it. (A frozen app must call
`multiprocessing.freeze_support()` first thing in its entry point.)

llama.cpp memory-maps the input on Linux and Windows and unmaps each tensor once quantized, so the input's pages
do not pile up in RSS.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import re
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from owl_desktop.errors import ConversionError
from owl_desktop.tasks import Task

# llama.cpp's llama_ftype values (include/llama.h), the target of each quantization
FTYPES = {"Q8_0": 7, "Q4_K_M": 15, "Q5_K_M": 17}
# GGML log levels (ggml.h): 1 debug, 2 info, 3 warn, 4 error, 5 continuation
_LOG_ERROR = 4
_PROGRESS = re.compile(r"\[\s*(\d+)/\s*(\d+)\]")
_POLL_S = 0.1


@dataclass(frozen=True)
class _Message:
    kind: str  # "progress" | "error" | "done"
    a: int = 0
    b: int = 0
    text: str = ""


def quantize_gguf(src: Path, dst: Path, quant: str, *, task: Task, threads: int | None = None) -> None:
    """Quantize `src` (an F32/F16/BF16 GGUF) into `dst` as `quant`; raises ConversionError or Cancelled."""
    if quant not in FTYPES:
        raise ValueError(f"not a quantized type: {quant}")
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=_run_quantize,
        args=(str(src), str(dst), FTYPES[quant], threads or os.cpu_count() or 1, sender),
        name="owl-quantize",
        daemon=True,
    )
    proc.start()
    sender.close()
    errors: list[str] = []
    rc: int | None = None
    try:
        while rc is None:
            task.check()
            if not receiver.poll(_POLL_S):
                if not proc.is_alive() and not receiver.poll(0):
                    break
                continue
            try:
                msg: _Message = receiver.recv()
            except EOFError:
                break
            if msg.kind == "progress":
                task.report(f"quantizing to {quant}", msg.a, msg.b, "tensors")
            elif msg.kind == "error":
                errors.append(msg.text)
            elif msg.kind == "done":
                rc = msg.a
    except BaseException:
        proc.kill()
        proc.join()
        raise
    finally:
        receiver.close()
    proc.join()
    if rc != 0:
        reason = errors[-1] if errors else f"the quantizer exited with code {proc.exitcode}"
        raise ConversionError(f"quantizing to {quant} failed: {reason}")


def _run_quantize(src: str, dst: str, ftype: int, threads: int, conn: Connection) -> None:
    """Child process body: call llama_model_quantize, forwarding progress and errors through `conn`."""
    import llama_cpp

    from owl_desktop.engine.llm_backends import load_backends

    def on_log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        line = text.decode("utf-8", "replace")
        m = _PROGRESS.search(line)
        if m:
            conn.send(_Message("progress", int(m.group(1)), int(m.group(2))))
        elif level == _LOG_ERROR and line.strip():
            conn.send(_Message("error", text=line.strip()))

    callback = llama_cpp.llama_log_callback(on_log)  # kept alive for the whole call
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    # before llama_backend_init, whose own backend search would look in the current directory
    load_backends(gpu=False)
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    conn.send(_Message("done", int(rc)))
    conn.close()
