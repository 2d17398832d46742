"""The GGUF's token table, read by us, gives the rows llama.cpp looks up itself: a prompt sent as those rows leaves
exactly the logits its token ids leave (so a prompt with an image can go in as embeddings throughout, text and image
in the same batches), for each quantization of the token table the converter writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from owl_desktop.convert.converter import convert_checkpoint
from owl_desktop.devtools.tiny_checkpoint import make_checkpoint
from owl_desktop.engine.gguf_file import TokenTable, open_reader, read_architecture
from owl_desktop.engine.llm import Embeddings, LlamaEngine, LlmSettings, Tokens
from owl_desktop.errors import EngineError

QUANTS = ("F32", "F16", "Q8_0", "Q4_K_M")


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("token-table")
    ckpt = make_checkpoint(root / "ckpt", "bin", preset="tiny", seed=0)
    out = {}
    for quant in QUANTS:
        bundle = convert_checkpoint(ckpt, root / quant, quant=quant)
        out[quant] = next(bundle.glob("llm-*.gguf"))
    return out


@pytest.mark.parametrize("quant", QUANTS)
def test_prompt_as_table_rows_leaves_the_logits_of_its_token_ids(ggufs: dict[str, Path], quant: str) -> None:
    path = ggufs[quant]
    table = TokenTable.open(open_reader(path))
    assert table is not None
    with LlamaEngine(path, LlmSettings(n_threads=2, n_ctx=256)) as llm:
        assert llm.mixes_batches  # so a prompt with an image goes in as these rows
        assert table.n_embd == llm.n_embd and table.n_vocab == llm.n_vocab
        ids = [int(t) for t in np.random.default_rng(7).integers(3, llm.n_vocab, 40)]
        llm.prefill([Tokens(ids)])
        from_ids = llm.last_logits()
        llm.reset()
        llm.prefill([Embeddings(table.rows(ids), "rows")])
        np.testing.assert_array_equal(llm.last_logits(), from_ids)


def test_token_ids_outside_the_table_and_files_that_are_not_gguf_are_refused(
    ggufs: dict[str, Path], tmp_path: Path
) -> None:
    reader = open_reader(ggufs["Q8_0"])
    table = TokenTable.open(reader)
    assert table is not None
    with pytest.raises(EngineError, match="outside the vocabulary"):
        table.rows([0, table.n_vocab])
    assert read_architecture(reader, "model.gguf") == "llama"
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(EngineError, match="junk.gguf is not a readable GGUF"):
        open_reader(junk)
