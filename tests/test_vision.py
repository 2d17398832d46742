"""The torch vision tower against a per-head, loop-by-loop restatement of the reference maths written here.

UReader's tower is the same, plus a crop position vector (cut_patch_embedding_h[row] + cut_patch_embedding_w[col])
· 0.5 added to the 64 query outputs of each view before visual_fc (UReader/mplug_owl/modeling_mplug_owl.py,
MplugOwlVisualAbstractorModel.forward, patch_pos_embed_type "post"); the restatement takes an optional position.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from owl_desktop.engine import vision
from owl_desktop.engine.vision import OwlVision, VisionEncoder
from owl_desktop.errors import BundleError, Cancelled, EngineError
from owl_desktop.model_config import AbstractorConfig, OwlConfig, TextConfig, VisionConfig
from owl_desktop.tasks import CancelToken, Task


def tiny_config(vision_eps: float = 1e-6, abstractor_eps: float = 1e-6) -> OwlConfig:
    return OwlConfig(
        vision=VisionConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, layer_norm_eps=vision_eps
        ),
        abstractor=AbstractorConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=96,
            encoder_hidden_size=64,
            layer_norm_eps=abstractor_eps,
        ),
        text=TextConfig(hidden_size=256),
        num_query_tokens=64,
    )


def random_state_dict(config: OwlConfig, seed: int = 0, crop_positions: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor random: LayerNorms ~N(1,0.1)/N(0,0.1), learned vectors and embeddings too."""
    g = torch.Generator().manual_seed(seed)
    norm_names = ("layernorm", "norm1", "normk", "norm2", "ffn_ln")
    out = {}
    for name, t in OwlVision(config, crop_positions).state_dict().items():
        is_norm = any(f".{n}." in name for n in norm_names)
        if ".cut_patch_embedding_" in name:  # crop position tables: as large as the other learned vectors
            out[name] = 0.5 * torch.randn(t.shape, generator=g)
        elif is_norm and name.endswith(".weight"):
            out[name] = 1.0 + 0.1 * torch.randn(t.shape, generator=g)
        elif is_norm:
            out[name] = 0.1 * torch.randn(t.shape, generator=g)
        elif name.endswith(".weight"):
            out[name] = torch.randn(t.shape, generator=g) / math.sqrt(t[0].numel())
        elif name.endswith(".bias"):
            out[name] = 0.1 * torch.randn(t.shape, generator=g)
        else:  # cls_token, position_embedding, query_tokens, vit_eos
            out[name] = 0.5 * torch.randn(t.shape, generator=g)
    return out


# -----------------------------------------------------------------------------------------------------------------
# the reference maths, restated one image and one head at a time in float64


def _ln(x: torch.Tensor, sd: dict[str, torch.Tensor], name: str, eps: float) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * sd[name + ".weight"] + sd[name + ".bias"]


def _lin(x: torch.Tensor, sd: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def _softmax(s: torch.Tensor) -> torch.Tensor:
    e = torch.exp(s - s.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def reference_image_rows(
    sd32: dict[str, torch.Tensor], cfg: OwlConfig, px: torch.Tensor, position: tuple[int, int] | None = None
) -> torch.Tensor:
    sd = {k: v.double() for k, v in sd32.items()}
    v_cfg, a_cfg = cfg.vision, cfg.abstractor
    d, p = v_cfg.hidden_size, v_cfg.patch_size
    g = v_cfg.image_size // p
    eps = v_cfg.layer_norm_eps
    img = px.double()  # [3, 224, 224]
    # patch embedding as a matmul over raster-ordered 14×14 patches
    patches = img.reshape(3, g, p, g, p).permute(1, 3, 0, 2, 4).reshape(g * g, 3 * p * p)
    x = patches @ sd["vision_model.embeddings.patch_embed.weight"].reshape(d, -1).T  # [256, d]
    x = torch.cat([sd["vision_model.embeddings.cls_token"][0], x]) + sd["vision_model.embeddings.position_embedding"][0]
    x = _ln(x, sd, "vision_model.embeddings.pre_layernorm", eps)
    n_head = v_cfg.num_attention_heads
    hd = d // n_head
    for i in range(v_cfg.num_hidden_layers):
        pre = f"vision_model.encoder.layers.{i}"
        h = _ln(x, sd, f"{pre}.input_layernorm", eps)
        w = sd[f"{pre}.self_attn.query_key_value.weight"]
        b = sd[f"{pre}.self_attn.query_key_value.bias"]
        heads = []
        for head in range(n_head):
            r = head * 3 * hd  # this head's rows: q_h, then k_h, then v_h
            q = h @ w[r : r + hd].T + b[r : r + hd]
            k = h @ w[r + hd : r + 2 * hd].T + b[r + hd : r + 2 * hd]
            v = h @ w[r + 2 * hd : r + 3 * hd].T + b[r + 2 * hd : r + 3 * hd]
            heads.append(_softmax(q @ k.T * hd**-0.5) @ v)
        x = x + _lin(torch.cat(heads, dim=-1), sd, f"{pre}.self_attn.dense")
        f = _lin(_ln(x, sd, f"{pre}.post_attention_layernorm", eps), sd, f"{pre}.mlp.fc1")
        f = f / (1.0 + torch.exp(-1.702 * f))
        x = x + _lin(f, sd, f"{pre}.mlp.fc2")
    image = _ln(x, sd, "vision_model.post_layernorm", eps)  # [257, d]

    n_head = a_cfg.num_attention_heads
    hd = a_cfg.hidden_size // n_head
    hq = sd["query_tokens"][0]  # [64, d]
    for i in range(a_cfg.num_hidden_layers):
        pre = f"abstractor.encoder.layers.{i}.crossattention"
        q_in = _ln(hq, sd, f"{pre}.norm1", 1e-5)
        kv_in = torch.cat([q_in, _ln(image, sd, f"{pre}.normk", 1e-5)])  # [64 + 257, d]
        q_all = _lin(q_in, sd, f"{pre}.attention.query")
        k_all = _lin(kv_in, sd, f"{pre}.attention.key")
        v_all = _lin(kv_in, sd, f"{pre}.attention.value")
        heads = []
        for head in range(n_head):
            c = slice(head * hd, (head + 1) * hd)
            heads.append(_softmax(q_all[:, c] @ k_all[:, c].T / math.sqrt(hd)) @ v_all[:, c])
        h = q_in + _lin(torch.cat(heads, dim=-1), sd, f"{pre}.output.out_proj")
        u = _ln(h, sd, f"{pre}.output.norm2", 1e-5)
        a = _lin(u, sd, f"{pre}.output.mlp.w1")
        gated = a / (1.0 + torch.exp(-a)) * _lin(u, sd, f"{pre}.output.mlp.w3")
        hq = h + _lin(_ln(gated, sd, f"{pre}.output.mlp.ffn_ln", a_cfg.layer_norm_eps), sd, f"{pre}.output.mlp.w2")
    if position is not None:  # UReader: the view's crop position vector, on every query row
        row, col = position
        hq = (
            hq
            + (sd["abstractor.cut_patch_embedding_h.weight"][row] + sd["abstractor.cut_patch_embedding_w.weight"][col])
            * 0.5
        )
    out = _lin(hq, sd, "abstractor.visual_fc")  # [64, n_embd]
    return torch.cat([out, sd["abstractor.vit_eos"][0]])  # [65, n_embd]


# -----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> tuple[OwlConfig, dict[str, torch.Tensor], torch.Tensor]:
    cfg = tiny_config()
    return cfg, random_state_dict(cfg), torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("eps", [(1e-6, 1e-6), (0.05, 0.2)], ids=["default-eps", "large-eps"])
def test_matches_reference_maths(eps: tuple[float, float]) -> None:
    # Large eps values make a LayerNorm that takes the wrong eps (config vs the abstractor's fixed 1e-5) visible.
    cfg = tiny_config(*eps)
    sd = random_state_dict(cfg, seed=2)
    px = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    model = OwlVision(cfg).eval()
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        got = model(px)
    assert got.shape == (2, 65, 256)
    for b in range(2):
        want = reference_image_rows(sd, cfg, px[b])
        assert want.abs().max() > 0.5  # the outputs carry signal
        assert (got[b].double() - want).abs().max().item() <= 1e-4


def test_encoder_output_contract(tiny: tuple[OwlConfig, dict[str, torch.Tensor], torch.Tensor]) -> None:
    cfg, sd, px = tiny
    enc = VisionEncoder.from_state_dict(sd, cfg, device="cpu", dtype="fp32")
    out = enc.encode(px)
    assert isinstance(out, np.ndarray)
    assert out.shape == (3, 65, 256) and out.dtype == np.float32 and out.flags["C_CONTIGUOUS"]
    assert enc.device == torch.device("cpu") and enc.dtype == torch.float32 and enc.description == "cpu, fp32"
    assert (enc.n_embd, enc.image_rows) == (256, 65)
    np.testing.assert_array_equal(out[:, 64], np.broadcast_to(sd["abstractor.vit_eos"][0, 0].numpy(), (3, 256)))


def test_batch_equals_single_encodes(tiny: tuple[OwlConfig, dict[str, torch.Tensor], torch.Tensor]) -> None:
    cfg, sd, px = tiny
    enc = VisionEncoder.from_state_dict(sd, cfg, device="cpu", dtype="fp32")
    batch = enc.encode(px)
    singles = np.concatenate([enc.encode(px[i : i + 1]) for i in range(3)])
    np.testing.assert_allclose(batch, singles, rtol=0, atol=1e-5)
    chunked = enc.encode(px, batch_size=2)  # one batch of 2, one of 1
    np.testing.assert_allclose(chunked, singles, rtol=0, atol=1e-5)


def test_bf16_close_to_fp32(tiny: tuple[OwlConfig, dict[str, torch.Tensor], torch.Tensor]) -> None:
    # bf16 keeps 8 significant bits (unit roundoff 2^-9 ≈ 0.2 %); rounding weights and activations through a few
    # dozen matmuls adds up to a relative RMS error of ≈0.9 % here and ≈1.5 % (min row cosine 0.9998) at full size
    # (`owl-desktop bench vision`). The bounds leave 2-3× margin. The reference demo itself serves the model in
    # bf16, so this is the error the released model already runs with.
    cfg, sd, px = tiny
    ref = VisionEncoder.from_state_dict(sd, cfg, device="cpu", dtype="fp32").encode(px)
    enc = VisionEncoder.from_state_dict(sd, cfg, device="cpu", dtype="bf16")
    assert enc.dtype == torch.bfloat16
    ln_weight = enc.model.vision_model.post_layernorm.weight
    assert ln_weight.dtype == torch.float32  # LayerNorm parameters stay fp32
    got = enc.encode(px)
    assert got.dtype == np.float32
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel < 0.03, rel
    cos = (got * ref).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1))
    assert cos.min() > 0.998, cos.min()


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fp32_on_the_cpu_keeps_half_weights_and_gives_the_fp32_result(tiny, half: torch.dtype) -> None:
    """A CPU without native bf16 computes in fp32: the linear layers keep the checkpoint's half-precision weights
    (half the memory) and widen them as they run, which is exact: the rows equal those of a model whose weights were
    all widened to fp32 at load."""
    cfg, sd, px = tiny
    stored = {k: v.to(half) for k, v in sd.items()}
    widened = {k: v.float() for k, v in stored.items()}
    enc = VisionEncoder.from_state_dict(stored, cfg, device="cpu", dtype="fp32")
    assert enc.dtype == torch.float32
    fc1 = enc.model.vision_model.encoder.layers[0].mlp.fc1
    assert (fc1.weight.dtype, fc1.bias.dtype) == (half, half)
    assert enc.model.vision_model.post_layernorm.weight.dtype == torch.float32
    held = sum(p.numel() * p.element_size() for p in enc.model.parameters())
    full = VisionEncoder.from_state_dict(widened, cfg, device="cpu", dtype="fp32")
    assert held < 0.75 * sum(p.numel() * p.element_size() for p in full.model.parameters())
    np.testing.assert_array_equal(enc.encode(px), full.encode(px))


def test_from_file_loads_fp16_strictly(tmp_path, tiny) -> None:
    cfg, sd, px = tiny
    path = tmp_path / "vision.safetensors"
    save_file({k: v.half().contiguous() for k, v in sd.items()}, str(path))
    enc = VisionEncoder.from_file(path, cfg, device="cpu", dtype="fp32")
    sd16 = {k: v.half().float() for k, v in sd.items()}
    want = VisionEncoder.from_state_dict(sd16, cfg, device="cpu", dtype="fp32").encode(px[:1])
    np.testing.assert_array_equal(enc.encode(px[:1]), want)


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda sd: sd.pop("abstractor.encoder.layers.1.crossattention.normk.bias"), "normk.bias"),
        (lambda sd: sd.__setitem__("abstractor.visual_fc.extra", torch.zeros(2)), "abstractor.visual_fc.extra"),
        (
            lambda sd: sd.__setitem__("vision_model.encoder.layers.0.mlp.fc1.weight", torch.zeros(64, 64)),
            "vision_model.encoder.layers.0.mlp.fc1.weight",
        ),
    ],
    ids=["missing", "unexpected", "wrong-shape"],
)
def test_strict_load_names_the_tensor(tmp_path, tiny, edit, named: str) -> None:
    cfg, sd, _ = tiny
    bad = dict(sd)
    edit(bad)
    with pytest.raises(BundleError, match=named.replace(".", r"\.")):
        VisionEncoder.from_state_dict(bad, cfg, device="cpu", dtype="fp32")
    path = tmp_path / "vision.safetensors"
    save_file({k: v.contiguous() for k, v in bad.items()}, str(path))
    with pytest.raises(BundleError, match=named.replace(".", r"\.")):
        VisionEncoder.from_file(path, cfg, device="cpu")


def test_unreadable_file_is_a_bundle_error(tmp_path, tiny) -> None:
    cfg = tiny[0]
    with pytest.raises(BundleError, match="not found"):
        VisionEncoder.from_file(tmp_path / "absent.safetensors", cfg)
    junk = tmp_path / "vision.safetensors"
    junk.write_bytes(b"\x00" * 7)
    with pytest.raises(BundleError, match="cannot read"):
        VisionEncoder.from_file(junk, cfg)


def test_device_and_dtype_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert vision.select_device("cpu") == cpu
    assert vision.select_dtype(cpu, "fp32") == torch.float32
    assert vision.select_dtype(torch.device("cuda"), "auto") == torch.float16
    assert vision.select_dtype(torch.device("mps"), "auto") == torch.float16
    monkeypatch.setattr(vision, "cpu_has_native_bf16", lambda: True)
    assert vision.select_dtype(cpu, "auto") == torch.bfloat16
    monkeypatch.setattr(vision, "cpu_has_native_bf16", lambda: False)
    assert vision.select_dtype(cpu, "auto") == torch.float32
    with pytest.raises(EngineError, match="unknown dtype"):
        vision.select_dtype(cpu, "int4")
    with pytest.raises(EngineError):
        vision.select_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(vision, "mps_available", lambda: False)
    assert vision.select_device("auto") == cpu
    with pytest.raises(EngineError, match="cuda"):
        vision.select_device("cuda")
    with pytest.raises(EngineError, match="mps"):
        vision.select_device("mps")


def test_bad_config_and_bad_input(tiny) -> None:
    cfg, sd, px = tiny
    bad_cfg = OwlConfig(vision=cfg.vision, abstractor=AbstractorConfig(hidden_size=32, encoder_hidden_size=32))
    with pytest.raises(BundleError, match="hidden size"):
        VisionEncoder.from_state_dict(sd, bad_cfg, device="cpu")
    enc = VisionEncoder.from_state_dict(sd, cfg, device="cpu", dtype="fp32")
    with pytest.raises(ValueError, match="shape"):
        enc.encode(px[:, :, :112, :112])


def test_encode_reports_progress_and_cancels(tiny) -> None:
    cfg, sd, px = tiny
    enc = VisionEncoder.from_state_dict(sd, cfg, device="cpu", dtype="fp32")
    seen: list[tuple[float, float | None]] = []
    enc.encode(px, batch_size=2, task=Task(progress=lambda p: seen.append((p.done, p.total))))
    assert seen == [(0, 3), (2, 3), (3, 3)]
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        enc.encode(px, task=Task(cancel=token))


# -----------------------------------------------------------------------------------------------------------------
# UReader: the same tower with crop position vectors


def test_ureader_views_match_reference_maths() -> None:
    cfg = tiny_config()
    sd = random_state_dict(cfg, seed=4, crop_positions=15)
    model = OwlVision(cfg, crop_positions=15).eval()
    model.load_state_dict(sd, strict=True)
    px = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    positions = torch.tensor([[11, 11], [0, 0], [1, 2]])  # a global view and two crops
    with torch.no_grad():
        got = model(px, positions)
        plain = model(px)  # no position vectors: what an mPLUG-Owl tower of the same weights gives
    for b in range(3):
        want = reference_image_rows(sd, cfg, px[b], tuple(positions[b].tolist()))
        assert (got[b].double() - want).abs().max().item() <= 1e-4
    # the vectors move the 64 query rows (visibly), never the view's own vit_eos row
    assert (got[:, :64] - plain[:, :64]).abs().amax(dim=(1, 2)).min() > 0.1
    torch.testing.assert_close(got[:, 64], plain[:, 64], rtol=0, atol=0)


def test_ureader_encoder_batches_views_and_checks_positions(tmp_path) -> None:
    cfg = tiny_config()
    sd = random_state_dict(cfg, seed=6, crop_positions=15)
    path = tmp_path / "vision.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    enc = VisionEncoder.from_file(path, cfg, device="cpu", dtype="fp32", crop_positions=15)
    assert enc.takes_positions
    px = torch.randn(21, 3, 224, 224, generator=torch.Generator().manual_seed(7))  # a 4×5 grid + global view
    pos = np.array([[11, 11]] + [[r, c] for r in range(4) for c in range(5)])
    batch = enc.encode(px, batch_size=21, positions=pos)
    singles = np.concatenate([enc.encode(px[i : i + 1], positions=pos[i : i + 1]) for i in (0, 7, 20)])
    np.testing.assert_allclose(batch[[0, 7, 20]], singles, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="needs the"):
        enc.encode(px[:1])
    with pytest.raises(ValueError, match="0..14"):
        enc.encode(px[:1], positions=np.array([[15, 0]]))
    with pytest.raises(ValueError, match="shape"):
        enc.encode(px[:2], positions=pos[:1])
    with pytest.raises(BundleError, match="unexpected tensor 'abstractor.cut_patch_embedding"):
        VisionEncoder.from_file(path, cfg, device="cpu")  # the tables need a UReader tower
    owl = VisionEncoder.from_state_dict(random_state_dict(cfg), cfg, device="cpu", dtype="fp32")
    with pytest.raises(ValueError, match="no crop positions"):
        owl.encode(px[:1], positions=pos[:1])
