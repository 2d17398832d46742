"""`owl-desktop bench engine`: the engine's speed on one bundle, each figure against a baseline of the same run.

- image encode, cold and from the cache;
- prefill and decode tokens/s, time to first token for one image + a question;
- decode tokens/s through llama-cpp-python's own `Llama` class on the same GGUF and threads (goal: ours ≥ 0.97×);
- a short follow-up turn's time to first token against a from-scratch prefill of the same conversation (≤ 0.25×).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from owl_desktop.engine.llm import GenerationStats, Sampling, Tokens, reference_decode_rate
from owl_desktop.engine.pipeline import ChatPipeline, EngineSettings, HistoryTurn

QUESTION = "Describe this picture in detail."
FOLLOW_UP = "Why?"


@dataclass
class EngineBench:
    device: str
    vision_dtype: str
    threads: int
    encode_cold_ms: float
    encode_cached_ms: float
    prefill_tokens_per_s: float
    ttft_ms: float
    decode_tokens_per_s: float
    baseline_decode_tokens_per_s: float
    follow_up_ttft_ms: float
    scratch_ttft_ms: float

    @property
    def decode_ratio(self) -> float:
        return self.decode_tokens_per_s / self.baseline_decode_tokens_per_s

    @property
    def follow_up_ratio(self) -> float:
        return self.follow_up_ttft_ms / self.scratch_ttft_ms

    def report(self) -> str:
        return "\n".join(
            [
                f"vision: {self.device} {self.vision_dtype}; LLM threads: {self.threads}",
                f"image encode, cold:          {self.encode_cold_ms:9.1f} ms",
                f"image encode, cached:        {self.encode_cached_ms:9.1f} ms",
                f"prefill:                     {self.prefill_tokens_per_s:9.1f} positions/s",
                f"time to first token:         {self.ttft_ms:9.1f} ms (1 image + question, from scratch)",
                f"decode, owl-desktop:         {self.decode_tokens_per_s:9.1f} tokens/s",
                f"decode, llama_cpp.Llama:     {self.baseline_decode_tokens_per_s:9.1f} tokens/s",
                f"  ratio ours / Llama:        {self.decode_ratio:9.3f}   (goal >= 0.97)",
                f"follow-up first token:       {self.follow_up_ttft_ms:9.1f} ms (KV reused)",
                f"same conversation, scratch:  {self.scratch_ttft_ms:9.1f} ms",
                f"  ratio follow-up / scratch: {self.follow_up_ratio:9.3f}   (goal <= 0.25)",
            ]
        )


def _greedy(n: int) -> Sampling:
    return Sampling(greedy=True, max_new_tokens=n)


def _decode_rate_ours(pipe: ChatPipeline, ids: list[int], n: int) -> float:
    """Tokens/s of our decode loop after a text prefill (EOS is not special-cased: a long greedy run)."""
    pipe.llm.reset()
    stats = GenerationStats()
    for _ in pipe.llm.generate([Tokens(ids)], _greedy(n), stats):
        pass
    # the first token comes out of the prefill's logits; the rate covers the tokens decoded one by one after it
    return stats.decode_tokens_per_s


def _decode_rate_llama(path: Path, ids: list[int], n: int, pipe: ChatPipeline) -> float:
    """Tokens/s of llama-cpp-python's Llama class: same GGUF, threads, context and greedy sampling."""
    s = pipe.settings.llm
    return reference_decode_rate(
        path,
        ids,
        n,
        n_ctx=pipe.llm.n_ctx,
        n_batch=s.n_batch,
        threads=pipe.llm.threads,
        n_gpu_layers=s.n_gpu_layers if pipe.llm.gpu_offload else 0,
        flash_attn=s.flash_attn,
    )


def run(
    bundle_ref: str | Path, settings: EngineSettings, image: Path, *, decode_tokens: int = 64, repeats: int = 3
) -> EngineBench:
    # no disk cache: the cold encode must really encode
    with ChatPipeline.open(bundle_ref, replace(settings, disk_cache=False)) as pipe:
        # cold vs cached encode of the same image
        first = pipe.ask([image], QUESTION, sampling=_greedy(1))
        first.read()
        encode_cold = first.record.images[0].encode_ms
        again = pipe.ask([image], QUESTION, sampling=_greedy(1))
        again.read()
        encode_cached = again.record.images[0].encode_ms

        # time to first token and prefill rate from scratch (image already encoded: LLM only)
        ttfts, rates = [], []
        for _ in range(repeats):
            pipe.llm.reset()
            a = pipe.ask([image], QUESTION, sampling=_greedy(1))
            a.read()
            ttfts.append(a.record.time_to_first_token_ms)
            rates.append(a.record.context_used / (a.record.prefill_ms / 1000))

        # follow-up with KV reuse vs the same conversation from scratch
        base = pipe.ask([image], QUESTION, sampling=_greedy(32))
        base.read()
        history = [HistoryTurn([image], QUESTION, base.record.text, base.record.token_ids)]
        follow, scratch = [], []
        for _ in range(repeats):
            pipe.llm.reset()
            prime = pipe.ask([image], QUESTION, sampling=_greedy(32))  # the cache now holds turn one
            prime.read()
            f = pipe.ask([], FOLLOW_UP, history, sampling=_greedy(1))
            f.read()
            follow.append(f.record.time_to_first_token_ms)
            pipe.llm.reset()
            s = pipe.ask([], FOLLOW_UP, history, sampling=_greedy(1))
            s.read()
            scratch.append(s.record.time_to_first_token_ms)

        # decode: ours vs llama_cpp.Llama, alternating to share any drift of the machine
        ids = [pipe.bundle.config.text.bos_token_id] + pipe.llm.tokenize(QUESTION)
        ours, theirs = [], []
        for _ in range(repeats):
            ours.append(_decode_rate_ours(pipe, ids, decode_tokens))
            theirs.append(_decode_rate_llama(pipe.bundle.llm_path, ids, decode_tokens, pipe))
        return EngineBench(
            device=str(pipe.vision.device),
            vision_dtype=str(pipe.vision.dtype).replace("torch.", ""),
            threads=pipe.llm.threads,
            encode_cold_ms=encode_cold,
            encode_cached_ms=encode_cached,
            prefill_tokens_per_s=statistics.median(rates),
            ttft_ms=statistics.median(ttfts),
            decode_tokens_per_s=statistics.median(ours),
            baseline_decode_tokens_per_s=statistics.median(theirs),
            follow_up_ttft_ms=statistics.median(follow),
            scratch_ttft_ms=statistics.median(scratch),
        )


def as_dict(b: EngineBench) -> dict[str, Any]:
    return {**asdict(b), "decode_ratio": b.decode_ratio, "follow_up_ratio": b.follow_up_ratio}
