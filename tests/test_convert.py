"""Conversion: a tiny random mPLUG-Owl checkpoint → bundle, checked against transformers, peft and SentencePiece.

The GGUFs run in llama.cpp (tests/gguf_probe.py: flash attention off, F32 KV cache) and their last-position
logits are compared with transformers' LlamaForCausalLM built from the checkpoint's `language_model.*` weights.
Every refusal goes through the CLI's `main()` and must leave neither a bundle nor a temporary folder behind.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import gguf
import numpy as np
import pytest
import sentencepiece
import torch
from gguf_probe import GgufProbe
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from owl_desktop import bundle
from owl_desktop.bundle import MANIFEST, QUANTS, VISION_FILE, llm_filename
from owl_desktop.cli import main
from owl_desktop.convert.checkpoint import open_checkpoint
from owl_desktop.convert.converter import convert_checkpoint
from owl_desktop.convert.gguf_export import permute_for_rope
from owl_desktop.convert.pages import FileMappings
from owl_desktop.devtools.tiny_checkpoint import (
    llama_config_for,
    make_checkpoint,
    make_lora_adapter,
    read_checkpoint_config,
)
from owl_desktop.errors import BundleError, Cancelled, ConversionError
from owl_desktop.tasks import CancelToken, Progress, Task

FILE_TYPES = {"F32": 0, "F16": 1, "Q8_0": 7, "Q4_K_M": 15, "Q5_K_M": 17}
N_PROMPTS = 10

# -----------------------------------------------------------------------------------------------------------------
# fixtures: one tiny checkpoint and one bundle per quantization for the whole session


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def tiny_bin(ckpt_root: Path) -> Path:
    return make_checkpoint(ckpt_root / "mplug-owl-tiny", "bin")


@pytest.fixture(scope="session")
def tiny_state(tiny_bin: Path) -> dict[str, torch.Tensor]:
    return torch.load(tiny_bin / "pytorch_model.bin", weights_only=True)


@pytest.fixture(scope="session")
def bundles(tiny_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    return {q: convert_checkpoint(tiny_bin, root / q, quant=q) for q in QUANTS}


def reference_llama(tiny_bin: Path, state: dict[str, torch.Tensor]) -> nn.Module:
    """transformers' LlamaForCausalLM in float32 with the checkpoint's language_model.* weights (eager attention)."""
    from transformers import LlamaForCausalLM

    text = read_checkpoint_config(tiny_bin).text
    model = LlamaForCausalLM(llama_config_for(text)).float().eval()
    lm = {k.removeprefix("language_model."): v.float() for k, v in state.items() if k.startswith("language_model.")}
    lm = {k: v for k, v in lm.items() if not k.endswith("inv_freq")}
    model.load_state_dict(lm, strict=True)
    return model


@pytest.fixture(scope="session")
def prompts() -> list[list[int]]:
    rng = np.random.default_rng(7)
    return [[1, *rng.integers(3, 1000, size=5 + 2 * i).tolist()] for i in range(N_PROMPTS)]


def torch_last_logits(model: nn.Module, prompts: list[list[int]]) -> list[np.ndarray]:
    with torch.no_grad():
        return [model(torch.tensor([p])).logits[0, -1].float().numpy() for p in prompts]


@pytest.fixture(scope="session")
def reference_logits(tiny_bin: Path, tiny_state: dict[str, torch.Tensor], prompts: list[list[int]]) -> list[np.ndarray]:
    return torch_last_logits(reference_llama(tiny_bin, tiny_state), prompts)


def gguf_last_logits(path: Path, prompts: list[list[int]]) -> list[np.ndarray]:
    with GgufProbe(path) as g:
        return [g.last_logits(p) for p in prompts]


def max_abs_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


# -----------------------------------------------------------------------------------------------------------------
# the GGUF: metadata, loading, logits


@pytest.mark.parametrize("quant", QUANTS)
def test_gguf_metadata_and_tensors(bundles: dict[str, Path], quant: str) -> None:
    reader = gguf.GGUFReader(bundles[quant] / llm_filename(quant))

    def field(key: str) -> object:
        return reader.fields[key].contents()

    assert field("general.architecture") == "llama"
    assert field("general.file_type") == FILE_TYPES[quant]
    assert field("llama.context_length") == 2048
    assert field("llama.embedding_length") == 256
    assert field("llama.block_count") == 2
    assert field("llama.feed_forward_length") == 512
    assert field("llama.attention.head_count") == 4
    assert field("llama.attention.head_count_kv") == 4
    assert field("llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    assert field("llama.rope.freq_base") == pytest.approx(10000.0)
    assert field("llama.rope.dimension_count") == 64
    assert field("tokenizer.ggml.model") == "llama"
    assert (field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id")) == (1, 2)
    assert field("tokenizer.ggml.unknown_token_id") == 0
    assert field("tokenizer.ggml.add_bos_token") is True
    types = list(field("tokenizer.ggml.token_type"))  # type: ignore[call-overload]
    assert len(types) == len(field("tokenizer.ggml.tokens")) == len(field("tokenizer.ggml.scores")) == 1000  # type: ignore[arg-type]
    assert (types[0], types[1], types[2]) == (2, 3, 3)  # unknown, control, control
    assert types.count(6) == 256  # the byte pieces <0x00>..<0xFF>
    names = {t.name: t for t in reader.tensors}
    assert len(names) == 2 + 9 * 2 + 1 and not any("inv_freq" in n or "rope" in n for n in names)
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for n, t in names.items() if "norm" in n)
    matrix_type = names["blk.0.ffn_gate.weight"].tensor_type.name
    assert matrix_type == {"F32": "F32", "F16": "F16", "Q8_0": "Q8_0", "Q5_K_M": "Q5_K", "Q4_K_M": "Q4_K"}[quant]


@pytest.mark.parametrize("quant", QUANTS)
def test_gguf_loads_and_runs_in_llama_cpp(bundles: dict[str, Path], quant: str, prompts: list[list[int]]) -> None:
    with GgufProbe(bundles[quant] / llm_filename(quant)) as g:
        assert (g.n_vocab, g.n_embd) == (1000, 256)
        logits = g.last_logits(prompts[0])
    assert logits.shape == (1000,) and np.isfinite(logits).all() and logits.std() > 0.1


def test_f32_logits_match_transformers(
    bundles: dict[str, Path], prompts: list[list[int]], reference_logits: list[np.ndarray]
) -> None:
    got = gguf_last_logits(bundles["F32"] / llm_filename("F32"), prompts)
    assert max_abs_diff(got, reference_logits) <= 1e-3


def test_f16_logits_match_transformers(
    bundles: dict[str, Path], prompts: list[list[int]], reference_logits: list[np.ndarray]
) -> None:
    got = gguf_last_logits(bundles["F16"] / llm_filename("F16"), prompts)
    assert max_abs_diff(got, reference_logits) <= 2e-2


def test_q8_0_top1_agrees_with_transformers(
    bundles: dict[str, Path], prompts: list[list[int]], reference_logits: list[np.ndarray]
) -> None:
    got = gguf_last_logits(bundles["Q8_0"] / llm_filename("Q8_0"), prompts)
    agree = sum(int(g.argmax() == r.argmax()) for g, r in zip(got, reference_logits, strict=True))
    assert agree >= 9


@pytest.mark.parametrize("quant", ["Q5_K_M", "Q4_K_M"])
def test_k_quants_track_transformers(
    bundles: dict[str, Path], quant: str, prompts: list[list[int]], reference_logits: list[np.ndarray]
) -> None:
    """A wrong layout (permutation, tensor order) decorrelates the logits completely; quantization noise does not."""
    got = gguf_last_logits(bundles[quant] / llm_filename(quant), prompts)
    assert min(float(np.corrcoef(g, r)[0, 1]) for g, r in zip(got, reference_logits, strict=True)) >= 0.95


def test_rope_permutation_interleaves_the_halves_of_each_head() -> None:
    w = torch.arange(8).repeat_interleave(3).reshape(8, 3).float()  # 2 heads × head_dim 4, rows numbered 0..7
    rows = permute_for_rope(w, n_head=2)[:, 0].tolist()
    assert rows == [0, 2, 1, 3, 4, 6, 5, 7]


# -----------------------------------------------------------------------------------------------------------------
# tokenizer

TEXTS = [
    "Hello world",
    "The cat is sitting on the window.",
    "12345 and 3.14159, 2024-05-20",
    "line one\nline two\n\nend\n",
    "café naïve Zürich crème brûlée",
    "你好，世界。日本語のテキスト",
    "emoji 🦉🙂👍🏽 done",
    " leading space",
    "   three leading spaces",
    "multiple   spaces    here  ",
    "tab\tseparated",
    "Human: <image>\nHuman: What is this?\nAI: ",
]


@pytest.fixture(scope="module")
def vocab_probe(bundles: dict[str, Path]) -> Iterator[GgufProbe]:
    with GgufProbe(bundles["Q4_K_M"] / llm_filename("Q4_K_M"), vocab_only=True) as g:
        yield g


@pytest.mark.parametrize("text", TEXTS)
def test_llama_cpp_tokenizes_like_sentencepiece(tiny_bin: Path, vocab_probe: GgufProbe, text: str) -> None:
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tiny_bin / "tokenizer.model"))
    ids = vocab_probe.tokenize(text)
    assert ids == sp.encode(text)
    assert vocab_probe.detokenize(ids) == text


# -----------------------------------------------------------------------------------------------------------------
# LoRA


def peft_merged(tiny_bin: Path, state: dict[str, torch.Tensor], adapter: Path, layout: str) -> nn.Module:
    from peft import PeftModel

    base = reference_llama(tiny_bin, state)
    if layout == "llama":
        return PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    owl = nn.Module()  # the adapter's keys are relative to the whole mPLUG-Owl model
    owl.language_model = base
    return PeftModel.from_pretrained(owl, str(adapter)).merge_and_unload().language_model


@pytest.mark.parametrize("layout", ["llama", "mplug"])
def test_lora_merge_matches_peft_merge_and_unload(
    tiny_bin: Path,
    tiny_state: dict[str, torch.Tensor],
    tmp_path: Path,
    layout: str,
    prompts: list[list[int]],
    reference_logits: list[np.ndarray],
) -> None:
    adapter = make_lora_adapter(tiny_bin, tmp_path / f"lora-{layout}", seed=3, key_layout=layout)
    expected = torch_last_logits(peft_merged(tiny_bin, tiny_state, adapter, layout), prompts)
    assert max_abs_diff(expected, reference_logits) > 0.05  # the adapter really changes the model
    out = convert_checkpoint(tiny_bin, tmp_path / "bundle", quant="F32", lora=adapter)
    assert max_abs_diff(gguf_last_logits(out / llm_filename("F32"), prompts), expected) <= 1e-3
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["source"]["lora"]["r"] == 8 and manifest["source"]["lora"]["targets"] == ["q_proj", "v_proj"]


def test_lora_merge_survives_quantization(
    tiny_bin: Path, tiny_state: dict[str, torch.Tensor], tmp_path: Path, prompts: list[list[int]]
) -> None:
    adapter = make_lora_adapter(tiny_bin, tmp_path / "lora", seed=3)
    expected = torch_last_logits(peft_merged(tiny_bin, tiny_state, adapter, "llama"), prompts)
    out = convert_checkpoint(tiny_bin, tmp_path / "bundle", quant="Q8_0", lora=adapter)
    got = gguf_last_logits(out / llm_filename("Q8_0"), prompts)
    assert sum(int(g.argmax() == e.argmax()) for g, e in zip(got, expected, strict=True)) >= 9


# -----------------------------------------------------------------------------------------------------------------
# vision weights


def vision_names(state: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in state if k == "query_tokens" or k.startswith(("vision_model.", "abstractor."))}


@pytest.mark.parametrize(
    ("quant", "dtype"), [("F32", torch.float32), ("F16", torch.float16), ("Q4_K_M", torch.float16)]
)
def test_vision_file_holds_exactly_the_vision_tensors(
    bundles: dict[str, Path], tiny_state: dict[str, torch.Tensor], quant: str, dtype: torch.dtype
) -> None:
    with safe_open(str(bundles[quant] / VISION_FILE), framework="pt") as f:
        assert set(f.keys()) == vision_names(tiny_state)
        for name in f.keys():
            t = f.get_tensor(name)
            assert t.dtype == dtype and t.shape == tiny_state[name].shape
            assert torch.equal(t, tiny_state[name].to(dtype)), name  # bf16 → fp16/fp32 is exact here


def test_vision_file_loads_strictly_into_the_engine(bundles: dict[str, Path], tiny_bin: Path) -> None:
    from owl_desktop.engine.vision import OwlVision

    model = OwlVision(read_checkpoint_config(tiny_bin))
    model.load_state_dict(load_file(str(bundles["F16"] / VISION_FILE)), strict=True)


# -----------------------------------------------------------------------------------------------------------------
# input formats, manifest


FORMAT_NAMES = {
    "bin": "bin",
    "sharded": "sharded-bin",
    "safetensors": "safetensors",
    "sharded-safetensors": "sharded-safetensors",
}


def test_every_input_format_gives_the_same_bundle(ckpt_root: Path, tmp_path: Path) -> None:
    results = {}
    for variant in ("bin", "sharded", "safetensors", "sharded-safetensors"):
        src = make_checkpoint(ckpt_root / f"format-{variant}", variant)
        out = convert_checkpoint(src, tmp_path / variant, quant="F16", bundle_id="same-model")
        manifest = json.loads((out / MANIFEST).read_text())
        assert manifest["source"]["format"] == FORMAT_NAMES[variant]
        results[variant] = out
    first = gguf.GGUFReader(results["bin"] / llm_filename("F16"))
    for variant, out in results.items():
        other = gguf.GGUFReader(out / llm_filename("F16"))
        assert [t.name for t in other.tensors] == [t.name for t in first.tensors]
        for a, b in zip(first.tensors, other.tensors, strict=True):
            assert a.tensor_type == b.tensor_type and np.array_equal(a.data, b.data), (variant, a.name)
        assert bundle.sha256_file(out / VISION_FILE) == bundle.sha256_file(results["bin"] / VISION_FILE)


def test_manifest_hashes_verify_and_config_round_trips(
    bundles: dict[str, Path], tiny_bin: Path, tmp_path: Path
) -> None:
    loaded = bundle.load(bundles["Q4_K_M"], verify=True)
    assert loaded.id == "mplug-owl-tiny-q4_k_m" and loaded.quant == "Q4_K_M"
    assert loaded.config == read_checkpoint_config(tiny_bin)
    assert loaded.source["path"] == str(tiny_bin.resolve()) and loaded.source["format"] == "bin"
    assert set(loaded.files) == {VISION_FILE, llm_filename("Q4_K_M")}
    for name, record in loaded.files.items():
        assert record.sha256 == bundle.sha256_file(loaded.path / name)
    assert loaded.prompt.ai == "AI: "
    assert sorted(p.name for p in loaded.path.iterdir()) == sorted([MANIFEST, VISION_FILE, llm_filename("Q4_K_M")])
    corrupted = shutil.copytree(bundles["Q4_K_M"], tmp_path / "corrupted")
    with open(corrupted / llm_filename("Q4_K_M"), "r+b") as f:
        f.seek(-10, os.SEEK_END)
        f.write(b"\xff" * 10)
    with pytest.raises(BundleError, match="sha256"):
        bundle.load(corrupted, verify=True)


# -----------------------------------------------------------------------------------------------------------------
# refusals: clear one-line error, non-zero exit, nothing left behind


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(["convert", *args])
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err[-1] if err else ""


def assert_nothing_left(out: Path) -> None:
    assert not out.exists()
    if out.parent.is_dir():
        assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")] == []


def copy_checkpoint(tiny_bin: Path, dst: Path) -> Path:
    return Path(shutil.copytree(tiny_bin, dst))


def edit_state(src: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    edit(state)
    torch.save(state, src / "pytorch_model.bin")
    return src


class _RunsCode:
    """A pickle payload that would run a shell command when unpickled with plain pickle. Never unpickled here."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def case_empty_folder(tmp: Path, tiny: Path) -> tuple[Path, list[str]]:
    (tmp / "empty").mkdir()
    return tmp / "empty", []


def case_llama_config(tmp: Path, tiny: Path) -> tuple[Path, list[str]]:
    src = copy_checkpoint(tiny, tmp / "llama")
    (src / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 256}))
    return src, []


def case_no_weights(tmp: Path, tiny: Path) -> tuple[Path, list[str]]:
    src = copy_checkpoint(tiny, tmp / "noweights")
    (src / "pytorch_model.bin").unlink()
    return src, []


def case_truncated_bin(tmp: Path, tiny: Path) -> tuple[Path, list[str]]:
    src = copy_checkpoint(tiny, tmp / "truncated")
    path = src / "pytorch_model.bin"
    os.truncate(path, path.stat().st_size * 6 // 10)
    return src, []


def case_pickle_with_code(tmp: Path, tiny: Path) -> tuple[Path, list[str]]:
    src = copy_checkpoint(tiny, tmp / "evil")
    return edit_state(src, lambda s: s.__setitem__("payload", _RunsCode(tmp / "PWNED"))), []  # type: ignore[arg-type]


def case_no_tokenizer(tmp: Path, tiny: Path) -> tuple[Path, list[str]]:
    src = copy_checkpoint(tiny, tmp / "notok")
    (src / "tokenizer.model").unlink()
    return src, []


def case_wrong_shape(tmp: Path, tiny: Path) -> tuple[Path, list[str]]:
    name = "language_model.model.layers.1.mlp.up_proj.weight"
    src = copy_checkpoint(tiny, tmp / "shape")
    return edit_state(src, lambda s: s.__setitem__(name, torch.zeros(511, 256, dtype=torch.bfloat16))), []


def case_missing_tensor(tmp: Path, tiny: Path) -> tuple[Path, list[str]]:
    src = copy_checkpoint(tiny, tmp / "missing")
    return edit_state(src, lambda s: s.pop("abstractor.vit_eos")), []


def case_lora_other_base(tmp: Path, tiny: Path) -> tuple[Path, list[str]]:
    adapter = make_lora_adapter(tiny, tmp / "lora-128", text_hidden_override=128)
    return tiny, ["--lora", str(adapter)]


def case_lora_missing_layer(tmp: Path, tiny: Path) -> tuple[Path, list[str]]:
    adapter = make_lora_adapter(tiny, tmp / "lora-deep")
    weights = adapter / "adapter_model.safetensors"
    state = {k.replace(".layers.1.", ".layers.7."): v for k, v in load_file(str(weights)).items()}
    save_file(state, str(weights))
    return tiny, ["--lora", str(adapter)]


BAD_INPUTS = {
    "empty folder": (case_empty_folder, "has no config.json"),
    "not mPLUG-Owl": (case_llama_config, "model_type 'llama'"),
    "no weights": (case_no_weights, "has no weights"),
    "truncated bin": (case_truncated_bin, "pytorch_model.bin is truncated or corrupted"),
    "pickle with code": (case_pickle_with_code, "carries code"),
    "no tokenizer": (case_no_tokenizer, "no tokenizer.model"),
    "wrong shape": (case_wrong_shape, "up_proj.weight has shape [511, 256], expected [512, 256]"),
    "missing tensor": (case_missing_tensor, "missing tensor abstractor.vit_eos"),
    "LoRA for another base": (case_lora_other_base, "does not fit this model"),
    "LoRA for a deeper model": (case_lora_missing_layer, "layers.7.self_attn"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_cleanly(
    case: str, tiny_bin: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    build, fragment = BAD_INPUTS[case]
    src, extra = build(tmp_path, tiny_bin)
    out = tmp_path / "models" / "bundle"
    rc, err = run_cli([str(src), "--out", str(out), "--quant", "Q4_K_M", *extra], capsys)
    assert rc != 0
    assert err.startswith("owl-desktop: error: ") and fragment in err, err
    assert_nothing_left(out)
    assert not (tmp_path / "PWNED").exists()


def test_pickle_with_code_names_the_call(tiny_bin: Path, tmp_path: Path) -> None:
    src, _ = case_pickle_with_code(tmp_path, tiny_bin)
    with pytest.raises(Exception, match=r"refusing to load pytorch_model\.bin.*(system|posix)"):
        open_checkpoint(src)
    assert not (tmp_path / "PWNED").exists()


def test_target_under_a_file_is_refused(tiny_bin: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "plain-file").write_text("x")
    out = tmp_path / "plain-file" / "bundle"
    rc, err = run_cli([str(tiny_bin), "--out", str(out), "--quant", "F16"], capsys)
    assert rc != 0 and "cannot write to" in err and "not a folder" in err
    assert (tmp_path / "plain-file").read_text() == "x"


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mount tmpfs file systems (root only: the CI runs as root, where chmod alone cannot make a folder read-only)."""
    mounted: list[Path] = []

    def mount(options: str) -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        rc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True
        ).returncode
        if rc != 0:
            pytest.skip("cannot mount a tmpfs here (needs root and mount rights)")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], capture_output=True)


def test_read_only_target_is_refused(
    tiny_bin: Path, small_tmpfs: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    root = small_tmpfs("size=64m,ro")
    rc, err = run_cli([str(tiny_bin), "--out", str(root / "bundle"), "--quant", "F16"], capsys)
    assert rc != 0 and err == f"owl-desktop: error: cannot write to {root} (read-only file system)"
    assert list(root.iterdir()) == []


def test_full_disk_is_refused_before_writing(
    tiny_bin: Path, small_tmpfs: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    root = small_tmpfs("size=2m")
    rc, err = run_cli([str(tiny_bin), "--out", str(root / "bundle"), "--quant", "Q4_K_M"], capsys)
    assert rc != 0 and f"not enough disk space in {root}: the conversion needs about" in err
    assert list(root.iterdir()) == []


def test_disk_filling_up_while_writing_is_reported(tiny_bin: Path, small_tmpfs: Callable[[str], Path]) -> None:
    root = small_tmpfs("size=3m")  # room for the vision file, not for the GGUF
    out = root / "bundle"
    with pytest.raises(ConversionError, match=f"^not enough disk space in {root}$"):
        convert_checkpoint(tiny_bin, out, quant="F32", free_space=lambda _: 1 << 40)  # a probe that lies
    assert list(root.iterdir()) == []


def test_free_space_probe_refusal(tiny_bin: Path, tmp_path: Path) -> None:
    out = tmp_path / "models" / "bundle"
    with pytest.raises(ConversionError, match="not enough disk space .* needs about .* MiB, 0.0 MiB is free"):
        convert_checkpoint(tiny_bin, out, quant="Q4_K_M", free_space=lambda _: 0)
    assert not out.parent.exists()


def test_existing_targets(tiny_bin: Path, tmp_path: Path) -> None:
    out = convert_checkpoint(tiny_bin, tmp_path / "b", quant="F16", bundle_id="mine")
    again = convert_checkpoint(tiny_bin, out, quant="F16", bundle_id="mine")  # same id: replaced
    assert bundle.load(again, verify=True).id == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["b"]
    with pytest.raises(ConversionError, match="holds another model bundle"):
        convert_checkpoint(tiny_bin, out, quant="F16", bundle_id="other")
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ConversionError, match="also notes.txt"):
        convert_checkpoint(tiny_bin, out, quant="F16", bundle_id="mine")
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"jpeg")
    with pytest.raises(ConversionError, match="already exists and is not empty"):
        convert_checkpoint(tiny_bin, foreign, quant="F16")
    assert (out / "notes.txt").read_text() == "keep me" and (foreign / "cat.jpg").read_bytes() == b"jpeg"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (convert_checkpoint(tiny_bin, empty, quant="F16") / MANIFEST).is_file()


# -----------------------------------------------------------------------------------------------------------------
# CLI success, cancellation, page release


def test_cli_converts_into_the_models_folder_by_default(tiny_bin: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from owl_desktop import paths

    assert main(["convert", str(tiny_bin), "--quant", "f16", "--id", "cli test"]) == 0
    out = paths.models_dir() / "cli-test"
    assert f"bundle written to {out}" in capsys.readouterr().out
    assert bundle.load("cli-test", verify=True).quant == "F16"


@pytest.mark.parametrize(
    "stage", ["writing vision weights", "writing BF16 language model", "quantizing to Q4_K_M", "hashing"]
)
def test_cancel_from_another_thread_leaves_nothing(tiny_bin: Path, tmp_path: Path, stage: str) -> None:
    token = CancelToken()
    reached, cancelled = threading.Event(), threading.Event()

    def on_progress(p: Progress) -> None:
        if p.stage.startswith(stage) and not reached.is_set():
            reached.set()
            assert cancelled.wait(30)  # the conversion is held mid-stage until the other thread has cancelled

    def canceller() -> None:
        if reached.wait(60):
            token.cancel()
        cancelled.set()

    thread = threading.Thread(target=canceller)
    thread.start()
    out = tmp_path / "bundle"
    try:
        with pytest.raises(Cancelled):
            convert_checkpoint(tiny_bin, out, quant="Q4_K_M", task=Task(on_progress, token))
    finally:
        reached.set()
        thread.join()
    assert_nothing_left(out)
    assert multiprocessing.active_children() == []  # the quantizer was stopped


def test_page_release_only_touches_file_mappings(tiny_bin: Path) -> None:
    with open_checkpoint(tiny_bin) as ckpt:
        name = "language_model.model.embed_tokens.weight"
        tensor = ckpt.load(name)
        before = tensor.clone()
        mappings = FileMappings.find(tiny_bin / "pytorch_model.bin")
        assert mappings.ranges, "torch.load(mmap=True) should map the file"
        assert mappings.release(tensor) >= tensor.numel() * 2
        assert torch.equal(tensor, before)  # the pages are read back from the file
        anonymous = torch.ones(4096)
        assert mappings.release(anonymous) == 0 and bool((anonymous == 1).all())


def test_leftovers_of_a_killed_conversion_are_removed(tiny_bin: Path, tmp_path: Path) -> None:
    dead = tmp_path / ".bundle.converting-999999999-x"  # no such process
    alive = tmp_path / f".bundle.converting-{os.getpid()}-y"  # a conversion still running in this process
    for folder in (dead, alive):
        folder.mkdir()
        (folder / "vision.safetensors").write_bytes(b"partial")
    convert_checkpoint(tiny_bin, tmp_path / "bundle", quant="F16")
    assert not dead.exists() and alive.exists()
