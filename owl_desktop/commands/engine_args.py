"""Command-line flags shared by the commands that run the model (ask, chat, demo, bench engine)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from owl_desktop.engine import options
from owl_desktop.engine.options import LlmSettings, Sampling
from owl_desktop.errors import OwlError
from owl_desktop.exchange_format import ExchangeError, read_exchange


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    llm = LlmSettings()
    g.add_argument("--n-ctx", type=int, default=llm.n_ctx, metavar="N", help="context positions (default: %(default)s)")
    g.add_argument("--threads", type=int, metavar="N", help="LLM threads (default: physical cores)")
    g.add_argument(
        "--gpu-layers", type=int, default=llm.n_gpu_layers, metavar="N", help="LLM layers on the GPU (-1: all)"
    )
    g.add_argument("--flash-attn", choices=tuple(options.FLASH_ATTN_IDS), default=llm.flash_attn)
    g.add_argument("--kv-type", choices=tuple(options.KV_TYPE_IDS), default=llm.kv_type, help="KV cache type")
    g.add_argument("--device", choices=tuple(options.VISION_DEVICES), default="auto", help="vision encoder device")
    g.add_argument("--vision-dtype", choices=options.VISION_DTYPES, default="auto", help="vision dtype")


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    d = Sampling()
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=d.temperature)
    g.add_argument("--top-k", type=int, default=d.top_k)
    g.add_argument("--top-p", type=float, default=d.top_p)
    g.add_argument("--min-p", type=float, default=d.min_p)
    g.add_argument("--repeat-penalty", type=float, default=d.repeat_penalty)
    g.add_argument(
        "--no-repeat-ngram", type=int, default=d.no_repeat_ngram, metavar="N", help="ban repeating n-grams (0: off)"
    )
    g.add_argument("--seed", type=int, help="sampling seed (default: random)")
    g.add_argument("--greedy", action="store_true", help="pure argmax, every penalty off")
    g.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, metavar="N")


def engine_settings(args: argparse.Namespace) -> Any:
    from owl_desktop.engine.pipeline import EngineSettings

    llm = LlmSettings(
        n_ctx=args.n_ctx,
        n_threads=args.threads,
        n_gpu_layers=args.gpu_layers,
        flash_attn=args.flash_attn,
        kv_type=args.kv_type,
    )
    return EngineSettings(llm=llm, vision_device=args.device, vision_dtype=args.vision_dtype)


def sampling(args: argparse.Namespace) -> Sampling:
    return Sampling(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repeat_penalty=args.repeat_penalty,
        no_repeat_ngram=args.no_repeat_ngram,
        seed=args.seed,
        greedy=args.greedy,
        max_new_tokens=args.max_new_tokens,
    )


@dataclass(frozen=True)
class EarlierConversation:
    turns: list[Any]  # HistoryTurn (engine.pipeline, imported lazily: it pulls in torch)
    system_prompt: str | None


def load_conversation(path: Path) -> EarlierConversation:
    """Earlier turns from an export of the app: a folder, a .owlchat.zip, or a conversation JSON file."""
    from owl_desktop.engine.pipeline import HistoryTurn

    try:
        with read_exchange(path) as exchange:
            turns = [
                HistoryTurn([exchange.image_source(rel) for rel in t.images], t.question, t.answer)
                for t in exchange.turns
            ]
            return EarlierConversation(turns, exchange.meta.system_prompt)
    except ExchangeError as exc:
        raise OwlError(f"cannot use the conversation: {exc}") from exc
