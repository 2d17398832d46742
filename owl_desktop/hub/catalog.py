"""The built-in catalog: the released mPLUG-Owl v1 checkpoints (MAGAer13 on the Hugging Face hub) and UReader.

Any other repository in the same format can be pulled too; the catalog adds a description, a pinned revision, the
expected download and what each quantization needs, so the app can show them before anything is fetched.

Revisions: pinned to "main". The commit shas of these repositories could not be looked up where this catalog was
written (no network), and "main" of these 2023 releases has not moved since. Every pull resolves "main" to its commit
and records that commit in the bundle's manifest; replace "main" by the sha once it is known.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from owl_desktop.hub.estimates import QUANT_ORDER, Footprint, ModelFacts, footprint
from owl_desktop.model_config import OwlConfig

DEFAULT_REPO = "MAGAer13/mplug-owl-llama-7b"
PINNED_REVISION = "main"

# The released model: ViT-L/14 + abstractor (I=2816) + LLaMA-7B; its config equals OwlConfig's defaults.
MPLUG_OWL_7B = ModelFacts.from_config(OwlConfig())

_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "tokenizer_config.json",
)
# pytorch_model.bin is listed as 14.2 GB on the hub (7.123 B bf16 weights); the side files add about 0.5 MB.
# The exact sizes come from the hub at pull time; these are for display before that.
_CHECKPOINT_BYTES = 14_200_000_000
_SIDE_BYTES = 512_000
_LICENSE = "Apache-2.0 (hub card); LLaMA-7B weights inside are under Meta's non-commercial LLaMA license"

# UReader (mplug-owl-family.md): three float32 shards of 9.98 + 9.96 + 8.55 GB, and four side files (no
# special_tokens_map.json or preprocessor_config.json in that repository). Converting streams the shards.
UREADER_REPO = "Mizukiluke/ureader-v1"
_UREADER_SHARDS = tuple(f"pytorch_model-{i:05d}-of-00003.bin" for i in (1, 2, 3))
_UREADER_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json")
_UREADER_CHECKPOINT_BYTES = 9_980_000_000 + 9_960_000_000 + 8_550_000_000
_UREADER_LICENSE = (
    "Apache-2.0 (UReader code); built on mPLUG-Owl-LLaMA-7B, whose LLaMA weights are under Meta's non-commercial "
    "LLaMA license"
)


@dataclass(frozen=True)
class CatalogEntry:
    repo_id: str
    revision: str
    title: str
    description: str  # one line
    license: str
    files: tuple[str, ...]  # what a pull fetches
    download_bytes: int
    chat: bool = True  # False: a pre-trained model that does not follow instructions
    default: bool = False
    facts: ModelFacts = field(default=MPLUG_OWL_7B, repr=False)

    @property
    def name(self) -> str:
        return self.repo_id.split("/")[-1]

    def footprints(self, n_ctx: int = 2048) -> list[Footprint]:
        """Disk and memory for every quantization, smallest first."""
        return [footprint(self.facts, q, n_ctx) for q in QUANT_ORDER]


CATALOG: tuple[CatalogEntry, ...] = (
    CatalogEntry(
        repo_id=DEFAULT_REPO,
        revision=PINNED_REVISION,
        title="mPLUG-Owl (LLaMA-7B, instruction-tuned)",
        description="The recommended chat model: instruction-tuned with LoRA, already merged into the weights.",
        license=_LICENSE,
        files=(*_SIDE_FILES, "pytorch_model.bin"),
        download_bytes=_CHECKPOINT_BYTES + _SIDE_BYTES,
        default=True,
    ),
    CatalogEntry(
        repo_id="MAGAer13/mplug-owl-llama-7b-ft",
        revision=PINNED_REVISION,
        title="mPLUG-Owl (LLaMA-7B, full fine-tune)",
        description="Instruction-tuned by fine-tuning the whole language model; two weight shards.",
        license=_LICENSE,
        files=(
            *_SIDE_FILES,
            "pytorch_model-00001-of-00002.bin",
            "pytorch_model-00002-of-00002.bin",
            "pytorch_model.bin.index.json",
        ),
        download_bytes=_CHECKPOINT_BYTES + _SIDE_BYTES,
    ),
    CatalogEntry(
        repo_id="MAGAer13/mplug-owl-llama-7b-pt",
        revision=PINNED_REVISION,
        title="mPLUG-Owl (LLaMA-7B, pre-trained only)",
        description="Not a chat model: pre-trained on image-text pairs, it continues text instead of answering.",
        license=_LICENSE,
        files=(*_SIDE_FILES, "pytorch_model.bin"),
        download_bytes=_CHECKPOINT_BYTES + _SIDE_BYTES,
        chat=False,
    ),
    CatalogEntry(
        repo_id=UREADER_REPO,
        revision=PINNED_REVISION,
        title="UReader (documents, charts, tables, web pages)",
        description=(
            "mPLUG-Owl fine-tuned to read text in images: documents, charts, tables, web pages and screenshots, in "
            "English; it reads an image as a grid of up to 20 crops plus a global view (130 to 1,365 positions)."
        ),
        license=_UREADER_LICENSE,
        files=(*_UREADER_SIDE_FILES, *_UREADER_SHARDS, "pytorch_model.bin.index.json"),
        download_bytes=_UREADER_CHECKPOINT_BYTES + _SIDE_BYTES,
    ),
)


def lookup(repo_id: str) -> CatalogEntry | None:
    wanted = repo_id.strip().lower()
    return next((e for e in CATALOG if e.repo_id.lower() == wanted), None)


def default_entry() -> CatalogEntry:
    return next(e for e in CATALOG if e.default)
