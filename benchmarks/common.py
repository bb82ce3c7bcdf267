"""Shared setup for the benchmarks: random-weight GPT-2 shapes, a matching word tokenizer, timers.

Speed does not depend on the weights, so models are random; a word-level tokenizer with exactly the
model's vocabulary lets the env decode completions and the reward model re-tokenise them.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from textenv.models import (
    build_tiny_causal_lm,
    build_tiny_reward_model,
    build_word_tokenizer,
    tiny_gpt2_config,
)

SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(vocab=1000, n_embd=64, n_layer=2, n_head=4),
    "small": dict(vocab=8000, n_embd=256, n_layer=4, n_head=4),
    "gpt2": dict(vocab=50257, n_embd=768, n_layer=12, n_head=12),  # GPT-2 small, 124M parameters
    # GPT-2's depth (12 blocks: its parameter tensors, modules and guards) with almost no arithmetic: a
    # step's time is then the host's (Python, dispatch, guards), which bounds a GPU step at batch 64.
    "host": dict(vocab=1000, n_embd=32, n_layer=12, n_head=2),
}


def build(shape: str, max_positions: int, device: str, dtype: torch.dtype) -> dict[str, Any]:
    """Policy, reference and reward model of one shape (random weights) and a tokenizer covering the vocab."""
    spec = SHAPES[shape]
    tokenizer = build_word_tokenizer([f"w{i}" for i in range(spec["vocab"] - 3)])
    config = tiny_gpt2_config(len(tokenizer), n_positions=max_positions, n_embd=spec["n_embd"], n_layer=spec["n_layer"], n_head=spec["n_head"])
    make = lambda seed: build_tiny_causal_lm(config, seed).to(device=device, dtype=dtype)  # noqa: E731
    reward = build_tiny_reward_model(config, seed=2).to(device=device, dtype=dtype)
    return {"policy": make(0), "reference": make(1), "reward": reward, "tokenizer": tokenizer}


def random_prompts(tokenizer, batch: int, length: int, seed: int = 0) -> list[str]:
    """``batch`` prompts of exactly ``length`` word tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, len(tokenizer), (batch, length), generator=gen)
    return [" ".join(f"w{i - 3}" for i in row.tolist()) for row in ids]


def synchronized_clock(device: str) -> float:
    """``time.perf_counter()`` once the GPU's queue has drained (so a time covers the work, not its launch)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    return time.perf_counter()


def timed(fn: Callable[[], Any], device: str, repeats: int) -> tuple[float, Any]:
    """Best wall time of ``repeats`` runs after one warm-up (synchronising CUDA around each)."""
    fn()
    return timed_alternating({"fn": fn}, device, repeats)["fn"]


def timed_alternating(
    fns: dict[str, Callable[[], Any]], device: str, repeats: int
) -> dict[str, tuple[float, Any]]:
    """Best wall time (and last result) of each function, timing them in turns: A, B, A, B, ...

    Each function must have been warmed up. On a shared machine, speed drifts by 10-30% over seconds;
    timing the sides in turns exposes both to the same drift, so their ratio is steadier than when one
    side's runs all come before the other's.
    """
    best = {name: (float("inf"), None) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = synchronized_clock(device)
            result = fn()
            best[name] = (min(best[name][0], synchronized_clock(device) - start), result)
    return best


def benchmark_parser(
    doc: str | None, shape: str = "tiny", batch: int = 64, new: int | None = 64, repeats: int | None = 3,
    textenv: bool = True,
) -> argparse.ArgumentParser:
    """The arguments every benchmark script shares: shape, batch, lengths, device, threads, repeats.

    :param new: default response length, or ``None`` for a script that sets lengths its own way.
    :param repeats: default timed repeats, or ``None`` for a script that times something else.
    :param textenv: add ``--bf16`` and ``--decoding`` (scripts that run a textenv rollout).
    """
    from textenv.static_decoding import DECODINGS

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default=shape)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--prompt", type=int, default=16)
    if new is not None:
        parser.add_argument("--new", type=int, default=new)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (both sides)")
    if repeats is not None:
        parser.add_argument("--repeats", type=int, default=repeats)
    if textenv:
        parser.add_argument("--bf16", action="store_true", help="bf16 weights (GPU)")
        parser.add_argument("--decoding", choices=DECODINGS, default="dynamic", help="textenv's KV cache / decode step")
        parser.add_argument(
            "--defer-kl", action="store_true",
            help="textenv computes the reference log-probs once per batch, after generation (as TRL does), "
            "instead of one cached reference forward per token",
        )  # fmt: skip
        parser.add_argument(
            "--no-prefetch", action="store_true",
            help="queue the policy's next forward when the agent asks for it, not at the end of the env's step "
            "(PolicyLink.prefetch): the order before, to compare",
        )  # fmt: skip
        parser.add_argument(
            "--guards-every-step", action="store_true",
            help="with --decoding compiled, check the compiled steps' dynamo guards at every step, not once per "
            "batch (textenv.static_decoding, 'Guards'): the cost before, to compare",
        )  # fmt: skip
        parser.add_argument(
            "--no-fused-sampling", action="store_true",
            help="sample with the eager log-softmax and inverse CDF, not one compiled call (textenv.fused_sampling, "
            "the default of --decoding compiled on CUDA): the cost before, to compare",
        )  # fmt: skip
    return parser


def apply_agent_options(agent, args) -> None:
    """Set ``--no-prefetch``, ``--guards-every-step`` and ``--no-fused-sampling`` on an agent's link and its env's
    reference decoder."""
    agent.link.prefetch_forward = not args.no_prefetch
    agent.link.fused_sampling &= not args.no_fused_sampling
    for decoder in (agent.link.decoder, agent.env.engine.reference):
        if hasattr(decoder, "guards_once_per_batch"):  # a static decoder
            decoder.guards_once_per_batch &= not args.guards_every_step


def agent_options(args) -> str:
    """How ``--no-prefetch``, ``--guards-every-step`` and ``--no-fused-sampling`` leave an agent's link, as a
    benchmark header prints it (fused sampling: the link's default for the decoding and device, unless off)."""
    from textenv.fused_sampling import default_fused_sampling

    guards = "every step" if args.guards_every_step else "once per batch"
    fused = default_fused_sampling(args.decoding, torch.device(args.device)) and not args.no_fused_sampling
    return f"prefetch={not args.no_prefetch} guards={guards} fused_sampling={fused}"


def parse_benchmark_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse, and apply ``--threads``."""
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args
