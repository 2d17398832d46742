"""The language model in llama.cpp. llama.cpp's bindings live in three modules only: this one (inference), its
sibling llm_backends.py (which backend modules load) and llm_quantize.py (quantization); nothing else imports
llama_cpp.

A prompt is an ordered list of segments, token ids or embedding rows (65 per image). A batch holds tokens or
embeddings, never both: what a prefill decodes goes in as token ids when it is all text, and otherwise all as
embedding rows, its text looked up in the GGUF's token table (gguf_file.py), so text and images share batches;
chunked to n_batch (a bigger batch aborts the process). Every KV position is keyed by its token id or by (image
hash, row), so a follow-up turn only prefills what changed. Generation streams UTF-8-safe text pieces and stops
within one token on cancel.

When a prompt would overwrite a long stretch of the cache (another conversation: the window and an API client taking
turns, or a chat the user switches back to), the sequence's KV state is first copied to host memory; a later prompt
that matches a saved prefix better than the live cache gets it copied back instead of prefilled again. The copies
are bounded in bytes (LlmSettings.prefix_cache_mb) and dropped oldest first.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp as L
import numpy as np

from owl_desktop.engine.gguf_file import TokenTable, open_reader, read_architecture
from owl_desktop.engine.llm_backends import GpuDevice, LlamaBackends, device_memory, load_backends
from owl_desktop.engine.options import (
    FLASH_ATTN_IDS,
    KV_TYPE_IDS,
    KV_TYPE_WITHOUT_FLASH_ATTN,
    KV_TYPES_NEEDING_FLASH_ATTN,
    LlmSettings,
    Sampling,
    attention_on,
    kv_type_problem,
)
from owl_desktop.errors import Cancelled, EngineError, PromptError
from owl_desktop.logs import see_the_log
from owl_desktop.tasks import CancelToken


@dataclass(frozen=True)
class Tokens:
    ids: Sequence[int]


@dataclass(frozen=True)
class Embeddings:
    rows: np.ndarray  # [n, n_embd] float32
    key: str  # identity of the rows (image sha256 + bundle id): KV reuse matches (key, row)


Segment = Tokens | Embeddings

MIN_PREFIX_GAIN = 64  # positions a saved prefix must win (or a prompt must overwrite) to be worth a state copy
MAX_SAVED_PREFIXES = 4
MIN_SHIFT = 16  # positions a stretch must have to be moved up in the cache (a shorter match may be chance)


@dataclass(eq=False)
class _SavedPrefix:
    keys: list[Any]  # the identity of each position the state holds
    state: np.ndarray  # [nbytes] uint8, from llama_state_seq_get_data
    nbytes: int


def _bytes_ptr(buf: np.ndarray) -> Any:
    return buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))


def common_prefix(a: Sequence[Any], b: Sequence[Any], b_start: int = 0) -> int:
    """How many items `a` and `b[b_start:]` share from their starts."""
    n, limit = 0, min(len(a), len(b) - b_start)
    while n < limit and a[n] == b[b_start + n]:
        n += 1
    return n


@dataclass
class GenerationStats:
    prompt_positions: int = 0  # positions in the context after prefill
    reused_positions: int = 0  # of those, kept from the previous call
    shifted_positions: int = 0  # of the reused, moved up over positions the prompt left out (prefill's shift_within)
    prefill_ms: float = 0.0
    time_to_first_token_ms: float = 0.0
    decode_tokens: int = 0
    decode_ms: float = 0.0
    stop_reason: str = ""  # "eos" | "length" | "cancelled" | "context"
    seed: int = 0
    token_ids: list[int] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / (self.decode_ms / 1000) if self.decode_ms > 0 else 0.0

    @property
    def context_used(self) -> int:
        return self.prompt_positions + self.decode_tokens


_LOG_LEVEL_WARN = 3
_LOG_LEVEL_ERROR = 4
_LOG_LEVEL_CONT = 5
_log_lines: list[str] = []
_llama_log = logging.getLogger("owl_desktop.llama_cpp")


def _on_log(level: int, text: bytes, _user: Any) -> None:
    # ggml levels: 1 debug, 2 info, 3 warn, 4 error, 5 continuation. Warnings and errors go to the app's log; the
    # last errors are kept for our messages.
    if level in (_LOG_LEVEL_WARN, _LOG_LEVEL_ERROR) and text:
        line = text.decode("utf-8", "replace").strip()
        if line:
            _llama_log.log(logging.ERROR if level == _LOG_LEVEL_ERROR else logging.WARNING, "%s", line)
    if level >= _LOG_LEVEL_ERROR and level != _LOG_LEVEL_CONT and text:
        _log_lines.append(text.decode("utf-8", "replace").strip())
        del _log_lines[:-20]


_NO_ABORT = L.ggml_abort_callback()  # a NULL callback: no per-node Python call while tokens are generated
_LOG_CALLBACK = L.llama_log_callback(_on_log)  # module-level: a collected ctypes callback would dangle
_backend_lock = threading.Lock()
_backends: LlamaBackends | None = None


def backends() -> LlamaBackends:
    """The CPU variant and GPU backend llama.cpp runs on in this process; loads them on the first call.

    Our build loads each backend as a module, and llama-cpp-python loads none: they must be in place before
    llama_backend_init, whose own fallback would search only the current directory and the executable's folder.
    """
    global _backends
    with _backend_lock:
        # every time: llama-cpp-python's own Llama class (the bench baseline) installs its logger process-wide
        L.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
        if _backends is None:
            loaded = load_backends()  # after the logger: backend loading logs through it too
            _log_lines.clear()  # a GPU module without its driver is no error of the model loaded later
            L.llama_backend_init()
            _backends = loaded
        return _backends


def _last_error() -> str:
    return _log_lines[-1] if _log_lines else see_the_log()


def physical_cores() -> int:
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except Exception:  # noqa: BLE001 - psutil is optional here; fall back to the logical count
        n = None
    return max(1, n or os.cpu_count() or 1)


class _StopText:
    """Holds back streamed text that could be the start of a stop string, and cuts the answer where one appears."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [t for t in stops if t]
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """The text that can be shown now, and whether a stop string was reached (the answer ends before it)."""
        if not self.stops:
            return piece, False
        text = self.pending + piece
        cut = min((i for i in (text.find(t) for t in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.pending = ""
            return text[:cut].rstrip(), True
        hold = max((n for t in self.stops for n in range(1, len(t)) if text.endswith(t[:n])), default=0)
        self.pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class LlamaEngine:
    """One llama.cpp model + context, used by one thread at a time."""

    def __init__(self, path: Path, settings: LlmSettings | None = None) -> None:
        self.settings = settings or LlmSettings()
        s = self.settings
        path = Path(path)
        reader = open_reader(path)
        arch = read_architecture(reader, path.name)
        if arch != "llama":
            raise EngineError(f"{path.name} holds a '{arch}' model; mPLUG-Owl needs a LLaMA GGUF")
        self.backends = backends()
        self.gpu: GpuDevice | None = self.backends.gpu if s.n_gpu_layers != 0 else None
        self.gpu_error = ""  # why the model runs on the CPU although a GPU was there
        self.model = self._load_model(path)
        if not self.model and self.gpu is not None:  # e.g. too little GPU memory: the CPU still answers
            self.gpu_error = _last_error()
            self.gpu = None
            self.model = self._load_model(path)
        if not self.model:
            raise EngineError(f"llama.cpp could not load {path.name}: {_last_error()}")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = int(L.llama_vocab_n_tokens(self.vocab))
        self.n_embd = int(L.llama_model_n_embd_inp(self.model))
        self.eos = int(L.llama_vocab_eos(self.vocab))
        self.bos = int(L.llama_vocab_bos(self.vocab))

        threads = s.n_threads or physical_cores()
        self.threads = threads
        cp = L.llama_context_default_params()
        cp.n_ctx = s.n_ctx
        cp.n_batch = s.n_batch
        cp.n_ubatch = s.n_batch
        cp.n_seq_max = 1
        cp.n_threads = threads
        cp.n_threads_batch = threads
        cp.embeddings = False
        cp.no_perf = True
        if s.flash_attn not in FLASH_ATTN_IDS:
            raise EngineError(f"flash attention must be one of {', '.join(FLASH_ATTN_IDS)}, not '{s.flash_attn}'")
        if s.kv_type not in KV_TYPE_IDS:
            raise EngineError(f"KV cache type must be one of {', '.join(KV_TYPE_IDS)}, not '{s.kv_type}'")
        if problem := kv_type_problem(s.kv_type, s.flash_attn):
            raise EngineError(problem)
        backend = self.gpu.backend if self.gpu else None
        flash_attn, kv_type = attention_on(backend, s.flash_attn, s.kv_type)
        if (flash_attn, kv_type) != (s.flash_attn, s.kv_type):
            _llama_log.info("flash attention off on %s: context cache in %s", backend, kv_type)
        cp.flash_attn_type = FLASH_ATTN_IDS[flash_attn]
        cp.type_k = cp.type_v = KV_TYPE_IDS[kv_type]
        # Cancel: each generate() gets its own token (a Stop that came before it started is never cleared away).
        # llama.cpp calls the abort callback at every graph node (~1,000 Python calls per token at 7B), so it is set
        # only while a prefill runs; between generated tokens the loop itself checks the token.
        self._cancel = CancelToken()
        self._holding = False  # a decode that must not be aborted (see _prefill)
        self._abort_cb = L.ggml_abort_callback(lambda _data: self._cancel.cancelled and not self._holding)
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx and flash_attn == "auto" and kv_type in KV_TYPES_NEEDING_FLASH_ATTN:
            # "auto" found no flash attention for this device, and a quantized V cache needs it: the larger cache
            # still runs (the settings dialog offers the same fallback)
            _llama_log.warning("no flash attention here: context cache in %s", KV_TYPE_WITHOUT_FLASH_ATTN)
            cp.type_k = cp.type_v = KV_TYPE_IDS[KV_TYPE_WITHOUT_FLASH_ATTN]
            self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            L.llama_model_free(self.model)
            raise EngineError(f"llama.cpp could not create a context ({s.n_ctx} positions): {_last_error()}")
        self.mem = L.llama_get_memory(self.ctx)
        table = TokenTable.open(reader)
        self._table = table if table is not None and table.n_embd == self.n_embd else None
        del reader  # the table keeps only its own tensor's mapping
        self.n_ctx = int(L.llama_n_ctx(self.ctx))
        self.n_batch = int(L.llama_n_batch(self.ctx))
        self._tbatch = L.llama_batch_init(self.n_batch, 0, 1)
        self._ebatch = L.llama_batch_init(self.n_batch, self.n_embd, 1)
        self._keys: list[Any] = []  # identity of each KV position: token id or (key, row)
        self.last_shifted = 0  # positions the last prefill moved up over a gap (prefill's shift_within)
        self._saved: list[_SavedPrefix] = []  # oldest first
        self._saved_cap = max(0, s.prefix_cache_mb) * 1024 * 1024
        self._lock = threading.Lock()
        self._piece_buf = ctypes.create_string_buffer(256)
        self._wordlike_mask: np.ndarray | None = None
        self._closed = False

    def _load_model(self, path: Path) -> Any:
        mp = L.llama_model_default_params()
        # AMX weight buffers die with SIGILL where the CPU code has AMX kernels that the kernel does not enable
        # (a -march=native build on our virtual machines). Our dispatching build never loads such a variant.
        mp.use_extra_bufts = self.settings.repack and not self.backends.amx_trap
        mmap = self.settings.use_mmap
        if mmap is None:  # mapped unless repacked: the mapping would stay resident beside the repacked copy
            mmap = not (mp.use_extra_bufts and self.gpu is None and "AVX2" in self.backends.cpu_features)
        mp.load_mode = L.LLAMA_LOAD_MODE_MMAP if mmap else L.LLAMA_LOAD_MODE_NONE  # (no use_mmap)
        no_devices = (ctypes.c_void_p * 1)()  # an empty NULL-terminated device list; outlives the load call
        if self.gpu is None:
            mp.n_gpu_layers = 0
            mp.devices = ctypes.cast(no_devices, ctypes.c_void_p)  # no GPU at all, not even for large batches
        else:
            mp.n_gpu_layers = self.settings.n_gpu_layers
        return L.llama_model_load_from_file(str(path).encode(), mp)

    @property
    def mixes_batches(self) -> bool:
        """Whether text and images share batches (the GGUF's token table could be read; see gguf_file.py)."""
        return self._table is not None

    @property
    def gpu_offload(self) -> bool:
        return self.gpu is not None

    @property
    def device(self) -> str:
        """Where the model runs, e.g. "CPU zen4" or "Vulkan: NVIDIA GeForce RTX 4070"."""
        if self.gpu is not None:
            return f"{self.gpu.backend}: {self.gpu.description}"
        return f"CPU {self.backends.cpu_variant}"

    # ---------------------------------------------------------------- vocabulary

    def tokenize(self, text: str, add_bos: bool = False) -> list[int]:
        """SentencePiece ids of `text`, as the reference tokenizer gives them for one chunk (no special parsing)."""
        data = text.encode("utf-8")
        n = len(data) + 8
        buf = (L.llama_token * n)()
        k = L.llama_tokenize(self.vocab, data, len(data), buf, n, add_bos, False)
        if k < 0:
            n = -k
            buf = (L.llama_token * n)()
            k = L.llama_tokenize(self.vocab, data, len(data), buf, n, add_bos, False)
        return list(buf[:k])

    def token_bytes(self, token: int) -> bytes:
        n = L.llama_token_to_piece(self.vocab, token, self._piece_buf, len(self._piece_buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            return buf.raw[:n]
        return self._piece_buf.raw[:n]

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of a run of generated ids (leading space of the first piece removed, as SentencePiece does)."""
        text = b"".join(self.token_bytes(t) for t in ids).decode("utf-8", "replace")
        return text[1:] if text.startswith(" ") else text

    # ---------------------------------------------------------------- decoding

    def _check_decode(self, rc: int) -> None:
        if rc == 0:
            return
        self._resync_keys()
        if rc == 2:
            raise Cancelled()
        if rc == 1:
            raise PromptError("the context is full: no room left in the KV cache")
        raise EngineError(f"llama_decode failed (code {rc}): {_last_error()}")

    def _fill(self, batch: Any, i: int, pos: int, logits: bool) -> None:
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = 1 if logits else 0

    def _decode_tokens(self, ids: Sequence[int], pos: int, logits_last: bool, keys: Sequence[Any]) -> int:
        """Decode `ids` from `pos` in batches; `keys` (theirs) join `_keys` batch by batch as each is in the cache."""
        b = self._tbatch
        for off in range(0, len(ids), self.n_batch):
            self._check_between()
            chunk = ids[off : off + self.n_batch]
            b.n_tokens = len(chunk)
            for i, t in enumerate(chunk):
                b.token[i] = int(t)
                self._fill(b, i, pos + off + i, logits_last and off + i == len(ids) - 1)
            self._check_decode(L.llama_decode(self.ctx, b))
            self._keys.extend(keys[off : off + len(chunk)])
        return pos + len(ids)

    def _decode_embeddings(self, rows: np.ndarray, pos: int, logits_last: bool, keys: Sequence[Any]) -> int:
        rows = np.ascontiguousarray(rows, dtype=np.float32)  # [n, n_embd]; no size check exists on the C side
        if rows.ndim != 2 or rows.shape[1] != self.n_embd:
            raise EngineError(f"image embeddings have shape {tuple(rows.shape)}; the model needs [n, {self.n_embd}]")
        b = self._ebatch
        for off in range(0, len(rows), self.n_batch):
            self._check_between()
            chunk = rows[off : off + self.n_batch]
            b.n_tokens = len(chunk)
            ctypes.memmove(b.embd, chunk.ctypes.data, chunk.nbytes)  # copy: never repoint b.embd
            for i in range(len(chunk)):
                self._fill(b, i, pos + off + i, logits_last and off + i == len(rows) - 1)
            self._check_decode(L.llama_decode(self.ctx, b))
            self._keys.extend(keys[off : off + len(chunk)])
        return pos + len(rows)

    def _resync_keys(self) -> None:
        """After an abort or error, keep only the keys of positions the KV cache really holds."""
        kept = int(L.llama_memory_seq_pos_max(self.mem, 0)) + 1
        del self._keys[max(0, kept) :]

    @staticmethod
    def positions(segments: Sequence[Segment]) -> list[Any]:
        """The identity of each KV position of `segments`: token id or (embeddings key, row)."""
        keys: list[Any] = []
        for seg in segments:
            if isinstance(seg, Tokens):
                keys.extend(int(t) for t in seg.ids)
            else:
                keys.extend((seg.key, r) for r in range(len(seg.rows)))
        return keys

    def prefill(
        self, segments: Sequence[Segment], cancel: CancelToken | None = None, shift_within: int = 0
    ) -> tuple[int, int]:
        """Bring the KV cache to exactly `segments`, reusing the longest matching prefix.

        With `shift_within` > 0: where the cache holds more than the prompt between the common prefix and a later
        stretch of at least MIN_SHIFT positions that the prompt continues with (old turns the prompt now leaves
        out), those positions are removed and the stretch moved up (llama.cpp's position shift) instead of being
        computed again, as far as the prompt's first `shift_within` positions (its history: never the question).
        The moved positions keep what they had attended to, so the answer is no longer exactly that of a cold
        prefill of `segments`: for a conversation that outgrew the context, where that is what keeps turns fast.

        Returns (positions, reused positions). Logits of the last position are ready afterwards. Raises Cancelled
        within one graph node once `cancel` (or `cancel()`) fires.
        """
        if cancel is not None:
            self._cancel = cancel
        self._cancel.raise_if_cancelled()
        self._set_abort(True)
        try:
            return self._prefill(segments, shift_within=shift_within)
        finally:
            self._set_abort(False)

    def _set_abort(self, on: bool) -> None:
        """llama.cpp's per-node abort callback, for a prefill on the CPU. A graph aborted half-way on a GPU backend
        can crash (seen with Vulkan); there a prefill stops between its batches instead (see _check_between)."""
        if self.gpu is None:
            L.llama_set_abort_callback(self.ctx, self._abort_cb if on else _NO_ABORT, None)

    def _check_between(self) -> None:
        if self.gpu is not None and self._cancel.cancelled and not self._holding:
            self._resync_keys()
            raise Cancelled()

    def prefill_ahead(self, segments: Sequence[Segment], cancel: CancelToken, shift_within: int = 0) -> tuple[int, int]:
        """Work ahead: make the KV cache start with `segments` (a prompt's known beginning), keeping what follows;
        `shift_within` as for prefill.

        Returns (positions, of which already there). Nothing is decoded when the cache already holds them all.
        Raises Cancelled within one graph node once `cancel` fires; what was decoded by then stays usable.
        """
        keys = self.positions(segments)
        with self._lock:
            held = common_prefix(keys, self._keys)
            self.last_shifted = 0
            if held == len(keys) or not keys:
                return len(keys), held
            self._cancel = cancel
            self._cancel.raise_if_cancelled()
            self._set_abort(True)
            try:
                return self._prefill(segments, keep_last=True, shift_within=shift_within)
            finally:
                self._set_abort(False)
                self._cancel = CancelToken()  # a later prefill() without a token must not inherit this one

    def _prefill(self, segments: Sequence[Segment], keep_last: bool = False, shift_within: int = 0) -> tuple[int, int]:
        keys = self.positions(segments)
        if not keys:
            raise PromptError("empty prompt")
        if len(keys) >= self.n_ctx:
            raise PromptError(f"the prompt needs {len(keys)} positions; the context holds {self.n_ctx}")
        n_keep = common_prefix(keys, self._keys)
        moved = self.last_shifted = self._close_gap(keys, n_keep, shift_within) if shift_within else 0
        if moved:
            # The moved keys are turned inside the next llama_decode, all layers or none: so re-decode the last
            # moved position at once, alone and not to be aborted (an abort half-way would leave some layers
            # turned and the shift still pending; so would a saved state copied before it).
            n_keep += moved - 1
        else:
            n_keep = self._switch_prefix(keys, n_keep)
        if not keep_last:
            n_keep = min(n_keep, len(keys) - 1)  # re-decode at least one position for fresh logits
        if not L.llama_memory_seq_rm(self.mem, 0, n_keep, -1):
            L.llama_memory_clear(self.mem, True)
            n_keep = 0
        del self._keys[n_keep:]
        parts: list[tuple[int, list[int] | np.ndarray]] = []  # (position, token ids or rows) still to decode
        pos = 0
        for seg in segments:
            n = len(seg.ids) if isinstance(seg, Tokens) else len(seg.rows)
            if pos + n > n_keep:
                start = max(0, n_keep - pos)  # part of this segment may already be in the cache
                parts.append((pos + start, list(seg.ids)[start:] if isinstance(seg, Tokens) else seg.rows[start:]))
            pos += n
        if self._table is not None and len(parts) > 1 and any(isinstance(p, np.ndarray) for _, p in parts):
            # text and images in the same batches: all as embedding rows (see the module's docstring)
            rows = [p if isinstance(p, np.ndarray) else self._table.rows(p) for _, p in parts]
            parts = [(parts[0][0], np.concatenate(rows))]
        if moved:
            at, part = parts[0]
            parts[0:1] = [(at, part[:1]), (at + 1, part[1:])] if len(part) > 1 else [(at, part)]
        for index, (at, part) in enumerate(parts):
            self._holding = index == 0 and moved > 0
            try:
                last = at + len(part) == len(keys)
                if isinstance(part, np.ndarray):
                    self._decode_embeddings(part, at, last, keys[at : at + len(part)])
                else:
                    self._decode_tokens(part, at, last, keys[at : at + len(part)])
            finally:
                self._holding = False
        return len(keys), n_keep

    def _close_gap(self, keys: list[Any], n: int, within: int) -> int:
        """Where the cache, after the `n` positions it shares with `keys`, holds a stretch that `keys` leaves out and
        then one of at least MIN_SHIFT positions that `keys` continues with (up to its position `within`): remove
        the first, move the second up. Returns the positions moved."""
        if n + MIN_SHIFT > min(within, len(keys)) or not L.llama_memory_can_shift(self.mem):
            return 0
        rest, first = keys[n:within], keys[n]
        gap, shared, start = 0, 0, n + 1
        while start < len(self._keys) - shared:
            if self._keys[start] == first and (m := common_prefix(rest, self._keys, start)) > shared:
                gap, shared = start - n, m
            start += 1
        if shared < MIN_SHIFT or not L.llama_memory_seq_rm(self.mem, 0, n, n + gap):
            return 0
        L.llama_memory_seq_add(self.mem, 0, n + gap, -1, -gap)  # RoPE turns the moved keys at the next decode
        del self._keys[n : n + gap]
        return shared

    # ---------------------------------------------------------------- saved prefixes

    def _switch_prefix(self, keys: list[Any], n_keep: int) -> int:
        """Before a prompt that keeps `n_keep` positions: save the live state if much of it would be overwritten,
        restore a saved one that matches `keys` much better. Returns the positions now reusable."""
        if not self._saved_cap:
            return n_keep
        best, best_n = None, n_keep
        for saved in self._saved:
            m = common_prefix(keys, saved.keys)
            if m > best_n:
                best, best_n = saved, m
        if len(self._keys) - n_keep >= MIN_PREFIX_GAIN:
            self._save_live()  # this conversation may come back
        if best is not None and best_n - n_keep >= MIN_PREFIX_GAIN and any(p is best for p in self._saved):
            return best_n if self._restore(best) else 0
        return n_keep

    def _save_live(self) -> None:
        """Copy the live sequence's KV state to host memory (superseding saved prefixes of it)."""
        if not self._keys:
            return
        size = int(L.llama_state_seq_get_size(self.ctx, 0))
        if size <= 0 or size > self._saved_cap:
            return
        # np.empty, not a ctypes array: ctypes zero-fills its arrays holding the GIL, and at 7B a state is hundreds
        # of MB (0.3 s during which the window could not run); these pages are first touched by the copy below, which
        # runs without the GIL
        buf = np.empty(size, dtype=np.uint8)
        written = int(L.llama_state_seq_get_data(self.ctx, _bytes_ptr(buf), size, 0))
        if written <= 0:
            return
        live = self._keys
        self._saved = [p for p in self._saved if common_prefix(p.keys, live) < len(p.keys)]
        self._saved.append(_SavedPrefix(list(live), buf, written))
        while len(self._saved) > MAX_SAVED_PREFIXES or sum(p.nbytes for p in self._saved) > self._saved_cap:
            self._saved.pop(0)

    def _restore(self, saved: _SavedPrefix) -> bool:
        """Make a saved state the live one; on failure the cache is empty (and False returned)."""
        self._saved.remove(saved)  # live again: saved anew when it is overwritten
        L.llama_memory_seq_rm(self.mem, 0, -1, -1)
        if int(L.llama_state_seq_set_data(self.ctx, _bytes_ptr(saved.state), saved.nbytes, 0)) == 0:
            L.llama_memory_clear(self.mem, True)
            self._keys = []
            return False
        self._keys = list(saved.keys)
        return True

    def last_logits(self) -> np.ndarray:
        ptr = L.llama_get_logits_ith(self.ctx, -1)
        if not ptr:
            raise EngineError("no logits available: decode a prompt first")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    # ---------------------------------------------------------------- generation

    def _make_sampler(self, s: Sampling, seed: int) -> Any:
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        if s.greedy or s.temperature <= 0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
            return chain
        penalised = s.repeat_penalty != 1.0 or s.frequency_penalty != 0.0 or s.presence_penalty != 0.0
        if penalised and s.repeat_last_n != 0:
            penalties = L.llama_sampler_init_penalties(
                self.n_vocab, s.repeat_last_n, s.repeat_penalty, s.frequency_penalty, s.presence_penalty
            )
            L.llama_sampler_chain_add(chain, penalties)
        if s.top_k > 0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(s.top_k))
        if s.top_p < 1.0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(s.top_p, 1))
        if s.min_p > 0.0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_min_p(s.min_p, 1))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(s.temperature))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(seed))
        return chain

    def _wordlike(self) -> np.ndarray:
        """[n_vocab] bool: whether a token's text holds a letter (a word or part of one)."""
        if self._wordlike_mask is None:
            self._wordlike_mask = np.array(
                [any(ch.isalpha() for ch in self.token_bytes(t).decode("utf-8", "ignore")) for t in range(self.n_vocab)]
            )
        return self._wordlike_mask

    def _ban_repeated_ngrams(self, generated: Sequence[int], n: int) -> None:
        """Set to -inf the logit of every word token that would complete an n-gram already generated.

        Only tokens with a letter are banned: LLaMA writes numbers digit by digit, so banning repeated digit pairs
        (or punctuation and spaces) would make "100 … 200" or "$12.50 … $1.20" impossible to write. Loops of words,
        what the ban is for, are still stopped.
        """
        if n <= 0 or len(generated) < n - 1:
            return
        prefix = tuple(generated[len(generated) - (n - 1) :]) if n > 1 else ()
        wordlike = self._wordlike()
        banned = {
            generated[i + n - 1]
            for i in range(len(generated) - n + 1)
            if tuple(generated[i : i + n - 1]) == prefix and wordlike[generated[i + n - 1]]
        }
        if not banned:
            return
        ptr = L.llama_get_logits_ith(self.ctx, -1)
        for t in banned:
            ptr[t] = float("-inf")

    def generate(
        self,
        segments: Sequence[Segment],
        sampling: Sampling | None = None,
        stats: GenerationStats | None = None,
        cancel: CancelToken | None = None,
        stop_texts: Sequence[str] = (),
        shift_within: int = 0,
    ) -> Iterator[str]:
        """Prefill `segments` (`shift_within` as for prefill) and stream the answer as text pieces; fills `stats` as
        it goes.

        Stop with `cancel` (or `cancel()` from any thread): the stream ends within one token, and a long prefill is
        aborted. A token fired before the call began stops it at once. The answer also ends where its text reaches
        one of `stop_texts` (e.g. the template's next "Human:" turn), which is not streamed.
        """
        s = sampling or Sampling()
        st = stats if stats is not None else GenerationStats()
        token = cancel or CancelToken()
        with self._lock:
            self._cancel = token
            t0 = time.perf_counter()
            try:
                st.prompt_positions, st.reused_positions = self.prefill(segments, token, shift_within)
                st.shifted_positions = self.last_shifted
            except Cancelled:
                st.stop_reason = "cancelled"
                return
            st.prefill_ms = (time.perf_counter() - t0) * 1000
            st.seed = s.resolved_seed()
            chain = self._make_sampler(s, st.seed)
            decoder = codecs.getincrementaldecoder("utf-8")("replace")
            stops = _StopText(stop_texts)
            pos = st.prompt_positions
            at_start = True
            t_dec = time.perf_counter()
            try:
                while True:
                    if token.cancelled:
                        st.stop_reason = "cancelled"
                        break
                    if len(st.token_ids) >= s.max_new_tokens:
                        st.stop_reason = "length"
                        break
                    if pos >= self.n_ctx:
                        st.stop_reason = "context"
                        break
                    if not s.greedy:
                        self._ban_repeated_ngrams(st.token_ids, s.no_repeat_ngram)
                    tok = int(L.llama_sampler_sample(chain, self.ctx, -1))
                    if L.llama_vocab_is_eog(self.vocab, tok):
                        st.stop_reason = "eos"
                        break
                    st.token_ids.append(tok)
                    if not st.time_to_first_token_ms:
                        st.time_to_first_token_ms = (time.perf_counter() - t0) * 1000
                    piece = decoder.decode(self.token_bytes(tok))
                    if at_start and piece:
                        piece = piece[1:] if piece.startswith(" ") else piece
                        at_start = not piece
                    piece, hit = stops.feed(piece)
                    if piece:
                        yield piece
                    if hit:
                        st.stop_reason = "stop"
                        break
                    if len(st.token_ids) >= s.max_new_tokens or token.cancelled:
                        continue  # no need to decode a token nobody will read past
                    try:
                        pos = self._decode_tokens([tok], pos, True, [tok])
                    except Cancelled:
                        st.stop_reason = "cancelled"
                        break
                    st.decode_tokens = len(st.token_ids)
                tail, _hit = stops.feed(decoder.decode(b"", final=True))
                tail += stops.flush() if st.stop_reason != "stop" else ""
                if tail:
                    yield tail
            finally:
                st.decode_tokens = len(st.token_ids)
                st.decode_ms = (time.perf_counter() - t_dec) * 1000
                L.llama_sampler_free(chain)

    def cancel(self) -> None:
        """Stop the current prefill or generation (thread-safe)."""
        self._cancel.cancel()

    def reset(self) -> None:
        """Forget the KV cache and the saved prefixes (the next prompt is prefilled from scratch)."""
        with self._lock:
            L.llama_memory_clear(self.mem, True)
            self._keys.clear()
            self._saved.clear()
            self.last_shifted = 0

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._table = None  # its mapping of the file goes with it
        L.llama_batch_free(self._tbatch)
        L.llama_batch_free(self._ebatch)
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)

    def __enter__(self) -> LlamaEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def reference_decode_rate(
    path: Path,
    ids: Sequence[int],
    n: int,
    *,
    n_ctx: int,
    n_batch: int,
    threads: int,
    n_gpu_layers: int,
    flash_attn: str,
) -> float:
    """Greedy decode tokens/s of llama-cpp-python's own `Llama` class on `path`: the baseline `bench engine`
    holds our engine against (same GGUF, threads, context and sampling)."""
    llm = L.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=n_batch,
        n_threads=threads,
        n_threads_batch=threads,
        n_gpu_layers=n_gpu_layers,
        flash_attn={"on": True, "off": False}.get(flash_attn, None),
        verbose=False,
    )
    try:
        count = 0
        t0 = 0.0
        for _tok in llm.generate(list(ids), top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            count += 1
            if count == 1:
                t0 = time.perf_counter()  # the first token came from the prefill
            if count > n:
                break
        return (count - 1) / (time.perf_counter() - t0)
    finally:
        llm.close()


def gpu_offload_supported() -> bool:
    """Whether this build has a GPU backend with a device to offload layers to."""
    return backends().gpu is not None


@dataclass(frozen=True)
class GpuMemory:
    name: str  # e.g. "NVIDIA GeForce RTX 4070"
    backend: str  # e.g. "Vulkan"
    total: int  # bytes
    free: int  # bytes, now


def offload_gpu_memory() -> GpuMemory | None:
    """The memory of the GPU llama.cpp offloads layers to (None: this build runs on the CPU only), as its backend
    reports it (CUDA's own count, or Vulkan's device heaps): the device that matters, whichever backend drives it."""
    gpu = backends().gpu
    if gpu is None:
        return None
    total = gpu.memory_mib << 20
    free, total = device_memory(gpu.name) or (total, total)
    return GpuMemory(gpu.description, gpu.backend, total, free)
