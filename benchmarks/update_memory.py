"""Peak memory and time of one update micro-batch: chunked taken-token log-probs vs the plain log-softmax.

The memory peak of a PPO iteration is its update: one forward and backward of the policy over ``b``
whole sequences, whose ``b × (T + 1) × V`` logits are the largest tensors. This script runs that step as
`agents.ppo.PPOAgent` does (policy with its value head, ``logits_to_keep=T + 1``, the entropy statistic as
in the first epoch, a clipped-surrogate-shaped loss on the log-probs plus a value loss, backward) twice in
the same process: with `agents.chunked_logprobs.chunked_taken_logprobs`, and with the plain
``log_softmax(logits.float()).gather(actions)`` it replaced. It prints each side's peak of tensor memory
allocated during the step (CUDA: ``max_memory_allocated``; CPU: `benchmarks.live_memory.LiveTensorPeak`),
its best time, and the ratios.

    python benchmarks/update_memory.py --shape small --batch 16 --prompt 16 --new 64 --threads 2       # CPU
    python benchmarks/update_memory.py --shape gpt2 --batch 64 --prompt 64 --new 128 --device cuda --bf16
    python benchmarks/update_memory.py --shape small --batch 16 --prompt 16 --new 64 --top-k 50 --top-p 0.9

``--temperature``, ``--top-k`` and ``--top-p`` set the sampling distribution both sides differentiate
through (truncated sampling sorts and masks the logits: more temporaries per chunk).
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from agents.chunked_logprobs import CHUNK_ELEMENTS, chunked_taken_logprobs  # noqa: E402
from agents.rollout import LOGPROB_FLOOR  # noqa: E402
from agents.value_head import PolicyWithValueHead  # noqa: E402
from benchmarks.common import benchmark_parser, build, parse_benchmark_args, timed_alternating  # noqa: E402
from benchmarks.live_memory import LiveTensorPeak  # noqa: E402
from textenv.sampling import SamplingConfig, entropy  # noqa: E402


def plain_taken_logprobs(
    logits: torch.Tensor, actions: torch.Tensor, sampling: SamplingConfig, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reference: the whole float32 distribution through autograd (entropy without autograd)."""
    T = actions.shape[1]
    logprobs_all = sampling.logprobs(logits[:, -T - 1 : -1].float())
    taken = logprobs_all.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    token_entropy = None
    if with_entropy:
        with torch.no_grad():
            token_entropy = entropy(logprobs_all.detach())
    return taken, token_entropy


def update_step(
    policy: PolicyWithValueHead, ids: torch.Tensor, T: int, path: Callable, bf16: bool, sampling: SamplingConfig
) -> None:
    """One micro-batch of PPO's update: forward, log-probs of the taken tokens, loss, backward."""
    autocast = torch.autocast(ids.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with autocast:
        logits, values = policy(ids, torch.ones_like(ids), logits_to_keep=T + 1)
    logprobs, token_entropy = path(logits, ids[:, -T:], sampling, True)
    del logits  # as in the agent: only autograd keeps the logits past this point
    ratio = torch.exp(logprobs.clamp(min=LOGPROB_FLOOR) - logprobs.detach().clamp(min=LOGPROB_FLOOR))
    loss = -ratio.clamp(0.8, 1.2).mean() + 0.1 * values[:, -T - 1 : -1].float().square().mean()
    loss.backward()
    assert token_entropy is not None
    policy.zero_grad(set_to_none=True)


def peak_bytes(fn: Callable[[], None], device: str) -> int:
    """Peak bytes of tensors allocated while ``fn`` runs, beyond what was allocated before."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with LiveTensorPeak() as probe:
        fn()
    return probe.peak_bytes


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Print both sides' peak memory and time; return them and the ratios (chunked / plain)."""
    parser = benchmark_parser(__doc__, batch=16, repeats=3, textenv=False)
    parser.add_argument(
        "--bf16", action="store_true",
        help="bf16 autocast for the forward, as PPOConfig.bf16 on a GPU (on the CPU: CPU autocast, which keeps "
        "the GPU's dtypes, so the memory figure models the GPU's)",
    )  # fmt: skip
    parser.add_argument("--chunk-elements", type=int, default=CHUNK_ELEMENTS, help="logits per chunk (chunked side)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (both sides)")
    parser.add_argument("--top-k", type=int, default=0, help="top-k sampling, 0 = off (both sides)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, 1 = off (both sides)")
    args = parse_benchmark_args(parser, argv)
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
    paths: dict[str, Callable] = {
        "plain": plain_taken_logprobs,
        "chunked": functools.partial(chunked_taken_logprobs, chunk_elements=args.chunk_elements),
    }
    models = build(args.shape, args.prompt + args.new, args.device, torch.float32)
    policy = PolicyWithValueHead(models["policy"]).train()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(models["tokenizer"]), (args.batch, args.prompt + args.new), generator=gen).to(args.device)
    bf16 = args.bf16
    steps = {name: (lambda path=path: update_step(policy, ids, args.new, path, bf16, sampling)) for name, path in paths.items()}
    V = models["policy"].config.vocab_size
    print(f"{args.shape} (V={V}), {args.batch} sequences x ({args.prompt} + {args.new}) tokens, "
          f"{args.device}{' bf16' if bf16 else ''}, {sampling}: one update micro-batch")  # fmt: skip
    if args.device.startswith("cuda"):  # first calls allocate cuBLAS workspaces: not either side's peak
        for step in steps.values():
            step()
    memory = {name: peak_bytes(step, args.device) / 2**30 for name, step in steps.items()}  # also the warm-up
    seconds = timed_alternating(steps, args.device, args.repeats)
    for name in paths:
        print(f"{name:8s}: peak {memory[name]:7.3f} GiB  best {seconds[name][0] * 1e3:9.1f} ms")
    result = {
        **{f"{name}_gib": memory[name] for name in paths},
        **{f"{name}_s": seconds[name][0] for name in paths},
        "memory_ratio": memory["chunked"] / memory["plain"],
        "speed_ratio": seconds["plain"][0] / seconds["chunked"][0],
    }
    print(f"chunked/plain: {result['memory_ratio']:.2f}x peak memory, {result['speed_ratio']:.2f}x speed")
    return result


if __name__ == "__main__":
    main()
