"""Per-token rollout cost as the response grows: flat with KV caches, linear without.

For each response length the textenv rollout (policy + value + reference KL + RM) runs once per repeat;
the script prints milliseconds per decode step, and the same for an uncached loop that re-runs the
whole sequence every token (what a naive env would do), so the difference is visible in one run.

    python benchmarks/scaling.py --shape tiny --batch 16 --lengths 32,64,128,256,512
    python benchmarks/scaling.py --shape gpt2 --batch 64 --prompt 64 --device cuda --bf16 --decoding compiled

With ``--decoding compiled`` each length is a new cache shape, compiled in the untimed warm-up run.
``--no-uncached`` skips the uncached loop (it does not depend on ``--decoding``): on a GPU the compiles
already take most of a 10-minute call.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from benchmarks.common import (  # noqa: E402
    agent_options,
    benchmark_parser,
    build,
    parse_benchmark_args,
    random_prompts,
    timed,
)
from benchmarks.rollout import rollout_agent  # noqa: E402


def uncached_steps(model, ids: torch.Tensor, steps: int) -> None:
    """The naive env: one full forward of the whole sequence per generated token."""
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = benchmark_parser(__doc__, batch=16, new=None, repeats=2)
    parser.add_argument("--lengths", default="32,64,128,256,512")
    parser.add_argument("--no-uncached", action="store_true", help="skip the uncached (full re-forward) loop")
    args = parse_benchmark_args(parser, argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    models = build(args.shape, args.prompt + max(lengths), args.device, torch.bfloat16 if args.bf16 else torch.float32)
    prompts = random_prompts(models["tokenizer"], args.batch, args.prompt)
    rows = []
    print(f"shape={args.shape} batch={args.batch} prompt={args.prompt} device={args.device} bf16={args.bf16} "
          f"decoding={args.decoding} defer_kl={args.defer_kl} {agent_options(args)}")  # fmt: skip
    print(f"{'new tokens':>10} {'textenv ms/step':>16} {'uncached ms/step':>17}")
    for new in lengths:
        settings = types.SimpleNamespace(prompt=args.prompt, new=new, bf16=args.bf16, decoding=args.decoding, defer_kl=args.defer_kl,
                                         no_prefetch=args.no_prefetch, guards_every_step=args.guards_every_step,
                                         no_fused_sampling=args.no_fused_sampling)  # fmt: skip
        agent = rollout_agent(models, prompts, settings)
        seconds, steps = timed(lambda a=agent: int((a.rollout().mask.sum(0) > 0).sum()), args.device, args.repeats)
        naive = float("nan")
        if not args.no_uncached:
            ids = models["tokenizer"](prompts, return_tensors="pt")["input_ids"].to(args.device)
            naive, _ = timed(lambda n=new, i=ids: uncached_steps(models["policy"], i, n), args.device, 1)
        row = {"new_tokens": new, "ms_per_step": 1000 * seconds / steps, "uncached_ms_per_step": 1000 * naive / new}
        rows.append(row)
        print(f"{new:>10} {row['ms_per_step']:>16.2f} {row['uncached_ms_per_step']:>17.2f}")
    first, last = rows[0]["ms_per_step"], rows[-1]["ms_per_step"]
    uncached = "" if args.no_uncached else (
        f" (uncached: {rows[-1]['uncached_ms_per_step'] / rows[0]['uncached_ms_per_step']:.2f}x)"
    )
    print(f"textenv per-step cost grows {last / first:.2f}x from {lengths[0]} to {lengths[-1]} tokens{uncached}")
    return rows


if __name__ == "__main__":
    main()
