"""What the engine reads from a GGUF file itself, beside llama.cpp: its architecture (checked before a load) and rows
of its token embedding table. The only module that reads GGUF files (convert/gguf_export.py writes them).

Why the token rows: llama.cpp's batch holds token ids or embedding rows, never both, and on the CPU a batch costs a
fixed part (every weight read once) plus a part per started group of 16 positions. A prompt with an image in it
therefore goes in as embedding rows throughout, its text looked up here exactly as llama.cpp's get_rows would
(the same float32 arithmetic on the same quantized rows: bit-identical), so text and image share batches.
Measured on the 7B shape with 2 threads: 65 image rows and a 28-token question take 2.30 s + 1.18 s as two batches,
2.69 s as one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import gguf
import numpy as np

from owl_desktop.errors import EngineError

TOKEN_TABLE = "token_embd.weight"


def open_reader(path: Path) -> gguf.GGUFReader:
    """The file's metadata and a read-only mapping of its tensors (a clear error for a foreign or broken file)."""
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError) as exc:
        raise EngineError(f"{path.name} is not a readable GGUF file ({exc})") from exc


def read_architecture(reader: gguf.GGUFReader, name: str) -> str:
    """`general.architecture` of the file called `name`: checked before llama.cpp loads it."""
    try:
        field_ = reader.fields["general.architecture"]
    except KeyError as exc:
        raise EngineError(f"{name} has no architecture: not a language model GGUF") from exc
    return bytes(field_.parts[field_.data[0]]).decode("utf-8")


class TokenTable:
    """Rows of a GGUF's token embedding table as float32, read from the file's pages (shared with llama.cpp's own
    mapping: only the rows looked up are ever read)."""

    def __init__(self, reader: gguf.GGUFReader) -> None:
        tensors = [t for t in reader.tensors if t.name == TOKEN_TABLE]
        if not tensors:
            raise EngineError("the model file has no token embedding table")
        self._data = tensors[0].data  # [n_vocab, bytes per row] for quantized types, [n_vocab, n_embd] otherwise
        self._type = tensors[0].tensor_type
        self.n_vocab = int(self._data.shape[0])
        self.n_embd = int(tensors[0].shape[0])

    @classmethod
    def open(cls, reader: gguf.GGUFReader) -> TokenTable | None:
        """The table, or None where the file has none this reader can expand (the engine then sends token ids)."""
        try:
            table = cls(reader)
            table.rows([0])
        except (EngineError, NotImplementedError):
            return None
        return table

    def rows(self, ids: Sequence[int]) -> np.ndarray:
        """[len(ids), n_embd] float32: the embeddings llama.cpp looks up for these token ids."""
        index = np.asarray(ids, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= self.n_vocab):
            raise EngineError(f"a token id is outside the vocabulary of {self.n_vocab}")
        out = gguf.quants.dequantize(np.asarray(self._data[index]), self._type)
        return np.ascontiguousarray(out.reshape(len(index), self.n_embd), dtype=np.float32)
