"""Tiny checkpoints whose answers are scripted token by token: a deterministic bigram machine in LLaMA's shape.

The tiny random checkpoint is edited before conversion so that the next token depends only on the current one:

- every layer's attention and MLP output projections (o_proj, down_proj) are zero, so the residual stream at a
  position is just the embedding of its token;
- each scripted token t gets its own dimension ("slot") s(t): embed[t] = e_s(t); every other token shares slot 0;
- the final RMSNorm weight is 1, so the last hidden state is 16·e_s (hidden size 256);
- lm_head[next] has +BIG on the slot of each token it follows, and EOS has -BIG on every other slot.

So `successors = {"1": "0", "0": "1"}, default = "1"` answers "101010…" to any prompt, under greedy decoding and
under any sampling that keeps the top token (its logit leads every other by 16·BIG). Pieces are SentencePiece
pieces of the tiny tokenizer ("▁the", "<0x0A>", "</s>" for EOS).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import sentencepiece as spm
import torch

from owl_desktop.convert.converter import convert_checkpoint
from owl_desktop.devtools.tiny_checkpoint import EOS, make_checkpoint

BIG = 10.0  # logit lead of the scripted token: 16 (the normalised hidden value) × BIG


class Vocab:
    """Piece ↔ id of the tiny tokenizer (the GGUF keeps SentencePiece's ids)."""

    def __init__(self, tokenizer_model: Path) -> None:
        self.sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))

    def id(self, piece: str) -> int:
        i = self.sp.piece_to_id(piece)
        if i == self.sp.unk_id() and piece != self.sp.id_to_piece(self.sp.unk_id()):
            raise KeyError(f"{piece!r} is not a piece of the tiny tokenizer")
        return i


def make_scripted_bundle(root: Path, successors: Mapping[str, str], default: str) -> Path:
    """An F32 bundle in `root`/bundle whose model follows `successors` (piece → next piece); any other token is
    followed by `default`. Returns the bundle folder."""
    ckpt = make_checkpoint(root / "ckpt", "bin", preset="tiny", seed=0)
    vocab = Vocab(ckpt / "tokenizer.model")
    weights = ckpt / "pytorch_model.bin"
    state = torch.load(weights, weights_only=True, map_location="cpu")
    pre = "language_model.model"
    embed = state[f"{pre}.embed_tokens.weight"]
    n_vocab, hidden = embed.shape
    slots = {vocab.id(p): s for s, p in enumerate(successors, start=1)}
    if len(slots) >= hidden:
        raise ValueError(f"at most {hidden - 1} scripted tokens fit a hidden size of {hidden}")

    for name, tensor in state.items():
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            tensor.zero_()
    embed.zero_()
    embed[:, 0] = 1.0  # [V, H]: every token in slot 0 …
    for tok, s in slots.items():
        embed[tok].zero_()
        embed[tok, s] = 1.0  # … but the scripted ones
    state[f"{pre}.norm.weight"].fill_(1.0)
    head = state["language_model.lm_head.weight"]  # [V, H]
    head.zero_()
    eos = vocab.id(EOS)
    head[eos] = -BIG
    for follows, nxt in [(0, default), *((slots[vocab.id(p)], n) for p, n in successors.items())]:
        head[vocab.id(nxt), follows] = BIG
    torch.save(state, weights)
    return convert_checkpoint(ckpt, root / "bundle", quant="F32")
