"""Rollout throughput: textenv (vector env + policy sampling + value + reference KL + RM) vs HF generate.

Both sides decode the same model shape, batch, prompt length and number of new tokens in this process.
HF ``generate`` does only sampling; the textenv rollout also runs the reference LM for the KL term, the
value head and the reward model at the end, so a ratio >= 1 means the whole RLHF rollout is at least as
fast as plain generation. Throughput counts ``batch × decode steps`` for both.

    python benchmarks/rollout.py --shape tiny --batch 64 --prompt 16 --new 64          # CPU
    python benchmarks/rollout.py --shape tiny --batch 64 --prompt 16 --new 64 --decoding compiled
    python benchmarks/rollout.py --shape gpt2 --batch 64 --prompt 64 --new 128 --device cuda --bf16 --decoding compiled
    python benchmarks/rollout.py --shape gpt2 --batch 256 --prompt 64 --new 128 --device cuda --bf16 --decoding compiled --defer-kl

``--defer-kl`` runs the reference once over the finished batch instead of once per token (docs/mdp.md,
"Deferred KL"); the rollout still yields every token's KL term.

The first (warm-up) run of each side is not timed, so ``compiled`` reports its steady state; its compile
time is printed separately. The two sides are then timed in turns (HF, textenv, HF, ...; best of
``--repeats`` each), so drift in a shared machine's speed hits both alike.
"""

from __future__ import annotations

import copy
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from agents.ppo import PPOAgent, PPOConfig
from agents.value_head import PolicyWithValueHead
from benchmarks.common import (
    agent_options,
    apply_agent_options,
    benchmark_parser,
    build,
    parse_benchmark_args,
    random_prompts,
    timed_alternating,
)
from textenv.rewards import RewardModelScorer
from textenv.vector_env import TextGenerationVectorEnv


def rollout_agent(models, prompts, args) -> PPOAgent:
    env = TextGenerationVectorEnv(
        models["reference"], RewardModelScorer(models["reward"], models["tokenizer"], batch_size=len(prompts), compile=args.decoding == "compiled"),
        prompts, num_envs=len(prompts), tokenizer=models["tokenizer"], max_prompt_tokens=args.prompt,
        max_new_tokens=args.new, autoreset_mode="Disabled", decoding=args.decoding,
    )  # fmt: skip
    policy = PolicyWithValueHead(copy.deepcopy(models["policy"]))
    config = PPOConfig(minibatch_size=len(prompts), micro_batch_size=len(prompts), bf16=args.bf16, decoding=args.decoding,
                       defer_kl=args.defer_kl)  # fmt: skip
    with warnings.catch_warnings():  # --bf16 gives the policy bf16 weights: fine here, as nothing trains
        warnings.filterwarnings("ignore", message="the policy trains")
        agent = PPOAgent(policy, env, config)
    apply_agent_options(agent, args)
    return agent


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_benchmark_args(benchmark_parser(__doc__, repeats=5), argv)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    models = build(args.shape, args.prompt + args.new, args.device, dtype)
    prompts = random_prompts(models["tokenizer"], args.batch, args.prompt)
    enc = models["tokenizer"](prompts, return_tensors="pt", padding=True).to(args.device)

    def hf_generate():
        with torch.no_grad():
            out = models["policy"].generate(
                **enc, do_sample=True, top_k=0, max_new_tokens=args.new, min_new_tokens=args.new,
                pad_token_id=models["tokenizer"].pad_token_id,
            )  # fmt: skip
        return out.shape[1] - enc["input_ids"].shape[1]

    agent = rollout_agent(models, prompts, args)

    def textenv_rollout():
        batch = agent.rollout()
        return int((batch.mask.sum(0) > 0).sum())  # decode steps taken

    hf_generate()  # warm-up, before anything is compiled in the process
    first = time.perf_counter()
    textenv_rollout()  # compiles the decode steps (and the RM) with --decoding compiled
    first = time.perf_counter() - first
    best = timed_alternating({"hf": hf_generate, "textenv": textenv_rollout}, args.device, args.repeats)
    (hf_time, hf_steps), (te_time, te_steps) = best["hf"], best["textenv"]
    hf_tps = args.batch * hf_steps / hf_time
    te_tps = args.batch * te_steps / te_time
    print(f"shape={args.shape} batch={args.batch} prompt={args.prompt} new={args.new} device={args.device} "
          f"bf16={args.bf16} decoding={args.decoding} defer_kl={args.defer_kl} {agent_options(args)}")  # fmt: skip
    print(f"HF generate       : {hf_tps:10.0f} tokens/s  ({hf_steps} steps in {hf_time:.3f} s)")
    print(f"textenv rollout   : {te_tps:10.0f} tokens/s  ({te_steps} steps in {te_time:.3f} s; + reference KL, value, RM)")
    print(f"ratio textenv/HF  : {te_tps / hf_tps:.2f}x")
    print(f"first textenv rollout (compiles with --decoding compiled): {first:.1f} s")
    return {"hf_tokens_per_s": hf_tps, "textenv_tokens_per_s": te_tps, "ratio": te_tps / hf_tps}


if __name__ == "__main__":
    main()
