"""UReader end to end: the tiny checkpoint in the release's layout converts, and answers through the engine and `ask`.

The reference for the language side is transformers' LlamaForCausalLM built from the checkpoint's float32
language_model.* weights and fed `inputs_embeds`: its own embedding table for the text (SentencePiece, chunk by
chunk, from the prompt text written out literally here) and, for each image, our vision rows for its global view
then each crop, 65 rows per view with nothing in between (the reference processor turns one `<image>` into one
`<image>` per view, each 65 placeholder slots). UReader's benchmark prompt has no system text.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from PIL import Image
from safetensors.torch import load_file
from test_engine import reference_embeds, reference_greedy

from owl_desktop import bundle as bundle_mod
from owl_desktop.cli import main as cli_main
from owl_desktop.convert.converter import convert_checkpoint
from owl_desktop.devtools.tiny_checkpoint import llama_config_for, make_checkpoint
from owl_desktop.engine.doc_crops import Grid, plan_views
from owl_desktop.engine.llm import LlmSettings, Sampling
from owl_desktop.engine.pipeline import ChatPipeline, EngineSettings, HistoryTurn
from owl_desktop.engine.preprocess import preprocess
from owl_desktop.errors import CheckpointError, PromptError
from owl_desktop.model_family import CUT_EMBEDDING_H, CUT_EMBEDDING_W, UREADER, UREADER_ANCHORS

EXACT = EngineSettings(llm=LlmSettings(flash_attn="off", kv_type="f32", n_threads=2), vision_dtype="float32")
GREEDY16 = Sampling(greedy=True, max_new_tokens=16)

# name: (width, height, the grid the reference ranking gives; see test_doc_crops.py for how such grids are worked out)
IMAGES = {
    "receipt": (300, 900, (3, 1)),  # aspect 3: 3×1 and 6×2 fit exactly; 3×1 (224×672) covers more of it
    "banner": (640, 160, (1, 4)),  # aspect 1:4: 1×4 (896×224) beats 2×8, which would dwarf the image
    "card": (500, 400, (4, 5)),  # 5:4: only 4×5 has that shape: 20 crops, 1,365 positions
}


def shards(ckpt: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in sorted(ckpt.glob("pytorch_model-*-of-00003.bin")):
        state.update(torch.load(f, weights_only=True, map_location="cpu"))
    return state


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ureader")
    ckpt = make_checkpoint(root / "ckpt", "ureader", preset="tiny", seed=3)
    bundle = convert_checkpoint(ckpt, root / "bundle-f32", quant="F32")
    out = {"ckpt": ckpt, "bundle": bundle, "root": root}
    for i, (name, (w, h, _)) in enumerate(IMAGES.items()):
        p = root / f"{name}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        out[name] = p
    return out


@pytest.fixture(scope="module")
def pipe(tiny: dict[str, Path]) -> Iterator[ChatPipeline]:
    with ChatPipeline.open(tiny["bundle"], EXACT) as p:
        yield p


@pytest.fixture(scope="module")
def reference(tiny: dict[str, Path]) -> tuple[torch.nn.Module, spm.SentencePieceProcessor]:
    from transformers import LlamaForCausalLM

    cfg = bundle_mod.load(tiny["bundle"]).config
    state = shards(tiny["ckpt"])
    llm = {k[len("language_model.") :]: v for k, v in state.items() if k.startswith("language_model.")}
    llm = {k: v for k, v in llm.items() if not k.endswith("rotary_emb.inv_freq")}
    model = LlamaForCausalLM(llama_config_for(cfg.text)).float().eval()
    model.load_state_dict(llm, strict=True)
    return model, spm.SentencePieceProcessor(model_file=str(tiny["ckpt"] / "tokenizer.model"))


def test_the_release_layout_converts_to_a_ureader_bundle(tiny: dict[str, Path]) -> None:
    ckpt = tiny["ckpt"]
    index = json.loads((ckpt / "pytorch_model.bin.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"pytorch_model-0000{i}-of-00003.bin" for i in (1, 2, 3)]
    assert not (ckpt / "special_tokens_map.json").exists() and not (ckpt / "preprocessor_config.json").exists()
    state = shards(ckpt)
    assert state[CUT_EMBEDDING_H].shape == (15, 64) and state[CUT_EMBEDDING_H].dtype == torch.float32
    assert state[CUT_EMBEDDING_H].std() > 0.3  # randomised, not an all-zero table that would hide a bug

    manifest = json.loads((tiny["bundle"] / "bundle.json").read_text())
    assert manifest["family"] == UREADER and manifest["format_version"] == 2
    assert manifest["source"]["format"] == "sharded-bin"
    plan = manifest["image_plan"]
    assert plan["kind"] == "shape-adaptive-crops" and plan["crop_size"] == 224 and plan["position_embedding"] == "post"
    assert [tuple(a) for a in plan["anchors"]] == list(UREADER_ANCHORS)
    assert manifest["prompt"]["system"] == ""  # the benchmark prompt: "Human: <image>\nHuman: {q}\nAI: "
    b = bundle_mod.load(tiny["bundle"])
    assert b.family == UREADER and b.image_plan.anchor_max == 11
    vision = load_file(str(tiny["bundle"] / "vision.safetensors"))
    for name in (CUT_EMBEDDING_H, CUT_EMBEDDING_W):
        torch.testing.assert_close(vision[name], state[name], rtol=0, atol=0)


CASES = {
    "receipt": ([], ["receipt"], "What is the total?", "Human: <image>\nHuman: What is the total?\nAI: "),
    "20 crops": ([], ["card"], "Read the card.", "Human: <image>\nHuman: Read the card.\nAI: "),
    # several images: each gets its own grid and its own crop positions, one after the other
    "two images": (
        [],
        ["receipt", "banner"],
        "Which one is wider?",
        "Human: <image>\nHuman: <image>\nHuman: Which one is wider?\nAI: ",
    ),
    "follow-up": (
        [(["banner"], "What does it say?", "Sale.")],
        [],
        "When?",
        "Human: <image>\nHuman: What does it say?\nAI: <cut>Sale.<cut>\nHuman: When?\nAI: ",  # answer: own chunk
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_equal_llama_fed_the_same_merged_embeddings(
    case: str, tiny: dict[str, Path], pipe: ChatPipeline, reference: tuple[torch.nn.Module, spm.SentencePieceProcessor]
) -> None:
    history_spec, names, question, text = CASES[case]
    history = [HistoryTurn([tiny[n] for n in imgs], q, a) for imgs, q, a in history_spec]
    images = [tiny[n] for n in names]
    all_images = [tiny[n] for imgs, _, _ in history_spec for n in imgs] + images

    answer = pipe.ask(images, question, history, sampling=GREEDY16)
    answer.read()
    prompt, segments, _ = pipe.build(images, question, history, max_new_tokens=16)
    pipe.llm.prefill(segments)
    ours = pipe.llm.last_logits()

    embeds = reference_embeds(text, all_images, pipe, reference)
    ref_logits, ref_ids = reference_greedy(reference[0], embeds, 16)
    assert prompt.n_positions == embeds.shape[1]
    assert np.max(np.abs(ours - ref_logits)) <= 1e-3
    assert answer.record.token_ids == ref_ids and len(ref_ids) == 16


def test_each_image_costs_65_positions_per_view(tiny: dict[str, Path], pipe: ChatPipeline) -> None:
    for name, (w, h, grid) in IMAGES.items():
        rows = pipe.image_rows(tiny[name])
        assert plan_views(w, h, pipe.bundle.image_plan).grid == Grid(*grid)
        assert rows.shape == (65 * (1 + grid[0] * grid[1]), pipe.llm.n_embd) and rows.dtype == np.float32
        vit_eos = rows[64::65]  # every view ends with the learned vit_eos row
        np.testing.assert_array_equal(vit_eos, np.broadcast_to(vit_eos[0], vit_eos.shape))
    answer = pipe.ask([tiny["card"]], "Read it.", sampling=Sampling(greedy=True, max_new_tokens=2))
    answer.read()
    timing = answer.record.images[0]
    assert (timing.views, timing.grid, timing.full_grid) == (21, "4×5", "")
    prompt, _, _ = pipe.build([tiny["card"]], "Read it.")
    text = 1 + len(pipe.llm.tokenize("Human: ")) + len(pipe.llm.tokenize("\nHuman: Read it.\nAI: "))  # BOS first
    assert prompt.n_positions == 1365 + text


def test_a_document_too_big_for_the_context_is_read_with_a_smaller_grid_and_said(tiny: dict[str, Path]) -> None:
    small = EngineSettings(llm=LlmSettings(n_ctx=512, flash_attn="off", kv_type="f32", n_threads=2))
    with ChatPipeline.open(tiny["bundle"], small) as p:
        answer = p.ask([tiny["card"]], "Read the card.", sampling=Sampling(greedy=True, max_new_tokens=4))
        answer.read()
        timing = answer.record.images[0]
        assert timing.full_grid == "4×5" and timing.grid != "4×5"
        assert 65 * timing.views + 16 <= 512
        assert answer.record.context_used <= 512
        (notice,) = answer.record.notices
        assert f"read as a {timing.grid} grid" in notice and "instead of 4×5" in notice
        # the same image in a later turn, with room to spare again, would take its full grid: here it cannot
        # fit, so that turn is left out whole
        history = [HistoryTurn([tiny["card"]], "Read the card.", answer.record.text)]
        follow = p.ask([tiny["receipt"]], "And this?", history, sampling=Sampling(greedy=True, max_new_tokens=2))
        follow.read()
        assert follow.record.dropped_turns == 1 and follow.record.notices == []
        with pytest.raises(PromptError, match="too many images.*even at the smallest level.*at most 3 images"):
            p.ask([tiny["receipt"]] * 5, "Compare them.", sampling=GREEDY16)


def test_old_turns_are_dropped_whole_before_a_document_shrinks(tiny: dict[str, Path], pipe: ChatPipeline) -> None:
    history = [HistoryTurn([tiny["card"]], "Read the card.", "It is noise.")]
    answer = pipe.ask([tiny["card"]], "Once more?", history, sampling=Sampling(greedy=True, max_new_tokens=2))
    answer.read()
    assert answer.record.dropped_turns == 1  # 2 × 1,365 positions cannot both fit in 2,048
    assert answer.record.notices == [] and answer.record.images[0].grid == "4×5"


def test_cli_ask_reports_the_grid(
    tiny: dict[str, Path], pipe: ChatPipeline, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["ask", "--model", str(tiny["bundle"]), "--image", str(tiny["receipt"]), "--greedy"]
    args += ["--max-new-tokens", "6", "--flash-attn", "off", "--kv-type", "f32", "--threads", "2"]
    args += ["--vision-dtype", "float32", "--json", "What is the total?"]
    assert cli_main(args) == 0
    out = json.loads(capsys.readouterr().out)
    expected = pipe.ask([tiny["receipt"]], "What is the total?", sampling=Sampling(greedy=True, max_new_tokens=6))
    assert out["answer"] == expected.read()
    assert out["token_ids"] == expected.record.token_ids
    (image,) = out["timings"]["images"]
    assert (image["grid"], image["views"]) == ("3×1", 4) and out["notices"] == []


def test_a_prepared_image_is_refused(tiny: dict[str, Path], pipe: ChatPipeline) -> None:
    with pytest.raises(ValueError, match="crops the image itself"):
        pipe.ask([preprocess(tiny["receipt"])], "What is it?", sampling=GREEDY16)


def test_a_checkpoint_with_one_crop_table_is_refused(tiny: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny["ckpt"], broken)
    index = json.loads((broken / "pytorch_model.bin.index.json").read_text())
    shard = broken / index["weight_map"].pop(CUT_EMBEDDING_W)
    state = torch.load(shard, weights_only=True, map_location="cpu")
    del state[CUT_EMBEDDING_W]
    torch.save(state, shard)
    (broken / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="missing tensor abstractor.cut_patch_embedding_w.weight"):
        convert_checkpoint(broken, tmp_path / "out", quant="F32")
    assert not (tmp_path / "out").exists()


def test_a_small_memory_cache_still_serves_whole_documents(tiny: dict[str, Path], pipe: ChatPipeline) -> None:
    # the in-memory cache counts rows: one mPLUG-Owl image's worth (65) holds no UReader image at all, and nothing
    # is kept on disk; a question about two images must still get both images' rows, and the same answer
    lean = EngineSettings(
        llm=LlmSettings(flash_attn="off", kv_type="f32", n_threads=2),
        vision_dtype="float32",
        disk_cache=False,
        memory_cache_images=1,
    )
    question = "Which one is wider?"
    with ChatPipeline.open(tiny["bundle"], lean) as p:
        answer = p.ask([tiny["receipt"], tiny["banner"]], question, sampling=GREEDY16)
        answer.read()
        assert [t.cached for t in answer.record.images] == [False, False]
    expected = pipe.ask([tiny["receipt"], tiny["banner"]], question, sampling=GREEDY16)
    expected.read()
    assert answer.record.token_ids == expected.record.token_ids
