"""Where a rollout's time goes: ``torch.profiler`` tables of one steady-state textenv rollout.

Same models and settings as ``benchmarks/rollout.py``; the first rollout (which compiles with
``--decoding compiled``) is not profiled. Prints the top operators by device time and by host time, so
the gap between the two (launch- or sync-bound host work) is visible. ``--syncs`` instead counts the
operations that make the host wait for the GPU (``torch.cuda.set_sync_debug_mode``) and where they are.

    python benchmarks/profile_rollout.py --shape tiny --batch 64 --prompt 16 --new 64 --decoding compiled
    python benchmarks/profile_rollout.py --shape gpt2 --batch 256 --prompt 64 --new 128 --device cuda --bf16 --decoding compiled
    python benchmarks/profile_rollout.py --shape tiny --batch 64 --new 64 --device cuda --syncs
    python benchmarks/profile_rollout.py --shape gpt2 --batch 64 --prompt 64 --new 128 --device cuda --bf16 --decoding compiled --defer-kl --update

``--update`` profiles a PPO update instead (4 epochs over the batch in ``--minibatches`` minibatches), of
`benchmarks/ppo_vs_trl.py`'s agent: float32 policy weights under bf16 autocast with ``--bf16``, after one
whole untimed iteration, so that first-use costs (kernel loading, the allocator's growth) are not in it.
"""

from __future__ import annotations

import collections
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from benchmarks.common import benchmark_parser, build, parse_benchmark_args, random_prompts
from benchmarks.ppo_vs_trl import textenv_agent
from benchmarks.rollout import rollout_agent


def count_syncs(agent, steps: int) -> None:
    """Print how many operations of one rollout wait for the GPU, per decode step, and from where."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            agent.rollout()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchronizing" in str(w.message)]
    print(f"synchronising operations in one rollout of {steps} steps: {len(syncs)} ({len(syncs) / steps:.2f} per step)")
    sites = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)
    for site, n in sites.most_common():
        print(f"  {n:5d}  {site}")


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Print the tables; return each operator's self host time in ms (empty with ``--syncs``)."""
    parser = benchmark_parser(__doc__, repeats=None)
    parser.add_argument("--rows", type=int, default=30, help="operators per table")
    parser.add_argument("--syncs", action="store_true", help="count host-device synchronisations (CUDA)")
    parser.add_argument("--update", action="store_true", help="profile a PPO update (4 epochs), not a rollout")
    parser.add_argument("--minibatches", type=int, default=1, help="with --update: minibatches per PPO epoch")
    args = parse_benchmark_args(parser, argv)
    if args.syncs and not args.device.startswith("cuda"):
        parser.error("--syncs counts GPU synchronisations: it needs --device cuda")
    if args.syncs and args.update:
        parser.error("--syncs counts a rollout's synchronisations: leave out --update")
    if args.batch % args.minibatches:
        parser.error("--minibatches must divide --batch")
    torch.manual_seed(0)
    cuda = args.device.startswith("cuda")
    prompts_of = lambda models: random_prompts(models["tokenizer"], args.batch, args.prompt)  # noqa: E731
    if args.update:  # as benchmarks/ppo_vs_trl.py trains: float32 policy weights (autocast with --bf16)
        models = build(args.shape, args.prompt + args.new, args.device, torch.float32)
        agent = textenv_agent(models, prompts_of(models), args, total_iterations=2)[0]
        agent.iteration_step()  # warm-up: compiles, and the update's first-use costs
        batch = agent.rollout()
        work, what = (lambda: agent.update(batch)), "update"
    else:
        models = build(args.shape, args.prompt + args.new, args.device, torch.bfloat16 if args.bf16 else torch.float32)
        agent = rollout_agent(models, prompts_of(models), args)
        agent.rollout()  # warm-up (compiles)
        work, what = agent.rollout, "rollout"
    if args.syncs:
        count_syncs(agent, args.new)
        return {}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        work()
        if cuda:
            torch.cuda.synchronize()
    print(f"profiled {what}: {time.perf_counter() - start:.3f} s (with profiler overhead)")
    averages = prof.key_averages()
    if cuda:
        print(averages.table(sort_by="self_cuda_time_total", row_limit=args.rows))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return {event.key: event.self_cpu_time_total / 1e3 for event in averages}


if __name__ == "__main__":
    main()
