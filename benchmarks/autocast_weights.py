"""PPO's rollout step under bf16 autocast: float32 weights converted at every forward vs a bf16 copy held per batch.

Under ``PPOConfig(bf16=True)`` the policy keeps float32 weights for AdamW and its forwards run under bf16
autocast, which converts every matmul weight to bf16 at every forward. That includes each decode step of a
rollout, compiled or not. `agents.autocast_weight_copy.AutocastWeightCopy` (on by default,
``PPOConfig.rollout_weight_copy``) rolls out on bf16 copies of those weights instead, written once per
batch. In eager decoding the outputs are the same bit for bit; the script prints whether they were, and
the largest difference (inductor may fuse the two compiled GPU steps differently).

This script decodes one batch both ways in the same process, each forward in its own autocast block as a
`PolicyLink` runs it. It times the two in turns and prints the time per step and the ratio. The batch's
refresh (one conversion of every weight) is timed on its own. `benchmarks/rollout.py` does not show the
difference: its policy holds bf16 weights.

    python benchmarks/autocast_weights.py --shape gpt2 --batch 8 --new 32 --decoding compiled --threads 2
    python benchmarks/autocast_weights.py --shape gpt2 --prompt 64 --new 128 --batch 64 --device cuda --decoding compiled
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from agents.autocast_weight_copy import AutocastWeightCopy  # noqa: E402
from benchmarks.common import (  # noqa: E402
    benchmark_parser,
    build,
    parse_benchmark_args,
    random_prompts,
    timed,
    timed_alternating,
)
from textenv.incremental import IncrementalLM  # noqa: E402
from textenv.static_decoding import DECODINGS, make_decoder  # noqa: E402


def decode_batch(
    decoder: IncrementalLM, sequences: list[torch.Tensor], steps: int, autocast: Callable[[], AbstractContextManager]
) -> torch.Tensor:
    """Prefill, then ``steps`` decode steps of one token per row, each forward in its own ``autocast`` block."""
    B = len(sequences)
    with torch.no_grad():
        with autocast():
            out = decoder.start(sequences, reserve=steps + 1)
        for _ in range(steps):
            with autocast():
                out = decoder.step(torch.full((B,), 5, device=out.logits.device))
    return out.logits


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = benchmark_parser(__doc__, shape="small", textenv=False)
    parser.add_argument("--decoding", choices=DECODINGS, default="compiled", help="the policy's decode step")
    args = parse_benchmark_args(parser, argv)
    models = build(args.shape, args.prompt + args.new, args.device, torch.float32)  # PPO's policy: float32 weights
    policy, tokenizer, B, steps = models["policy"].eval(), models["tokenizer"], args.batch, args.new - 1
    sequences = [torch.tensor(tokenizer(p)["input_ids"]) for p in random_prompts(tokenizer, B, args.prompt)]
    autocast = functools.partial(torch.autocast, torch.device(args.device).type, dtype=torch.bfloat16)
    weights = AutocastWeightCopy(policy, autocast)
    if not weights.active:
        raise SystemExit(f"no bf16 copy was made for the {args.shape} shape on {args.device}: nothing to compare")
    decoders = {"converted per forward": make_decoder(policy, args.decoding),
                "bf16 copy": make_decoder(weights.module, args.decoding)}  # fmt: skip
    runs = {name: functools.partial(decode_batch, decoder, sequences, steps, autocast) for name, decoder in decoders.items()}
    converted, held = (run().float() for run in runs.values())  # the first runs compile
    times = timed_alternating(runs, args.device, args.repeats)
    refresh = timed(weights.refresh, args.device, args.repeats)[0]
    ms = {name: 1000 * seconds / steps for name, (seconds, _) in times.items()}
    ms["refresh (once per batch)"] = 1000 * refresh
    print(f"shape={args.shape} batch={B} prompt={args.prompt} new={args.new} device={args.device} "
          f"decoding={args.decoding} threads={torch.get_num_threads()}")  # fmt: skip
    print(f"same logits bit for bit: {torch.equal(converted, held)} (largest difference "
          f"{(converted - held).abs().max().item():.3g})")
    for name, value in ms.items():
        print(f"{name:<28}: {value:8.3f} ms" + ("" if name.startswith("refresh") else " per step"))
    ms["ratio"] = ms["converted per forward"] / ms["bf16 copy"]
    print(f"bf16 copy vs converted per forward: {ms['ratio']:.2f}x faster per step")
    return ms


if __name__ == "__main__":
    main()
