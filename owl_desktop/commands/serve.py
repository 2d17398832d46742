"""`owl-desktop serve`: the local API server without the window (OpenAI- and Ollama-compatible)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

from owl_desktop.commands.engine_args import add_engine_flags, engine_settings
from owl_desktop.errors import OwlError, ServerError
from owl_desktop.server.config import DEFAULT_HOST, DEFAULT_PORT, QUEUE_SIZE

API_KEY_ENV = "OWL_API_KEY"


def register(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the model to other programs over HTTP (OpenAI- and Ollama-compatible API)",
        description=(
            "Runs the local API server without the window: OpenAI-style /v1/chat/completions and /v1/models, and "
            "Ollama-style /api/chat, /api/generate, /api/tags. Listens on 127.0.0.1 only unless --host says "
            "otherwise, which needs an API key. Ctrl+C stops it."
        ),
    )
    p.add_argument(
        "--model",
        metavar="ID|PATH",
        help="installed bundle id or bundle folder (default: the model last used in the app, or the only one)",
    )
    p.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port (default: %(default)s)")
    p.add_argument("--api-key", metavar="KEY", help=f"require 'Authorization: Bearer KEY' (or set {API_KEY_ENV})")
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a browser origin allowed to call the API, e.g. http://localhost:3000 (repeat for more; '*' for any)",
    )
    p.add_argument(
        "--allow-remote-images",
        action="store_true",
        help="fetch http(s) image URLs in requests (off: only images sent inside the request are taken)",
    )
    p.add_argument(
        "--queue", type=int, default=QUEUE_SIZE, metavar="N", help="requests that may wait (default: %(default)s)"
    )
    add_engine_flags(p)
    p.set_defaults(func=run_serve)


def default_model() -> str:
    """The model last used in the app if it is installed, else the only installed one."""
    from owl_desktop.app.settings import Settings
    from owl_desktop.bundle import scan

    installed = [m for m in scan() if m.ok]
    last = Settings.load().last_model_id
    if last and any(m.id == last for m in installed):
        return last
    if len(installed) == 1:
        return installed[0].id
    if not installed:
        raise ServerError("no model is installed: pass --model PATH, or download one with `owl-desktop models pull`")
    names = ", ".join(m.id for m in installed)
    raise ServerError(f"several models are installed ({names}); choose one with --model ID")


def model_id_of(ref: str) -> str:
    from owl_desktop import bundle

    found = bundle.describe(bundle.resolve(ref))
    return found.id if found is not None else str(ref)


def run_serve(args: argparse.Namespace) -> int:
    from owl_desktop.app.engine_queue import EngineQueue
    from owl_desktop.app.settings import Settings
    from owl_desktop.server.config import ServerConfig
    from owl_desktop.server.host import StandaloneModel
    from owl_desktop.server.runner import ApiServer

    config = ServerConfig(
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        cors_origins=tuple(args.cors_origin),
        allow_remote_images=args.allow_remote_images,
    ).check()  # before any loading: an unsafe bind is refused at once
    if args.queue < 0:
        raise ServerError("--queue must be 0 or more")
    ref: str | Path = args.model or default_model()
    model_id = model_id_of(str(ref))

    model = StandaloneModel(ref, engine_settings(args), Settings.load().to_sampling(), EngineQueue(args.queue))
    server = ApiServer(model, config)
    server.start()
    _log_to_stderr()
    url = server.base_url
    print(f"owl-desktop API server on {url}", flush=True)
    print(f"  OpenAI: {url}/v1   Ollama: {url}   model: {model_id}", flush=True)
    if config.api_key:
        print("  an API key is required (Authorization: Bearer ...)", flush=True)
    print("Loading the model… (requests get 503 meanwhile; Ctrl+C stops the server)", flush=True)

    ended = threading.Event()
    failure: list[OwlError] = []

    def loaded(loaded_id: str | None, error: OwlError | None) -> None:
        if error is not None:
            failure.append(error)
            ended.set()
        else:
            print(f"Model {loaded_id} is ready.", flush=True)

    model.load_in_background(loaded)
    try:
        while not ended.wait(0.5):
            if not server.running:
                break
    except KeyboardInterrupt:
        print("\nStopping…", file=sys.stderr, flush=True)
    finally:
        server.stop()
        if not model.loading:
            model.close()
    if failure:
        raise failure[0]
    return 0


def _log_to_stderr() -> None:
    """Request lines and job timings to stderr (never request content)."""
    logger = logging.getLogger("owl_desktop")
    if not any(isinstance(h, logging.StreamHandler) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
