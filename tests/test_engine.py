"""The engine end to end on an F32 bundle of the tiny checkpoint, against an independent all-torch path.

The reference: transformers' LlamaForCausalLM built from the checkpoint's language_model.* weights, fed
`inputs_embeds` made of its own embedding table for the text (tokenized by SentencePiece, chunk by chunk, from
prompt text written out literally here) and our vision output for the images.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from hostile import zip_bomb
from PIL import Image

from owl_desktop import bundle as bundle_mod
from owl_desktop.bundle import DEFAULT_SYSTEM
from owl_desktop.cli import main as cli_main
from owl_desktop.convert.converter import convert_checkpoint
from owl_desktop.devtools.tiny_checkpoint import llama_config_for, make_checkpoint
from owl_desktop.engine.llm import LlmSettings, Sampling
from owl_desktop.engine.pipeline import ChatPipeline, EngineSettings, HistoryTurn
from owl_desktop.engine.preprocess import preprocess
from owl_desktop.errors import BundleError, EngineError, ImageError, PromptError

EXACT = EngineSettings(llm=LlmSettings(flash_attn="off", kv_type="f32", n_threads=2), vision_dtype="float32")
GREEDY16 = Sampling(greedy=True, max_new_tokens=16)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("engine")
    ckpt = make_checkpoint(root / "ckpt", "bin", preset="tiny", seed=0)
    bundle = convert_checkpoint(ckpt, root / "bundle-f32", quant="F32")
    images = {}
    for i, (w, h) in enumerate([(320, 200), (150, 260), (224, 224)]):
        rng = np.random.default_rng(i)
        p = root / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        images[f"img{i}"] = p
    return {"ckpt": ckpt, "bundle": bundle, "root": root, **images}


@pytest.fixture(scope="module")
def pipe(tiny: dict[str, Path]) -> Iterator[ChatPipeline]:
    with ChatPipeline.open(tiny["bundle"], EXACT) as p:
        yield p


@pytest.fixture(scope="module")
def reference(tiny: dict[str, Path]) -> tuple[torch.nn.Module, spm.SentencePieceProcessor]:
    from transformers import LlamaForCausalLM

    cfg = bundle_mod.load(tiny["bundle"]).config
    state = torch.load(tiny["ckpt"] / "pytorch_model.bin", weights_only=True, map_location="cpu")
    llm_state = {k[len("language_model.") :]: v.float() for k, v in state.items() if k.startswith("language_model.")}
    llm_state = {k: v for k, v in llm_state.items() if not k.endswith("rotary_emb.inv_freq")}
    model = LlamaForCausalLM(llama_config_for(cfg.text)).float().eval()
    model.load_state_dict(llm_state, strict=True)
    sp = spm.SentencePieceProcessor(model_file=str(tiny["ckpt"] / "tokenizer.model"))
    return model, sp


def reference_embeds(
    text: str, images: list[Path], pipe: ChatPipeline, reference: tuple[torch.nn.Module, spm.SentencePieceProcessor]
) -> torch.Tensor:
    """[1, T, n_embd]: BOS + each text chunk tokenized on its own (chunks end at each <image> and <cut>); each <image>
    replaced by the pipeline's rows for it (65 per view: one for an mPLUG-Owl image, a UReader page's global view and
    crops)."""
    model, sp = reference
    chunks = [c for c in re.split("(<image>|<cut>)", text) if c and c != "<cut>"]
    assert chunks.count("<image>") == len(images)
    table = model.get_input_embeddings().weight
    parts = [table[[1]]]
    pictures = iter(images)
    for chunk in chunks:
        if chunk == "<image>":
            parts.append(torch.from_numpy(pipe.image_rows(next(pictures))))
        else:
            parts.append(table[sp.encode(chunk)])
    return torch.cat(parts).unsqueeze(0)


@torch.inference_mode()
def reference_greedy(model: torch.nn.Module, embeds: torch.Tensor, n: int) -> tuple[np.ndarray, list[int]]:
    """Last-position logits of the prompt and the n-token greedy continuation (full recompute each step)."""
    table = model.get_input_embeddings().weight
    first = model(inputs_embeds=embeds).logits[0, -1].numpy()
    ids: list[int] = []
    x = embeds
    logits = first
    for _ in range(n):
        t = int(np.argmax(logits))
        if t == 2:
            break
        ids.append(t)
        x = torch.cat([x, table[[t]].unsqueeze(0)], dim=1)
        logits = model(inputs_embeds=x).logits[0, -1].numpy()
    return first, ids


SYS = DEFAULT_SYSTEM
CASES = {
    "one image": (
        [],
        ["img0"],
        "What is in the picture?",
        f"{SYS}\nHuman: <image>\nHuman: What is in the picture?\nAI: ",
    ),
    "two images": (
        [],
        ["img0", "img1"],
        "Do these differ?",
        f"{SYS}\nHuman: <image>\nHuman: <image>\nHuman: Do these differ?\nAI: ",
    ),
    "text only": ([], [], "Tell me a story about 3 owls.", f"{SYS}\nHuman: Tell me a story about 3 owls.\nAI: "),
    "three turns": (
        [(["img0"], "Describe it.", "A noisy square."), (["img1"], "And this one?", "Also noise, but taller.")],
        ["img2"],
        "Which is widest?",
        # an earlier answer is a chunk of its own, and so is the text after it (engine/prompt.py says why)
        f"{SYS}\nHuman: <image>\nHuman: Describe it.\nAI: <cut>A noisy square.<cut>\nHuman: <image>\n"
        "Human: And this one?\nAI: <cut>Also noise, but taller.<cut>\nHuman: <image>\nHuman: Which is widest?\nAI: ",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_engine_matches_all_torch_reference(
    case: str, tiny: dict[str, Path], pipe: ChatPipeline, reference: tuple[torch.nn.Module, spm.SentencePieceProcessor]
) -> None:
    history_spec, image_names, question, text = CASES[case]
    history = [HistoryTurn([tiny[n] for n in imgs], q, a) for imgs, q, a in history_spec]
    images = [tiny[n] for n in image_names]
    all_images = [tiny[n] for imgs, _, _ in history_spec for n in imgs] + images

    answer = pipe.ask(images, question, history, sampling=GREEDY16)
    pieces = list(answer)
    # the prompt's last-position logits: prefilling the same prompt again re-decodes only its last position
    _, segments, _ = pipe.build(images, question, history, max_new_tokens=16)
    pipe.llm.prefill(segments)
    prompt_logits_ours = pipe.llm.last_logits()

    ref_logits, ref_ids = reference_greedy(reference[0], reference_embeds(text, all_images, pipe, reference), 16)
    assert answer.record.context_used > 0
    assert np.max(np.abs(prompt_logits_ours - ref_logits)) <= 1e-3
    assert answer.record.token_ids == ref_ids
    assert len(ref_ids) == 16  # the comparison covered a full 16-token continuation
    assert "".join(pieces) == answer.record.text


def test_follow_up_reuses_kv_and_equals_from_scratch(tiny: dict[str, Path], pipe: ChatPipeline) -> None:
    first = pipe.ask([tiny["img0"]], "What colour dominates?", sampling=GREEDY16)
    first.read()
    history = [HistoryTurn([tiny["img0"]], "What colour dominates?", first.record.text)]
    follow = pipe.ask([], "Why?", history, sampling=GREEDY16)
    follow.read()
    # the previous prompt whole, up to the "▁" of its "AI: ", then the answer's tokens as far as its text tokenizes
    # into them (a random model's tokens seldom are the ones its text tokenizes into; tests/test_follow_up.py)
    assert follow.record.reused_positions >= first.record.context_used - len(first.record.token_ids)
    assert all(t.cached for t in follow.record.images)

    pipe.llm.reset()
    scratch = pipe.ask([], "Why?", history, sampling=GREEDY16)
    scratch.read()
    assert scratch.record.reused_positions == 0
    assert scratch.record.token_ids == follow.record.token_ids


def test_a_conversation_coming_back_gets_its_saved_prefix(tiny: dict[str, Path], pipe: ChatPipeline) -> None:
    pipe.llm.reset()
    first = pipe.ask([tiny["img0"]], "What colour dominates?", sampling=GREEDY16)
    first.read()
    other = pipe.ask([tiny["img1"], tiny["img2"]], "Compare these.", sampling=GREEDY16)  # another conversation
    other.read()
    assert other.record.reused_positions < 65  # it overwrote the first one's image and answer
    history = [HistoryTurn([tiny["img0"]], "What colour dominates?", first.record.text)]
    back = pipe.ask([], "Why?", history, sampling=GREEDY16)
    back.read()
    assert back.record.reused_positions >= first.record.context_used - len(first.record.token_ids) - 1

    pipe.llm.reset()
    scratch = pipe.ask([], "Why?", history, sampling=GREEDY16)
    scratch.read()
    assert scratch.record.reused_positions == 0
    assert scratch.record.token_ids == back.record.token_ids


def test_regenerate_with_same_seed_gives_same_text(tiny: dict[str, Path], pipe: ChatPipeline) -> None:
    sampled = Sampling(temperature=1.0, top_k=50, top_p=0.95, seed=1234, max_new_tokens=24)
    a = pipe.ask([tiny["img1"]], "Say something.", sampling=sampled)
    a.read()
    b = pipe.ask([tiny["img1"]], "Say something.", sampling=sampled)
    b.read()
    assert a.record.seed == b.record.seed == 1234
    assert a.record.token_ids == b.record.token_ids
    others = set()
    for seed in (1, 2, 3):
        c = pipe.ask([tiny["img1"]], "Say something.", sampling=Sampling(temperature=1.0, seed=seed))
        c.read()
        others.add(tuple(c.record.token_ids))
    assert len(others) > 1  # the seed really steers sampling


def test_same_image_is_encoded_once(tiny: dict[str, Path], pipe: ChatPipeline) -> None:
    copy = tiny["root"] / "same-bytes-other-name.png"
    shutil.copyfile(tiny["img2"], copy)
    a = pipe.ask([tiny["img2"]], "One?", sampling=Sampling(greedy=True, max_new_tokens=2))
    a.read()
    b = pipe.ask([copy], "Two?", sampling=Sampling(greedy=True, max_new_tokens=2))
    b.read()
    assert b.record.images[0].cached and b.record.images[0].encode_ms == 0.0


def test_no_repeat_ngram_ban(tiny: dict[str, Path], pipe: ChatPipeline) -> None:
    s = Sampling(temperature=0.01, top_k=1, repeat_penalty=1.0, no_repeat_ngram=2, seed=0, max_new_tokens=60)
    a = pipe.ask([tiny["img0"]], "Repeat yourself.", sampling=s)
    a.read()
    ids = a.record.token_ids
    bigrams = list(zip(ids, ids[1:], strict=False))
    assert len(bigrams) == len(set(bigrams))
    greedy = pipe.ask([tiny["img0"]], "Repeat yourself.", sampling=Sampling(greedy=True, max_new_tokens=60))
    greedy.read()
    g = greedy.record.token_ids
    assert len(list(zip(g, g[1:], strict=False))) > len(set(zip(g, g[1:], strict=False)))  # the ban had work to do


def test_cancel_stops_within_a_token(tiny: dict[str, Path], pipe: ChatPipeline) -> None:
    answer = pipe.ask([tiny["img0"]], "Talk at length.", sampling=Sampling(greedy=True, max_new_tokens=200))
    got = []
    for piece in answer:
        got.append(piece)
        if len(answer.record.text) > 0 and len(got) == 3:
            answer.cancel()
    assert answer.record.stop_reason == "cancelled"
    assert len(answer.record.token_ids) <= 4
    again = pipe.ask([tiny["img0"]], "Still there?", sampling=Sampling(greedy=True, max_new_tokens=4))
    again.read()
    assert again.record.stop_reason in ("length", "eos")


def _huge_png(path: Path, side: int = 30000) -> None:
    """A valid 1-bit PNG of side×side pixels in ~100 kB (never decoded by the test)."""
    raw = zlib.compress(b"".join(b"\x00" + bytes((side + 7) // 8) for _ in range(side)), 9)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def test_bad_images_are_clear_errors_and_the_engine_stays_usable(tiny: dict[str, Path], pipe: ChatPipeline) -> None:
    root = tiny["root"]
    (root / "empty.png").write_bytes(b"")
    (root / "notes.png").write_text("this is text, not an image")
    jpeg = root / "photo.jpg"
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (300, 300, 3), dtype=np.uint8)).save(jpeg, quality=90)
    (root / "cut.jpg").write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    _huge_png(root / "huge.png")
    for name in ("empty.png", "notes.png", "cut.jpg", "huge.png"):
        with pytest.raises(ImageError, match=name):
            pipe.ask([root / name], "What is this?", sampling=GREEDY16)
    ok = pipe.ask([tiny["img0"]], "What is this?", sampling=Sampling(greedy=True, max_new_tokens=3))
    assert ok.read() is not None and len(ok.record.token_ids) > 0


def test_too_many_images_and_empty_question(tiny: dict[str, Path], pipe: ChatPipeline) -> None:
    with pytest.raises(PromptError, match="images"):
        pipe.ask([tiny["img0"]] * 40, "Compare them all.", sampling=GREEDY16)
    with pytest.raises(PromptError, match="empty"):
        pipe.ask([tiny["img0"]], "   ", sampling=GREEDY16)


def _copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_broken_bundles_are_refused(tiny: dict[str, Path], tmp_path: Path) -> None:
    missing = _copy_bundle(tiny["bundle"], tmp_path / "missing")
    (missing / "vision.safetensors").unlink()
    with pytest.raises(BundleError, match="vision.safetensors is missing"):
        ChatPipeline.open(missing, EXACT)

    corrupt = _copy_bundle(tiny["bundle"], tmp_path / "corrupt")
    gguf = corrupt / "llm-F32.gguf"
    data = bytearray(gguf.read_bytes())
    data[-100] ^= 0xFF  # same size, one flipped byte
    gguf.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        ChatPipeline.open(corrupt, EXACT)


def test_gguf_of_another_architecture_is_refused(tiny: dict[str, Path], tmp_path: Path) -> None:
    import gguf

    other = _copy_bundle(tiny["bundle"], tmp_path / "other-arch")
    b = bundle_mod.load(other)
    path = other / "llm-F32.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_context_length(64)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    bundle_mod.write_manifest(other, bundle_id=b.id, quant=b.quant, config=b.config, source=b.source)
    with pytest.raises(EngineError, match="gpt2"):
        ChatPipeline.open(other, EXACT)


def test_cli_ask_json_streams_the_same_answer(
    tiny: dict[str, Path], pipe: ChatPipeline, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    history = [{"images": ["img0.png"], "question": "Describe it.", "answer": "A noisy square."}]
    conv = tiny["root"] / "conversation.json"
    conv.write_text(json.dumps(history))
    args = ["ask", "--model", str(tiny["bundle"]), "--image", str(tiny["img1"]), "--conversation", str(conv)]
    args += ["--greedy", "--max-new-tokens", "8", "--flash-attn", "off", "--kv-type", "f32", "--threads", "2"]
    args += ["--vision-dtype", "float32", "--json", "And this one?"]
    assert cli_main(args) == 0
    out = json.loads(capsys.readouterr().out)
    expected = pipe.ask(
        [tiny["img1"]],
        "And this one?",
        [HistoryTurn([tiny["img0"]], "Describe it.", "A noisy square.")],
        sampling=Sampling(greedy=True, max_new_tokens=8),
    )
    assert out["answer"] == expected.read()
    assert out["token_ids"] == expected.record.token_ids
    assert {"prefill_ms", "time_to_first_token_ms", "decode_tokens_per_s", "images"} <= set(out["timings"])

    assert cli_main(["ask", "--model", str(tiny["bundle"]), "--image", str(tmp_path / "nope.png"), "Hi?"]) == 1
    assert "nope.png" in capsys.readouterr().err


def test_cli_ask_reads_the_apps_zip_export_with_its_system_prompt(
    tiny: dict[str, Path], pipe: ChatPipeline, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """What the app exports (a .owlchat.zip with images inside and the chat's system prompt) is what ask reads."""
    import zipfile

    archive = tmp_path / "chat.owlchat.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        turns = [{"images": ["images/first.png"], "question": "Describe it.", "answer": "A noisy square."}]
        zf.writestr("conversation.json", json.dumps(turns))
        zf.writestr("owlchat.json", json.dumps({"format": 1, "system_prompt": "Answer tersely."}))
        zf.writestr("images/first.png", tiny["img0"].read_bytes())
    args = ["ask", "--model", str(tiny["bundle"]), "--image", str(tiny["img1"]), "--conversation", str(archive)]
    args += ["--greedy", "--max-new-tokens", "8", "--flash-attn", "off", "--kv-type", "f32", "--threads", "2"]
    args += ["--vision-dtype", "float32", "--json", "And this one?"]
    assert cli_main(args) == 0
    out = json.loads(capsys.readouterr().out)
    history = [HistoryTurn([tiny["img0"]], "Describe it.", "A noisy square.")]
    greedy = Sampling(greedy=True, max_new_tokens=8)
    expected = pipe.ask([tiny["img1"]], "And this one?", history, sampling=greedy, system="Answer tersely.")
    assert out["answer"] == expected.read()
    assert out["token_ids"] == expected.record.token_ids
    default_system = pipe.ask([tiny["img1"]], "And this one?", history, sampling=greedy)
    default_system.read()
    assert default_system.record.context_used != expected.record.context_used  # the export's prompt was used

    args[args.index(str(archive))] = str(zip_bomb(tmp_path / "bomb.owlchat.zip"))  # 1 GiB of zeros in 1 MB
    assert cli_main(args) == 1
    assert "unsafe" in capsys.readouterr().err


def test_preprocess_feeds_the_vision_encoder(tiny: dict[str, Path], pipe: ChatPipeline) -> None:
    rows = pipe.image_rows(preprocess(tiny["img0"]))
    assert rows.shape == (65, pipe.llm.n_embd) and rows.dtype == np.float32


def test_chat_command_in_a_terminal(tiny: dict[str, Path], tmp_path: Path) -> None:
    """The interactive chat, driven through its stdin as a person would type."""
    import os
    import subprocess
    import sys

    script = f"/image {tiny['img0']}\n/image {tmp_path / 'missing.png'}\nWhat is it?\n/regen\n/clear\n/regen\n/quit\n"
    env = {**os.environ, "OWL_DATA_DIR": str(tmp_path / "data"), "OWL_CACHE_DIR": str(tmp_path / "cache")}
    args = [sys.executable, "-m", "owl_desktop", "chat", "--model", str(tiny["bundle"]), "--max-new-tokens", "6"]
    done = subprocess.run(args, input=script, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "img0.png attached; 1 image(s)" in out
    assert "no such file" in out and "missing.png" in out
    assert out.count("owl> ") == 2  # the question and its regeneration
    assert "[conversation cleared]" in out and "[nothing to regenerate yet]" in out


def test_demo_runs_the_whole_path_offline(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["demo", "--greedy", "--max-new-tokens", "5", "--threads", "2"]) == 0
    captured = capsys.readouterr()
    assert "RANDOM weights" in captured.err
    assert "answer (random weights): " in captured.out
    assert "tokens/s" in captured.err
    # built once: the second run reuses the bundle in the data dir
    from owl_desktop import paths
    from owl_desktop.devtools.demo import DEMO_BUNDLE_ID

    manifest = paths.models_dir() / DEMO_BUNDLE_ID / "bundle.json"
    stamp = manifest.stat().st_mtime_ns
    assert cli_main(["demo", "--greedy", "--max-new-tokens", "2", "--threads", "2"]) == 0
    assert manifest.stat().st_mtime_ns == stamp
