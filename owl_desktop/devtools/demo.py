"""The offline demo model: a tiny random bundle built once into the data dir, and a picture to ask about."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from owl_desktop import bundle, paths
from owl_desktop.tasks import Task

DEMO_BUNDLE_ID = "demo-tiny-random"
DEMO_QUANT = "Q8_0"
DEMO_NAME = "Offline demo model"  # as the welcome page calls it


def ensure_demo_bundle(task: Task | None = None) -> Path:
    """The demo bundle's folder, building it the first time (a few seconds)."""
    from owl_desktop.convert.converter import convert_checkpoint
    from owl_desktop.devtools.tiny_checkpoint import make_checkpoint

    target = paths.models_dir() / DEMO_BUNDLE_ID
    if (target / bundle.MANIFEST).is_file():
        return target
    paths.ensure(paths.models_dir())
    with tempfile.TemporaryDirectory(prefix="owl-demo-", dir=paths.ensure(paths.cache_dir())) as tmp:
        ckpt = make_checkpoint(Path(tmp) / "tiny-mplug-owl", "bin", preset="tiny", seed=0, task=task)
        if target.exists():
            shutil.rmtree(target)  # a leftover without bundle.json is not a bundle
        convert_checkpoint(ckpt, target, quant=DEMO_QUANT, task=task, bundle_id=DEMO_BUNDLE_ID)
    bundle.rename(target, DEMO_NAME)
    return target


def demo_image() -> Path:
    """A drawn picture (sky, sun, house, grass) saved once in the cache dir."""
    from PIL import Image, ImageDraw

    path = paths.ensure(paths.cache_dir()) / "demo-picture.png"
    if path.is_file():
        return path
    img = Image.new("RGB", (320, 240), (135, 190, 235))
    d = ImageDraw.Draw(img)
    d.rectangle((0, 170, 320, 240), fill=(70, 150, 60))
    d.ellipse((240, 20, 290, 70), fill=(250, 210, 60))
    d.rectangle((90, 110, 190, 180), fill=(190, 80, 60))
    d.polygon([(80, 112), (140, 60), (200, 112)], fill=(120, 50, 40))
    d.rectangle((128, 140, 152, 180), fill=(90, 60, 30))
    tmp = path.with_suffix(".tmp.png")
    img.save(tmp)
    tmp.replace(path)
    return path
