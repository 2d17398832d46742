"""The mPLUG-Owl v1 vision tower in torch: ViT-L/14 + visual abstractor → 65 image rows for the LLM.

This is the only module of the app that defines torch modules. Parameter names and shapes equal those of the
released HF checkpoint (`vision_model.*`, `abstractor.*`, `query_tokens`), so `vision.safetensors` loads with
`load_state_dict(strict=True)`. The maths follows the reference code exactly (mplug-owl-reference.md §1):

    px [B,3,224,224] ─ViT (pre-LN, quick_gelu, per-head interleaved fused QKV)─ post-LN on all 257 tokens
    query_tokens [1,64,D] ─abstractor layers (one attention over [queries; image])─ visual_fc ─ + vit_eos
    → [B, 65, n_embd]

UReader (mplug-owl-family.md) is the same tower run on every view of an image (a global view and the crops of a
grid, engine/doc_crops.py), with one addition in the abstractor: each view's (row, col) picks a position vector
(cut_patch_embedding_h[row] + cut_patch_embedding_w[col]) · 0.5, added to its 64 query outputs before visual_fc.
Each view keeps its own vit_eos row: 65 rows per view.

Every LayerNorm runs in float32 and casts back (the reference's LayerNormFp32), and its parameters stay float32
whatever the compute dtype. `VisionEncoder` picks the device (CUDA → MPS → CPU) and dtype (fp16 on GPUs; bf16 on
CPUs with native bf16 matmul, else fp32), loads the weights strictly and encodes batches of images.
"""

from __future__ import annotations

import contextlib
import math
import platform
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from owl_desktop.errors import BundleError, EngineError
from owl_desktop.model_config import ABSTRACTOR_ATTN_LN_EPS, AbstractorConfig, OwlConfig, VisionConfig
from owl_desktop.tasks import Task

HALF_DTYPES = (torch.bfloat16, torch.float16)

# -----------------------------------------------------------------------------------------------------------------
# building blocks


class Linear(nn.Linear):
    """A linear layer whose weights may be held in a narrower dtype than it computes in.

    On a CPU without native bf16 matmuls the tower computes in float32, while its weights stay in the checkpoint's
    bf16: each layer widens its own weights when it runs (bf16 -> float32 is exact, so the result equals a float32
    model built from the same weights), and only that layer's float32 copy exists at a time. The whole tower in
    float32 would hold 1.54 GB at ViT-L/14 size instead of 0.77 GB.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        b = self.bias if self.bias is None or self.bias.dtype == x.dtype else self.bias.to(x.dtype)
        return F.linear(x, w, b)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's GELU approximation x·σ(1.702x); the reference hard-codes it whatever the config says."""
    return x * torch.sigmoid(1.702 * x)


class LayerNormFp32(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back to the input dtype (the reference's LayerNormFp32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return y.to(x.dtype)


# -----------------------------------------------------------------------------------------------------------------
# ViT-L/14 (`vision_model.*`)


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.patch_embed = nn.Conv2d(cfg.num_channels, d, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Parameter(torch.zeros(1, cfg.num_positions, d))
        self.pre_layernorm = LayerNormFp32(d, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        b = pixel_values.shape[0]
        x = self.patch_embed(pixel_values)  # [B, D, 16, 16]
        x = x.flatten(2).transpose(1, 2)  # [B, 256, D] patches in raster order
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)  # [B, 257, D]
        x = x + self.position_embedding[:, : x.shape[1]]  # [B, 257, D]
        return self.pre_layernorm(x)


class VisionAttention(nn.Module):
    """Multi-head self-attention with a fused QKV whose output rows interleave [q_h, k_h, v_h] per head."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.n_head = cfg.num_attention_heads
        self.head_dim = d // self.n_head
        self.query_key_value = Linear(d, 3 * d)
        self.dense = Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        qkv = self.query_key_value(x).view(b, s, self.n_head, 3, self.head_dim)  # [B, S, H, 3, hd]
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each [B, H, S, hd]
        y = F.scaled_dot_product_attention(q, k, v)  # [B, H, S, hd]; scale hd^-0.5, no mask
        y = y.transpose(1, 2).reshape(b, s, d)  # [B, S, D]
        return self.dense(y)


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))  # [B, S, I] inside


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.input_layernorm = LayerNormFp32(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.post_attention_layernorm = LayerNormFp32(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))  # [B, S, D]
        x = x + self.mlp(self.post_attention_layernorm(x))  # [B, S, D]
        return x


class VisionEncoderStack(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class VisionModel(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionEncoderStack(cfg)
        self.post_layernorm = LayerNormFp32(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixel_values)  # [B, 257, D]
        x = self.encoder(x)  # [B, 257, D]
        return self.post_layernorm(x)  # [B, 257, D]: all tokens, CLS included


# -----------------------------------------------------------------------------------------------------------------
# visual abstractor (`abstractor.*`)


class AbstractorAttention(nn.Module):
    """Queries attend over [queries; image tokens]: self- and cross-attention in one softmax."""

    def __init__(self, cfg: AbstractorConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.n_head = cfg.num_attention_heads
        self.head_dim = d // self.n_head
        self.query = Linear(d, d)
        self.key = Linear(cfg.encoder_hidden_size, d)
        self.value = Linear(cfg.encoder_hidden_size, d)

    def forward(self, q_in: torch.Tensor, kv_in: torch.Tensor) -> torch.Tensor:
        b, nq, d = q_in.shape
        nkv = kv_in.shape[1]
        q = self.query(q_in).view(b, nq, self.n_head, self.head_dim).transpose(1, 2)  # [B, H, 64, hd]
        k = self.key(kv_in).view(b, nkv, self.n_head, self.head_dim).transpose(1, 2)  # [B, H, 321, hd]
        v = self.value(kv_in).view(b, nkv, self.n_head, self.head_dim).transpose(1, 2)  # [B, H, 321, hd]
        y = F.scaled_dot_product_attention(q, k, v)  # [B, H, 64, hd]; scale 1/sqrt(hd), masks are all zeros
        return y.transpose(1, 2).reshape(b, nq, d)  # [B, 64, D]


class AbstractorMLP(nn.Module):
    """SwiGLU with a LayerNorm on the gated hidden state; all Linears have biases."""

    def __init__(self, cfg: AbstractorConfig) -> None:
        super().__init__()
        self.w1 = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.w2 = Linear(cfg.intermediate_size, cfg.hidden_size)
        self.w3 = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.ffn_ln = LayerNormFp32(cfg.intermediate_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.w1(x)) * self.w3(x)  # [B, 64, I]
        return self.w2(self.ffn_ln(h))  # [B, 64, D]


class AbstractorOutput(nn.Module):
    def __init__(self, cfg: AbstractorConfig) -> None:
        super().__init__()
        self.out_proj = Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm2 = LayerNormFp32(cfg.hidden_size, eps=ABSTRACTOR_ATTN_LN_EPS)
        self.mlp = AbstractorMLP(cfg)

    def forward(self, ctx: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        h = q + self.out_proj(ctx)  # [B, 64, D]; the residual is the *normed* queries
        return h + self.mlp(self.norm2(h))  # [B, 64, D]


class AbstractorCrossAttention(nn.Module):
    def __init__(self, cfg: AbstractorConfig) -> None:
        super().__init__()
        self.norm1 = LayerNormFp32(cfg.hidden_size, eps=ABSTRACTOR_ATTN_LN_EPS)
        self.normk = LayerNormFp32(cfg.hidden_size, eps=ABSTRACTOR_ATTN_LN_EPS)
        self.attention = AbstractorAttention(cfg)
        self.output = AbstractorOutput(cfg)

    def forward(self, h: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        q = self.norm1(h)  # [B, 64, D]
        kv = torch.cat([q, self.normk(img)], dim=1)  # [B, 64 + 257, D]
        return self.output(self.attention(q, kv), q)  # [B, 64, D]


class AbstractorLayer(nn.Module):
    def __init__(self, cfg: AbstractorConfig) -> None:
        super().__init__()
        self.crossattention = AbstractorCrossAttention(cfg)

    def forward(self, h: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        return self.crossattention(h, img)


class AbstractorEncoderStack(nn.Module):
    def __init__(self, cfg: AbstractorConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(AbstractorLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, h: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            h = layer(h, img)
        return h


class VisualAbstractor(nn.Module):
    """Abstractor layers, then visual_fc into the LLM's space, then the learned vit_eos row.

    With `crop_positions` > 0 (UReader) it also holds the crop position tables `cut_patch_embedding_h/w`
    (Embedding(crop_positions, D)); a view at (row, col) gets (h[row] + w[col]) · 0.5 added to each of its query
    outputs before visual_fc (the reference's patch_pos_embed_type "post").
    """

    def __init__(self, cfg: AbstractorConfig, text_hidden: int, crop_positions: int = 0) -> None:
        super().__init__()
        self.encoder = AbstractorEncoderStack(cfg)
        self.visual_fc = Linear(cfg.hidden_size, text_hidden)
        self.vit_eos = nn.Parameter(torch.zeros(1, 1, text_hidden))
        if crop_positions > 0:
            self.cut_patch_embedding_h = nn.Embedding(crop_positions, cfg.hidden_size)
            self.cut_patch_embedding_w = nn.Embedding(crop_positions, cfg.hidden_size)

    @property
    def has_crop_positions(self) -> bool:
        return hasattr(self, "cut_patch_embedding_h")

    def crop_position_vectors(self, positions: torch.Tensor) -> torch.Tensor:
        """positions [B, 2] (row, col) → [B, D]: the mean of the row and column vectors."""
        return (self.cut_patch_embedding_h(positions[:, 0]) + self.cut_patch_embedding_w(positions[:, 1])) * 0.5

    def forward(self, queries: torch.Tensor, img: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        h = self.encoder(queries, img)  # [B, 64, D]
        if positions is not None:
            h = h + self.crop_position_vectors(positions)[:, None, :]  # [B, 64, D]; one vector per view
        out = self.visual_fc(h)  # [B, 64, n_embd]
        eos = self.vit_eos.expand(out.shape[0], -1, -1)  # [B, 1, n_embd]
        return torch.cat([out, eos], dim=1)  # [B, 65, n_embd]


# -----------------------------------------------------------------------------------------------------------------
# the whole vision tower


def check_config(config: OwlConfig) -> None:
    """Raise ValueError if the dimensions cannot describe an mPLUG-Owl v1 vision tower."""
    v, a = config.vision, config.abstractor
    if not (v.hidden_size == a.hidden_size == a.encoder_hidden_size):
        raise ValueError(
            f"vision hidden size {v.hidden_size}, abstractor hidden size {a.hidden_size} and its "
            f"encoder_hidden_size {a.encoder_hidden_size} must be equal"
        )
    heads = {"vision": (v.hidden_size, v.num_attention_heads), "abstractor": (a.hidden_size, a.num_attention_heads)}
    for name, (d, h) in heads.items():
        if h <= 0 or d % h:
            raise ValueError(f"{name} hidden size {d} is not a multiple of its {h} attention heads")
    if v.image_size % v.patch_size:
        raise ValueError(f"image size {v.image_size} is not a multiple of the patch size {v.patch_size}")
    if config.num_query_tokens <= 0:
        raise ValueError(f"num_query_tokens must be positive, not {config.num_query_tokens}")


class OwlVision(nn.Module):
    """ViT + abstractor + learned queries: pixel values [B,3,224,224] → image rows [B, 65, n_embd].

    Each item of the batch is one view (an image, or one crop or the global view of a UReader image); views never
    mix, so a document's crops run through the ViT as one batch. `crop_positions` > 0 builds UReader's position
    tables; its forward then takes each view's (row, col).
    """

    def __init__(self, config: OwlConfig, crop_positions: int = 0) -> None:
        super().__init__()
        check_config(config)
        self.config = config
        self.vision_model = VisionModel(config.vision)
        self.abstractor = VisualAbstractor(config.abstractor, config.text.hidden_size, crop_positions)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.abstractor.hidden_size))

    def forward(self, pixel_values: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        img = self.vision_model(pixel_values)  # [B, 257, D]
        queries = self.query_tokens.expand(img.shape[0], -1, -1)  # [B, 64, D]
        return self.abstractor(queries, img, positions)  # [B, 65, n_embd]


def _held_linear_params(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], device: torch.device, compute: torch.dtype
) -> dict[str, torch.dtype]:
    """Linear-layer parameters to keep in the checkpoint's bf16/fp16 although the tower computes in float32 on the
    CPU (name -> dtype to hold): half the memory, the same results (see Linear)."""
    if device.type != "cpu" or compute != torch.float32:
        return {}
    names = {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, Linear) for p in ("weight", "bias")}
    return {k: state_dict[k].dtype for k in names if k in state_dict and state_dict[k].dtype in HALF_DTYPES}


def _layernorm_param_names(model: nn.Module) -> set[str]:
    return {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, LayerNormFp32) for p in ("weight", "bias")}


def init_random_(model: OwlVision, seed: int = 0) -> OwlVision:
    """Fill every parameter with random values of a realistic scale (benchmarks and tests; no weights needed).

    Linear and conv weights ~ N(0, 1/fan_in), biases ~ N(0, 0.02), LayerNorm weights ~ N(1, 0.1) and biases
    ~ N(0, 0.1), embeddings, crop position tables and learned vectors ~ N(0, 0.5): none keeps a default that could
    hide a bug.
    """
    g = torch.Generator().manual_seed(seed)
    ln_params = _layernorm_param_names(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            cpu = torch.empty(p.shape, dtype=torch.float32)
            if name in ln_params:
                cpu.normal_(1.0 if name.endswith("weight") else 0.0, 0.1, generator=g)
            elif ".cut_patch_embedding_" in name:
                cpu.normal_(0.0, 0.5, generator=g)
            elif name.endswith("weight") and p.dim() >= 2:
                cpu.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=g)
            elif name.endswith("bias"):
                cpu.normal_(0.0, 0.02, generator=g)
            else:  # cls_token, position_embedding, query_tokens, vit_eos
                cpu.normal_(0.0, 0.5, generator=g)
            p.copy_(cpu)
    return model


# -----------------------------------------------------------------------------------------------------------------
# device and dtype selection

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def select_device(preference: str = "auto") -> torch.device:
    """The torch device: `auto` picks CUDA, then MPS (Apple GPUs), then the CPU; cuda, cuda:N, mps or cpu force one."""
    pref = (preference or "auto").strip().lower()
    if pref == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(pref)
    except RuntimeError as exc:
        raise EngineError(f"unknown device '{preference}': use auto, cuda, mps or cpu") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineError("device 'cuda' was asked for, but this torch build sees no CUDA GPU")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise EngineError(f"device '{preference}' was asked for, but there are {torch.cuda.device_count()} CUDA GPUs")
    if device.type == "mps" and not mps_available():
        raise EngineError("device 'mps' was asked for, but Metal (MPS) is not available")
    if device.type not in ("cuda", "mps", "cpu"):
        raise EngineError(f"unsupported device '{preference}': use auto, cuda, mps or cpu")
    return device


def _cpuinfo_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_native_bf16() -> bool:
    """True on x86 CPUs with AVX512_BF16 or AMX-BF16, where oneDNN runs bf16 matmuls natively (≈4× fp32 here)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "x86", "i686"):
        return False  # ARM bf16 paths are not measured; fp32 is the safe default there
    try:  # torch's own cpuinfo probe works on every OS
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        flags = _cpuinfo_flags()
        return bool({"avx512_bf16", "amx_bf16"} & flags)


def select_dtype(device: torch.device, preference: str = "auto") -> torch.dtype:
    """The compute dtype: `auto` is fp16 on CUDA and MPS; on the CPU bf16 where matmuls run natively in bf16, else
    fp32. fp32, fp16 or bf16 (also float32, float16, bfloat16) force one.
    """
    pref = (preference or "auto").strip().lower()
    if pref != "auto":
        if pref not in _DTYPES:
            raise EngineError(f"unknown dtype '{preference}': use auto, fp32, fp16 or bf16")
        return _DTYPES[pref]
    if device.type in ("cuda", "mps"):
        return torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


# -----------------------------------------------------------------------------------------------------------------
# loading and encoding


def check_state_dict(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], source: str) -> None:
    """Raise BundleError naming the first missing, unexpected, mis-shaped or non-float tensor."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    problems = []
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        problems.append(f"missing tensor '{missing[0]}'{more}")
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        problems.append(f"unexpected tensor '{unexpected[0]}'{more}")
    for k, shape in expected.items():
        t = state_dict.get(k)
        if t is None:
            continue
        if tuple(t.shape) != tuple(shape):
            problems.append(f"tensor '{k}' has shape {list(t.shape)}, expected {list(shape)}")
        elif not t.is_floating_point():
            problems.append(f"tensor '{k}' has dtype {t.dtype}, expected a floating-point type")
    if problems:
        raise BundleError(f"{source} does not match the model config: " + "; ".join(problems))


class VisionEncoder:
    """The loaded vision tower on one device in one dtype: pixel values → float32 image rows for llama.cpp."""

    def __init__(self, model: OwlVision, device: torch.device, dtype: torch.dtype) -> None:
        self.model = model.eval()
        self._device = device
        self._dtype = dtype

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        config: OwlConfig,
        device: str = "auto",
        dtype: str = "auto",
        task: Task | None = None,
        crop_positions: int = 0,
    ) -> VisionEncoder:
        """Load a bundle's vision.safetensors strictly (names and shapes must equal the config's model).

        `crop_positions` > 0: a UReader tower, with its crop position tables of that many rows.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        if task is not None:
            task.check()
            task.report("loading vision weights", 0, 1)
        if not path.is_file():
            raise BundleError(f"vision weights not found: {path}")
        try:
            state_dict = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise BundleError(f"cannot read vision weights {path}: {exc}") from exc
        encoder = cls.from_state_dict(
            state_dict, config, device=device, dtype=dtype, source=path.name, crop_positions=crop_positions
        )
        if task is not None:
            task.report("loading vision weights", 1, 1)
        return encoder

    @classmethod
    def from_state_dict(
        cls,
        state_dict: Mapping[str, torch.Tensor],
        config: OwlConfig,
        device: str = "auto",
        dtype: str = "auto",
        source: str = "state dict",
        crop_positions: int = 0,
    ) -> VisionEncoder:
        """Build the model around `state_dict` (any float dtype), checked strictly, on the chosen device/dtype."""
        dev = select_device(device)
        dt = select_dtype(dev, dtype)
        try:
            with torch.device("meta"):
                model = OwlVision(config, crop_positions)
        except ValueError as exc:
            raise BundleError(f"invalid vision config: {exc}") from exc
        expected = {k: v.shape for k, v in model.state_dict().items()}
        check_state_dict(state_dict, expected, source)
        ln = _layernorm_param_names(model)
        held = _held_linear_params(model, state_dict, dev, dt)
        # LayerNorm parameters stay float32 (they are applied in float32); linear layers' weights may stay in the
        # checkpoint's half dtype (see Linear); everything else takes the compute dtype.
        converted = {
            k: state_dict[k].to(device=dev, dtype=torch.float32 if k in ln else held.get(k, dt)) for k in expected
        }
        model.load_state_dict(converted, strict=True, assign=True)
        return cls(model, dev, dt)

    @property
    def config(self) -> OwlConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def description(self) -> str:
        """Short label for the UI and logs, e.g. "cpu, bf16"."""
        return f"{self._device.type}, {dtype_name(self._dtype)}"

    @property
    def n_embd(self) -> int:
        return self.config.text.hidden_size

    @property
    def image_rows(self) -> int:
        return self.config.image_rows

    def __repr__(self) -> str:
        return f"VisionEncoder({self.description})"

    @property
    def takes_positions(self) -> bool:
        """True for a UReader tower: every view needs its (row, col) crop position."""
        return self.model.abstractor.has_crop_positions

    def encode(
        self,
        pixel_values: torch.Tensor | np.ndarray,
        batch_size: int = 8,
        task: Task | None = None,
        positions: torch.Tensor | np.ndarray | None = None,
    ) -> np.ndarray:
        """Pixel values [B,3,224,224] (CLIP-normalised float32) → C-contiguous float32 array [B, 65, n_embd].

        Views run `batch_size` at a time; `task` gets progress in images and may cancel between the layers of the
        ViT and the abstractor (Cancelled is raised within one layer, tens of milliseconds on a CPU).
        `positions` [B, 2] (row, col) of each view: required by a UReader tower, refused by an mPLUG-Owl one.
        """
        px = torch.as_tensor(pixel_values)
        v = self.config.vision
        want = (v.num_channels, v.image_size, v.image_size)
        if px.dim() != 4 or tuple(px.shape[1:]) != want:
            raise ValueError(f"pixel values must have shape [B, {', '.join(map(str, want))}], not {list(px.shape)}")
        n = px.shape[0]
        pos = self._check_positions(positions, n)
        out = np.empty((n, self.image_rows, self.n_embd), dtype=np.float32)
        hooks = []
        if task is not None:
            layers = [*self.model.vision_model.encoder.layers, *self.model.abstractor.encoder.layers]
            hooks = [layer.register_forward_pre_hook(lambda _m, _a: task.check()) for layer in layers]
        with contextlib.ExitStack() as stack:
            stack.callback(lambda: [h.remove() for h in hooks])
            self._encode_into(out, px, pos, batch_size, task)
        if task is not None:
            task.report("encoding images", n, n, "images")
        return out

    def _encode_into(
        self, out: np.ndarray, px: torch.Tensor, pos: torch.Tensor | None, batch_size: int, task: Task | None
    ) -> None:
        n = px.shape[0]
        with torch.inference_mode():
            for start in range(0, n, max(1, batch_size)):
                if task is not None:
                    task.check()
                    task.report("encoding images", start, n, "images")
                chunk = px[start : start + batch_size].to(device=self._device, dtype=self._dtype)
                chunk_pos = None if pos is None else pos[start : start + batch_size].to(self._device)  # [b, 2]
                rows = self.model(chunk, chunk_pos)  # [b, 65, n_embd]
                if not bool(torch.isfinite(rows).all()):
                    raise EngineError(
                        f"the vision encoder produced non-finite values in {dtype_name(self._dtype)} on "
                        f"{self._device.type}; try the fp32 dtype"
                    )
                out[start : start + chunk.shape[0]] = rows.float().cpu().numpy()

    def _check_positions(self, positions: torch.Tensor | np.ndarray | None, n: int) -> torch.Tensor | None:
        if not self.takes_positions:
            if positions is not None:
                raise ValueError("this vision tower has no crop positions; pass positions=None")
            return None
        if positions is None:
            raise ValueError("a UReader vision tower needs the (row, col) position of every view")
        pos = torch.as_tensor(positions, dtype=torch.long)
        if pos.shape != (n, 2):
            raise ValueError(f"positions must have shape [{n}, 2], not {list(pos.shape)}")
        limit = self.model.abstractor.cut_patch_embedding_h.num_embeddings
        if bool((pos < 0).any()) or bool((pos >= limit).any()):
            raise ValueError(f"crop positions must lie in 0..{limit - 1}")
        return pos
