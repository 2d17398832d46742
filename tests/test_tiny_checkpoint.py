"""The random mPLUG-Owl checkpoint builder: layout, dtypes, key names, tokenizer, LoRA adapter, determinism, CLI."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
import sentencepiece
import torch

from owl_desktop.cli import main
from owl_desktop.devtools import tiny_checkpoint as tc
from owl_desktop.model_config import OwlConfig

# peft's from_pretrained calls a transformers API deprecated in 5.x; nothing of ours.
_PEFT_LOAD_WARNING = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


# ---------------------------------------------------------------------------------------------------------------
# The key list of reference §2.3, written out independently of the builder.


def reference_keys(cfg: OwlConfig) -> set[str]:
    keys = {"query_tokens"}
    v = "vision_model"
    keys |= {
        f"{v}.embeddings.cls_token",
        f"{v}.embeddings.patch_embed.weight",
        f"{v}.embeddings.position_embedding",
        f"{v}.embeddings.pre_layernorm.weight",
        f"{v}.embeddings.pre_layernorm.bias",
        f"{v}.post_layernorm.weight",
        f"{v}.post_layernorm.bias",
    }
    for i in range(cfg.vision.num_hidden_layers):
        for mod in ("input_layernorm", "self_attn.query_key_value", "self_attn.dense", "post_attention_layernorm"):
            keys |= {f"{v}.encoder.layers.{i}.{mod}.weight", f"{v}.encoder.layers.{i}.{mod}.bias"}
        for mod in ("mlp.fc1", "mlp.fc2"):
            keys |= {f"{v}.encoder.layers.{i}.{mod}.weight", f"{v}.encoder.layers.{i}.{mod}.bias"}
    for i in range(cfg.abstractor.num_hidden_layers):
        c = f"abstractor.encoder.layers.{i}.crossattention"
        mods = [
            "norm1",
            "normk",
            "attention.query",
            "attention.key",
            "attention.value",
            "output.out_proj",
            "output.norm2",
            "output.mlp.w1",
            "output.mlp.w2",
            "output.mlp.w3",
            "output.mlp.ffn_ln",
        ]
        for mod in mods:
            keys |= {f"{c}.{mod}.weight", f"{c}.{mod}.bias"}
    keys |= {"abstractor.visual_fc.weight", "abstractor.visual_fc.bias", "abstractor.vit_eos"}
    lm = "language_model.model"
    keys |= {f"{lm}.embed_tokens.weight", f"{lm}.norm.weight", "language_model.lm_head.weight"}
    for i in range(cfg.text.num_hidden_layers):
        for mod in ("q_proj", "k_proj", "v_proj", "o_proj"):
            keys.add(f"{lm}.layers.{i}.self_attn.{mod}.weight")
        keys.add(f"{lm}.layers.{i}.self_attn.rotary_emb.inv_freq")
        for mod in ("gate_proj", "up_proj", "down_proj"):
            keys.add(f"{lm}.layers.{i}.mlp.{mod}.weight")
        keys |= {f"{lm}.layers.{i}.input_layernorm.weight", f"{lm}.layers.{i}.post_attention_layernorm.weight"}
    return keys


# ---------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def tiny_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tc.make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "bin", seed=0)


@pytest.fixture(scope="module")
def tiny_state(tiny_bin: Path) -> dict[str, torch.Tensor]:
    return torch.load(tiny_bin / "pytorch_model.bin", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def tiny_config(tiny_bin: Path) -> OwlConfig:
    return OwlConfig.from_dict(json.loads((tiny_bin / "config.json").read_text()))


def _llama_from_checkpoint(config: OwlConfig, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tc.llama_config_for(config.text))
    prefix = "language_model."
    llm_state = {k[len(prefix) :]: v.float() for k, v in state.items() if k.startswith(prefix) and "inv_freq" not in k}
    missing, unexpected = model.load_state_dict(llm_state, strict=False)
    assert not unexpected
    assert all("rotary_emb" in k for k in missing), missing
    return model.eval().float()


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_ids_and_round_trip(tmp_path: Path) -> None:
    tc.tokenizer_model_bytes.cache_clear()
    start = time.monotonic()
    path = tc.train_tokenizer(tmp_path / "tokenizer.model")
    assert time.monotonic() - start < 5.0
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    assert sp.get_piece_size() == 1000
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert sp.id_to_piece(3) == "<0x00>" and sp.id_to_piece(3 + 0x0A) == "<0x0A>" and sp.id_to_piece(258) == "<0xFF>"
    texts = [
        "Human: What is in the image?\nAI: ",
        "The café in Zürich costs 12.50 EUR — naïve façade.",
        "漢字とカタカナ 한국어",
        "owl 🦉 thumbs 👍🏽!",
        "  two  spaces\ttab\n\nlines  ",
        "Ａ① full-width",  # identity normalisation: NFKC would turn this into "A1 full-width"
    ]
    for text in texts:
        ids = sp.encode(text)
        assert 0 not in ids, f"unk in {text!r}"  # byte fallback covers everything
        assert sp.decode(ids) == text
    # Digits are split one per piece; the dummy prefix is added; unknown characters go through bytes.
    assert sp.encode("2024", out_type=str) == ["▁", "2", "0", "2", "4"]
    assert sp.encode("the", out_type=str)[0].startswith("▁")
    assert sp.encode("🦉", out_type=str)[1:] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x89>"]


def test_tokenizer_is_deterministic(tmp_path: Path) -> None:
    first = tc.train_tokenizer(tmp_path / "a.model").read_bytes()
    tc.tokenizer_model_bytes.cache_clear()
    second = tc.train_tokenizer(tmp_path / "b.model").read_bytes()
    assert first == second
    assert tc.train_tokenizer(tmp_path / "c.model", vocab_size=800).read_bytes() != first


# ---------------------------------------------------------------------------------------------------------------
# Config and weights


def test_config_json_parses_with_expected_shapes(tiny_bin: Path, tiny_config: OwlConfig) -> None:
    raw = json.loads((tiny_bin / "config.json").read_text())
    assert raw["model_type"] == "mplug-owl"
    assert raw["architectures"] == ["MplugOwlForConditionalGeneration"]
    assert raw["vision_config"]["model_type"] == "mplug_owl_vision_model"
    assert raw["visual_abstractor_config"]["model_type"] == "mplug_owl_visual_abstract"
    assert raw["text_config"]["model_type"] == "llama"
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "rms_norm_eps", "vocab_size"):
        assert raw[key] == raw["text_config"][key]  # duplicated at the top level like the release
    cfg = tiny_config
    assert cfg.num_query_tokens == 64 and cfg.vision.num_positions == 257
    assert (cfg.vision.hidden_size, cfg.vision.intermediate_size, cfg.vision.num_hidden_layers) == (64, 128, 2)
    assert cfg.vision.num_attention_heads == 4
    assert cfg.abstractor.hidden_size == cfg.abstractor.encoder_hidden_size == 64
    assert (cfg.abstractor.num_hidden_layers, cfg.abstractor.num_attention_heads) == (2, 4)
    assert cfg.abstractor.intermediate_size == 96
    t = cfg.text
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads) == (256, 512, 2, 4)
    assert (t.rms_norm_eps, t.max_position_embeddings, t.bos_token_id, t.eos_token_id, t.pad_token_id) == (
        1e-6,
        2048,
        1,
        2,
        0,
    )
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tiny_bin / "tokenizer.model"))
    assert t.vocab_size == sp.get_piece_size() == 1000
    pre = json.loads((tiny_bin / "preprocessor_config.json").read_text())
    assert pre["resolution"] == 224 and pre["image_mean"][0] == pytest.approx(0.48145466)
    special = json.loads((tiny_bin / "special_tokens_map.json").read_text())
    assert special["pad_token"]["content"] == "<unk>" and special["bos_token"]["content"] == "<s>"
    tok_cfg = json.loads((tiny_bin / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "LlamaTokenizer"
    assert json.loads((tiny_bin / "generation_config.json").read_text())["eos_token_id"] == 2


def test_bin_keys_dtypes_and_shapes(tiny_state: dict[str, torch.Tensor], tiny_config: OwlConfig) -> None:
    assert set(tiny_state) == reference_keys(tiny_config)
    for name, tensor in tiny_state.items():
        expected = torch.float32 if name.endswith("rotary_emb.inv_freq") else torch.bfloat16
        assert tensor.dtype == expected, name
    v, t = tiny_config.vision, tiny_config.text
    shapes = {
        "query_tokens": (1, 64, 64),
        "vision_model.embeddings.cls_token": (1, 1, v.hidden_size),
        "vision_model.embeddings.patch_embed.weight": (64, 3, 14, 14),
        "vision_model.embeddings.position_embedding": (1, 257, 64),
        "vision_model.encoder.layers.1.self_attn.query_key_value.weight": (192, 64),
        "vision_model.encoder.layers.0.mlp.fc1.weight": (128, 64),
        "abstractor.encoder.layers.1.crossattention.output.mlp.w2.weight": (64, 96),
        "abstractor.encoder.layers.0.crossattention.output.mlp.ffn_ln.bias": (96,),
        "abstractor.encoder.layers.0.crossattention.attention.key.weight": (64, 64),
        "abstractor.visual_fc.weight": (t.hidden_size, 64),
        "abstractor.vit_eos": (1, 1, t.hidden_size),
        "language_model.model.embed_tokens.weight": (1000, 256),
        "language_model.model.layers.1.mlp.down_proj.weight": (256, 512),
        "language_model.model.layers.0.self_attn.rotary_emb.inv_freq": (32,),
        "language_model.lm_head.weight": (1000, 256),
    }
    for name, shape in shapes.items():
        assert tuple(tiny_state[name].shape) == shape, name
    hd = t.head_dim
    expected_inv_freq = 1.0 / 10000 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    inv_freq = tiny_state["language_model.model.layers.1.self_attn.rotary_emb.inv_freq"]
    torch.testing.assert_close(inv_freq, expected_inv_freq)


def test_parameters_are_randomised_non_trivially(tiny_state: dict[str, torch.Tensor]) -> None:
    for name in ("query_tokens", "abstractor.vit_eos", "vision_model.embeddings.cls_token"):
        assert tiny_state[name].float().std() > 0.1, name
    ln_w = tiny_state["abstractor.encoder.layers.0.crossattention.normk.weight"].float()
    ln_b = tiny_state["vision_model.embeddings.pre_layernorm.bias"].float()
    rms_w = tiny_state["language_model.model.norm.weight"].float()
    assert 0.95 < ln_w.mean() < 1.05 and 0.05 < ln_w.std() < 0.2
    assert ln_b.abs().mean() > 0.03
    assert 0.05 < rms_w.std() < 0.2
    # Every tensor differs from every other one (no shared generator state).
    weights = [t for k, t in tiny_state.items() if "inv_freq" not in k]
    digests = [hashlib.sha256(t.float().numpy().tobytes()).hexdigest() for t in weights]
    assert len(set(digests)) == len(digests)


def test_llm_logits_have_a_clear_top1(tiny_config: OwlConfig, tiny_state: dict[str, torch.Tensor]) -> None:
    model = _llama_from_checkpoint(tiny_config, tiny_state)
    ids = torch.randint(3, 1000, (4, 24), generator=torch.Generator().manual_seed(0))  # [4, 24]
    with torch.no_grad():
        logits = model(input_ids=ids).logits  # [4, 24, 1000]
    top2 = logits.topk(2, dim=-1).values  # [4, 24, 2]
    gaps = (top2[..., 0] - top2[..., 1]).flatten()
    assert (gaps > 0.05).float().mean() > 0.75, gaps
    assert logits.std() > 0.5
    # The output depends on the input: different prompts, different greedy tokens.
    assert len(set(logits[:, -1].argmax(-1).tolist())) > 1


def test_same_seed_same_bytes_other_seed_different(tmp_path: Path, tiny_state: dict[str, torch.Tensor]) -> None:
    again = tc.make_checkpoint(tmp_path / "again", "bin", seed=0)
    other = tc.make_checkpoint(tmp_path / "other", "bin", seed=1)
    state_again = torch.load(again / "pytorch_model.bin", weights_only=True)
    state_other = torch.load(other / "pytorch_model.bin", weights_only=True)
    assert list(state_again) == list(tiny_state)
    for name, tensor in tiny_state.items():
        assert state_again[name].view(-1).view(torch.uint8).numpy().tobytes() == (
            tensor.view(-1).view(torch.uint8).numpy().tobytes()
        ), name
    assert not torch.equal(state_other["language_model.lm_head.weight"], tiny_state["language_model.lm_head.weight"])
    assert (again / "tokenizer.model").read_bytes() == (other / "tokenizer.model").read_bytes()


# ---------------------------------------------------------------------------------------------------------------
# Variants


def test_sharded_index_covers_every_key_once(tmp_path: Path, tiny_state: dict[str, torch.Tensor]) -> None:
    out = tc.make_checkpoint(tmp_path / "ft", "sharded", seed=0)
    assert not (out / "pytorch_model.bin").exists()
    index = json.loads((out / "pytorch_model.bin.index.json").read_text())
    shard_names = sorted(set(index["weight_map"].values()))
    assert shard_names == ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    seen: list[str] = []
    total = 0
    for shard in shard_names:
        part = torch.load(out / shard, weights_only=True)
        assert all(index["weight_map"][k] == shard for k in part)
        seen += list(part)
        total += sum(t.numel() * t.element_size() for t in part.values())
        for name, tensor in part.items():
            assert torch.equal(tensor, tiny_state[name]), name
    assert sorted(seen) == sorted(index["weight_map"]) == sorted(tiny_state)
    assert len(seen) == len(set(seen))
    assert index["metadata"]["total_size"] == total


@pytest.mark.parametrize("variant", ["safetensors", "sharded-safetensors"])
def test_safetensors_variants_hold_the_same_tensors(
    tmp_path: Path, variant: str, tiny_state: dict[str, torch.Tensor]
) -> None:
    from safetensors import safe_open

    out = tc.make_checkpoint(tmp_path / variant, variant, seed=0)
    if variant == "safetensors":
        files = [out / "model.safetensors"]
    else:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        files = [out / name for name in sorted(set(index["weight_map"].values()))]
        assert len(files) == 2
    loaded: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                assert key not in loaded
                loaded[key] = f.get_tensor(key)
    assert set(loaded) == set(tiny_state)
    for name, tensor in tiny_state.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    assert not (out / "pytorch_model.bin").exists()


def test_ureader_variant_is_the_release_layout_in_float32(
    tmp_path: Path, tiny_state: dict[str, torch.Tensor], tiny_config: OwlConfig
) -> None:
    from owl_desktop.model_family import CUT_EMBEDDING_H, CUT_EMBEDDING_W

    out = tc.make_checkpoint(tmp_path / "ureader", "ureader", seed=0)
    names = sorted(p.name for p in out.iterdir())
    shards = [f"pytorch_model-0000{i}-of-00003.bin" for i in (1, 2, 3)]
    side = ["config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json"]
    assert names == sorted([*side, *shards, "pytorch_model.bin.index.json"])  # as on Mizukiluke/ureader-v1
    index = json.loads((out / "pytorch_model.bin.index.json").read_text())
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        part = torch.load(out / shard, weights_only=True)
        assert part and all(index["weight_map"][k] == shard for k in part)
        state.update(part)
    assert sorted(state) == sorted(index["weight_map"]) == sorted([*tiny_state, CUT_EMBEDDING_H, CUT_EMBEDDING_W])
    assert all(t.dtype == torch.float32 for t in state.values())
    for name, tensor in tiny_state.items():  # the same draws as the bf16 checkpoint, stored wider
        if tensor.dtype == torch.bfloat16:
            assert torch.equal(state[name].bfloat16(), tensor), name
    for name in (CUT_EMBEDDING_H, CUT_EMBEDDING_W):
        table = state[name]
        assert table.shape == (15, tiny_config.abstractor.hidden_size)
        assert 0.4 < table.std().item() < 0.6 and table.abs().sum(-1).min() > 0  # every row is random
    assert not torch.equal(state[CUT_EMBEDDING_H], state[CUT_EMBEDDING_W])
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in state.values())


def test_rebuilding_another_variant_leaves_no_stale_weights(tmp_path: Path) -> None:
    out = tc.make_checkpoint(tmp_path / "re", "sharded")
    tc.make_checkpoint(out, "safetensors")
    weight_files = sorted(p.name for p in out.iterdir() if p.suffix in (".bin", ".safetensors") or "index" in p.name)
    assert weight_files == ["model.safetensors"]


@pytest.fixture(scope="module")
def lora_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tc.make_checkpoint(tmp_path_factory.mktemp("lora") / "owl", "lora", seed=0)


def test_lora_adapter_format(lora_checkpoint: Path, tiny_config: OwlConfig) -> None:
    from safetensors.torch import load_file

    adapter = tc.lora_adapter_dir(lora_checkpoint)
    assert adapter == lora_checkpoint.parent / "owl-lora"
    assert (lora_checkpoint / "pytorch_model.bin").is_file()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 32
    assert cfg["lora_dropout"] == pytest.approx(0.05)
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    assert cfg["base_model_name_or_path"] == str(lora_checkpoint)
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    h = tiny_config.text.hidden_size
    expected = set()
    for i in range(tiny_config.text.num_hidden_layers):
        for proj in ("q_proj", "v_proj"):
            expected |= {f"base_model.model.model.layers.{i}.self_attn.{proj}.lora_{ab}.weight" for ab in "AB"}
    assert set(weights) == expected
    assert weights["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (8, h)
    assert weights["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].shape == (h, 8)
    assert all(w.abs().sum() > 0 for w in weights.values())  # B is not peft's zero init


@_PEFT_LOAD_WARNING
def test_lora_adapter_loads_with_peft_and_changes_output(lora_checkpoint: Path) -> None:
    from peft import PeftModel

    state = torch.load(lora_checkpoint / "pytorch_model.bin", weights_only=True)
    config = OwlConfig.from_dict(json.loads((lora_checkpoint / "config.json").read_text()))
    ids = torch.tensor([[1, 287, 923, 377, 264, 293]])  # [1, 6]
    base = _llama_from_checkpoint(config, state)
    with torch.no_grad():
        before = base(input_ids=ids).logits  # [1, 6, V]
    model = PeftModel.from_pretrained(base, str(tc.lora_adapter_dir(lora_checkpoint))).eval()
    with torch.no_grad():
        after = model(input_ids=ids).logits
        merged = model.merge_and_unload()(input_ids=ids).logits
    assert (after - before).abs().max() > 0.1
    torch.testing.assert_close(merged, after, atol=1e-4, rtol=1e-4)


@_PEFT_LOAD_WARNING
def test_lora_adapter_for_another_base_does_not_fit(lora_checkpoint: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    wrong = tc.make_lora_adapter(lora_checkpoint, tmp_path / "wrong", text_hidden_override=128)
    state = torch.load(lora_checkpoint / "pytorch_model.bin", weights_only=True)
    config = OwlConfig.from_dict(json.loads((lora_checkpoint / "config.json").read_text()))
    base = _llama_from_checkpoint(config, state)
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(base, str(wrong))


def test_lora_adapter_mplug_key_layout(lora_checkpoint: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    out = tc.make_lora_adapter(lora_checkpoint, tmp_path / "mplug", key_layout="mplug")
    keys = set(load_file(str(out / "adapter_model.safetensors")))
    assert "base_model.model.language_model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert all(k.startswith("base_model.model.language_model.model.layers.") for k in keys)
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == tc.LORA_TARGET_REGEX_MPLUG


def test_lora_adapter_is_deterministic(lora_checkpoint: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    adapter = tc.lora_adapter_dir(lora_checkpoint)
    again = tc.make_lora_adapter(lora_checkpoint, tmp_path / "again", seed=1)
    first = load_file(str(adapter / "adapter_model.safetensors"))
    second = load_file(str(again / "adapter_model.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


# ---------------------------------------------------------------------------------------------------------------
# Presets and CLI


def test_bench_preset_is_about_three_gigabytes() -> None:
    cfg = tc.preset_config("bench")
    specs = tc.checkpoint_specs(cfg)
    total = sum(s.nbytes for s in specs)
    assert 2.6e9 < total < 3.4e9
    assert cfg.text.vocab_size == 1000 and cfg.vision.hidden_size == 1024 and cfg.vision.num_hidden_layers == 24
    assert {s.name for s in specs} == reference_keys(cfg)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("OWL_SLOW_TESTS"), reason="set OWL_SLOW_TESTS=1 to build the ~3 GB checkpoint")
def test_bench_build(tmp_path: Path) -> None:
    out = tc.make_checkpoint(tmp_path / "bench", "bin", preset="bench")
    assert 2.6e9 < (out / "pytorch_model.bin").stat().st_size < 3.4e9


def test_cli_make_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli-ckpt"
    assert main(["dev", "make-checkpoint", str(out), "--variant", "sharded", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "MiB" in printed
    assert (out / "pytorch_model.bin.index.json").is_file() and (out / "tokenizer.model").is_file()
    OwlConfig.from_dict(json.loads((out / "config.json").read_text()))


def test_cli_choices_match_the_builder() -> None:
    from owl_desktop.commands import dev

    assert dev._VARIANTS == tc.VARIANTS
    assert set(dev._PRESETS) == set(tc.PRESETS)
    with pytest.raises(SystemExit):
        main(["dev", "make-checkpoint", "x", "--variant", "nope"])
