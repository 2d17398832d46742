"""The SentencePiece tokenizer (tokenizer.model) as a GGUF vocabulary: pieces, scores and token types.

tokenizer.model is a serialized `sentencepiece.ModelProto`. Its pieces carry the type (normal, unknown, control,
user-defined, unused, byte) that the `sentencepiece` Python API only half exposes, so the few fields we need are
read straight from the protobuf wire format (no protobuf dependency), then cross-checked against
`SentencePieceProcessor` so that a file it cannot load is refused.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

import sentencepiece

from owl_desktop.errors import CheckpointError

PAD_SCORE = -1000.0


class TokenType(IntEnum):
    """SentencePiece piece types; GGUF's `tokenizer.ggml.token_type` uses the same numbers."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


@dataclass(frozen=True)
class Piece:
    text: str
    score: float
    type: TokenType


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]
    bos_id: int
    eos_id: int
    unk_id: int
    pad_id: int | None
    add_space_prefix: bool
    notes: list[str] = field(default_factory=list)  # ways llama.cpp may tokenize differently from SentencePiece

    def __len__(self) -> int:
        return len(self.tokens)


# ---------------------------------------------------------------------------------------------------------------
# protobuf wire format: just enough to walk ModelProto


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> list[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of one message; length-delimited values come as bytes."""
    out: list[tuple[int, int, int | bytes]] = []
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            if pos + n > len(buf):
                raise ValueError("truncated field")
            value, pos = buf[pos : pos + n], pos + n
        elif wire == 5:
            value, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        out.append((number, wire, value))
    return out


def _parse_piece(msg: bytes) -> Piece:
    text, score, kind = "", 0.0, TokenType.NORMAL
    for number, wire, value in _fields(msg):
        if number == 1 and wire == 2:
            text = bytes(value).decode("utf-8")  # type: ignore[arg-type]
        elif number == 2 and wire == 5:
            score = struct.unpack("<f", struct.pack("<I", value))[0]
        elif number == 3 and wire == 0:
            kind = TokenType(int(value))  # type: ignore[arg-type]
    return Piece(text, score, kind)


@dataclass(frozen=True)
class _Normalizer:
    name: str = ""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True


def _parse_normalizer(msg: bytes) -> _Normalizer:
    name, dummy, extra = "", True, True
    for number, wire, value in _fields(msg):
        if number == 1 and wire == 2:
            name = bytes(value).decode("utf-8", "replace")  # type: ignore[arg-type]
        elif number == 3 and wire == 0:
            dummy = bool(value)
        elif number == 4 and wire == 0:
            extra = bool(value)
    return _Normalizer(name, dummy, extra)


def _parse_model_type(msg: bytes) -> int:
    for number, wire, value in _fields(msg):
        if number == 3 and wire == 0:
            return int(value)  # type: ignore[arg-type]
    return 1  # UNIGRAM, the proto default


def read_pieces(path: Path) -> tuple[list[Piece], _Normalizer, int]:
    """Pieces, normalizer settings and model type (1 unigram, 2 BPE) of a SentencePiece model file."""
    try:
        buf = path.read_bytes()
        pieces: list[Piece] = []
        normalizer, model_type = _Normalizer(), 1
        for number, wire, value in _fields(buf):
            if wire != 2:
                continue
            if number == 1:
                pieces.append(_parse_piece(bytes(value)))  # type: ignore[arg-type]
            elif number == 2:
                model_type = _parse_model_type(bytes(value))  # type: ignore[arg-type]
            elif number == 3:
                normalizer = _parse_normalizer(bytes(value))  # type: ignore[arg-type]
    except (OSError, ValueError, UnicodeDecodeError, struct.error) as exc:
        raise CheckpointError(f"{path.name} is not a valid SentencePiece model ({exc})") from exc
    if not pieces:
        raise CheckpointError(f"{path.name} is not a valid SentencePiece model (no pieces)")
    return pieces, normalizer, model_type


# ---------------------------------------------------------------------------------------------------------------


def load_vocab(tokenizer_path: Path, vocab_size: int) -> Vocab:
    """The GGUF vocabulary of `tokenizer_path`, padded to the model's `vocab_size` rows."""
    pieces, normalizer, model_type = read_pieces(tokenizer_path)
    sp = _load_processor(tokenizer_path)
    if sp.get_piece_size() != len(pieces):
        raise CheckpointError(f"{tokenizer_path.name}: SentencePiece reads {sp.get_piece_size()} pieces")
    if len(pieces) > vocab_size:
        raise CheckpointError(
            f"{tokenizer_path.name} has {len(pieces)} pieces but the language model has only {vocab_size} "
            "token rows: the tokenizer belongs to another model"
        )
    tokens = [p.text for p in pieces]
    scores = [p.score for p in pieces]
    types = [int(p.type) for p in pieces]
    _apply_added_tokens(tokenizer_path.parent / "added_tokens.json", tokens, scores, types, vocab_size)
    for i in range(len(tokens), vocab_size):  # rows the embedding has beyond the tokenizer
        tokens.append(f"[PAD{i}]")
        scores.append(PAD_SCORE)
        types.append(int(TokenType.UNUSED))
    notes = _differences_from_llama_cpp(normalizer, model_type)
    return Vocab(
        tokens=tokens,
        scores=scores,
        types=types,
        bos_id=sp.bos_id(),
        eos_id=sp.eos_id(),
        unk_id=sp.unk_id(),
        pad_id=sp.pad_id() if sp.pad_id() >= 0 else None,
        add_space_prefix=normalizer.add_dummy_prefix,
        notes=notes,
    )


def _load_processor(path: Path) -> sentencepiece.SentencePieceProcessor:
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"{path.name} is not a valid SentencePiece model ({exc})") from exc
    return sp


def _apply_added_tokens(path: Path, tokens: list[str], scores: list[float], types: list[int], vocab_size: int) -> None:
    """HF `added_tokens.json` ({text: id}): extra user-defined tokens after (or over) the SentencePiece pieces."""
    if not path.is_file():
        return
    try:
        added = json.loads(path.read_text(encoding="utf-8"))
        items = sorted((int(i), str(t)) for t, i in added.items())
    except (OSError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path.name} is not valid ({exc})") from exc
    for token_id, text in items:
        if token_id >= vocab_size:
            raise CheckpointError(
                f"{path.name}: token {text!r} has id {token_id}, beyond the vocabulary ({vocab_size})"
            )
        while len(tokens) <= token_id:
            tokens.append(f"[PAD{len(tokens)}]")
            scores.append(PAD_SCORE)
            types.append(int(TokenType.UNUSED))
        tokens[token_id], scores[token_id], types[token_id] = text, PAD_SCORE, int(TokenType.USER_DEFINED)


def _differences_from_llama_cpp(normalizer: _Normalizer, model_type: int) -> list[str]:
    notes = []
    if model_type != 2:
        notes.append("the tokenizer is not a BPE SentencePiece model; llama.cpp may split some words differently")
    if normalizer.name not in ("identity", ""):
        notes.append(f"the tokenizer normalizes text ({normalizer.name}); llama.cpp does not")
    if normalizer.remove_extra_whitespaces:
        notes.append("the tokenizer collapses repeated spaces; llama.cpp keeps them")
    return notes
