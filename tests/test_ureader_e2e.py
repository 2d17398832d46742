# ruff: noqa: F811 - the fixtures imported from test_gui are parameters of the tests
"""Issue 13: the tiny UReader bundle answers through the local API (real uvicorn on 127.0.0.1, the real `openai`
client) and through the desktop window (pytest-qt), and each image costs 65 positions per view of its own grid.

The expected positions are counted from the prompt text written out literally (UReader's prompt has no system text:
"Human: <image>\\nHuman: {question}\\nAI: ", one "Human: <image>" line per image, each text chunk tokenized on its
own after BOS) plus 65·(1 + rows·cols) per image, the grid taken from `plan_views` for that image's size.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from test_gui import ANSWER_MS, ask, demo_bundle, make_window  # noqa: F401
from test_server import EXACT, EXACT_FLAGS, image_part, png

from owl_desktop import bundle as bundle_mod
from owl_desktop.app.engine_queue import EngineQueue
from owl_desktop.cli import main as cli_main
from owl_desktop.convert.converter import convert_checkpoint
from owl_desktop.devtools.tiny_checkpoint import make_checkpoint
from owl_desktop.engine.doc_crops import plan_views
from owl_desktop.engine.llm import LlamaEngine
from owl_desktop.engine.options import Sampling
from owl_desktop.gui.main_window import State
from owl_desktop.model_family import UREADER
from owl_desktop.server.config import ServerConfig
from owl_desktop.server.host import StandaloneModel
from owl_desktop.server.runner import ApiServer

# (width, height) and the grid the reference ranking gives (reasoning in test_ureader.py / test_doc_crops.py)
RECEIPT = ((300, 900), "3×1")  # aspect 3: 3×1 (224×672) fits exactly and covers more than 6×2 would
BANNER = ((640, 160), "1×4")  # aspect 1:4: 1×4 (896×224) beats 2×8, which would dwarf the image


@pytest.fixture(scope="module")
def ureader(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ureader-e2e")
    ckpt = make_checkpoint(root / "ckpt", "ureader", preset="tiny", seed=5)
    return convert_checkpoint(ckpt, root / "bundle-f32", quant="F32")


def image_positions(size: tuple[int, int], bundle: Path) -> tuple[str, int]:
    """(grid as "rows×cols", positions) of an image of `size` under the bundle's image plan."""
    grid = plan_views(size[0], size[1], bundle_mod.load(bundle).image_plan).grid
    return f"{grid.rows}×{grid.cols}", 65 * (1 + grid.rows * grid.cols)


def text_positions(llm: LlamaEngine, n_images: int, question: str) -> int:
    """BOS, then each text chunk around the <image>s of "Human: <image>\\n" × n, "Human: {question}\\nAI: "."""
    chunks = ["Human: "] + ["\nHuman: "] * (n_images - 1) + [f"\nHuman: {question}\nAI: "]
    return 1 + sum(len(llm.tokenize(c)) for c in chunks)


# ---------------------------------------------------------------------------------------------------- the API


@pytest.fixture(scope="module")
def server(ureader: Path) -> Iterator[ApiServer]:
    model = StandaloneModel(ureader, EXACT, Sampling(), EngineQueue(max_waiting=1))
    model.load()
    try:
        with ApiServer(model, ServerConfig(port=0)) as s:
            yield s
    finally:
        model.close()


def ask_greedy(bundle: Path, images: list[Path], question: str, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """`owl-desktop ask --greedy --json`, in this process, with the server's exact engine settings."""
    args = ["ask", "--model", str(bundle), "--greedy", "--max-new-tokens", "12", *EXACT_FLAGS, "--json"]
    for image in images:
        args += ["--image", str(image)]
    capsys.readouterr()
    assert cli_main([*args, question]) == 0
    return json.loads(capsys.readouterr().out)


def test_the_api_answers_like_ask_greedy_and_counts_each_images_crops(
    server: ApiServer, ureader: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pipe = server.host.pipeline
    assert pipe is not None
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
    question = "Which one is wider?"
    sizes = [RECEIPT[0], BANNER[0]]
    data = [png(10 + i, size) for i, size in enumerate(sizes)]
    files = []
    for i, d in enumerate(data):
        files.append(tmp_path / f"doc-{i}.png")
        files[-1].write_bytes(d)

    expected = ask_greedy(ureader, files, question, capsys)
    got = client.chat.completions.create(
        model=pipe.bundle.id,
        messages=[{"role": "user", "content": [*(image_part(d) for d in data), {"type": "text", "text": question}]}],
        temperature=0,
        max_tokens=12,
    )
    assert got.choices[0].message.content == expected["answer"] != ""
    assert got.usage is not None and got.usage.completion_tokens == len(expected["token_ids"])

    plans = [image_positions(size, ureader) for size in sizes]
    assert [grid for grid, _ in plans] == [RECEIPT[1], BANNER[1]]
    want = sum(n for _, n in plans) + text_positions(pipe.llm, len(data), question)
    assert got.usage.prompt_tokens == want == 65 * 4 + 65 * 5 + text_positions(pipe.llm, 2, question)
    assert expected["timings"]["context_used"] - len(expected["token_ids"]) == want
    assert [(i["grid"], i["views"]) for i in expected["timings"]["images"]] == [("3×1", 4), ("1×4", 5)]
    timings = (got.model_extra or {})["timings"]
    assert timings["images_n"] == 2 and timings["cache_n"] + timings["prompt_n"] == want


# ---------------------------------------------------------------------------------------------------- the window


def test_the_window_answers_about_a_document_and_keeps_its_grid(qtbot, make_window, ureader, tmp_path) -> None:  # noqa: ANN001
    window = make_window(with_model=False, max_new_tokens=8)
    window.load_model(str(ureader))
    qtbot.waitUntil(lambda: window.state is State.READY, timeout=ANSWER_MS)
    pipe = window.services.chat.pipeline
    assert pipe is not None and pipe.bundle.family == bundle_mod.load(ureader).family == UREADER

    receipt = tmp_path / "receipt.png"
    receipt.write_bytes(png(20, RECEIPT[0]))
    window.composer.add_files([receipt])
    question = "What is the total?"
    ask(qtbot, window, question)

    assert not window.banner.isVisible()
    stored = window.services.store.messages(window.current_id)
    assert [m.role for m in stored] == ["user", "assistant"]
    answer = stored[1]
    assert answer.text.strip() and answer.text == window.chat.bubbles()[-1].text
    meta = answer.meta
    assert meta["state"] == "done" and meta["notices"] == []
    grid, positions = image_positions(RECEIPT[0], ureader)
    assert [(i["name"], i["grid"]) for i in meta["images"]] == [("receipt.png", grid)] == [("receipt.png", "3×1")]
    assert meta["context_used"] - meta["tokens"] == positions + text_positions(pipe.llm, 1, question)
