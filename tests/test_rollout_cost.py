"""Per generated token the env runs one incremental reference forward of one position per row."""

import torch

from textenv import PolicyLink
from textenv.toy import make_toy_env


def test_one_incremental_reference_forward_per_token():
    env = make_toy_env(max_new_tokens=8)
    env.reset(seed=0)
    ref = env.engine.reference
    calls, tokens = ref.forward_calls, ref.tokens_processed
    prompt_tokens = int(env.engine.mask[0].sum())
    steps = 0
    done = False
    while not done:
        _, _, done, _, _ = env.step(5)  # never EOS: runs the full budget
        steps += 1
    assert steps == 8
    # One prefill at reset, then one forward per step except the last (nothing to predict after it).
    assert ref.forward_calls - calls == steps - 1
    assert ref.tokens_processed - tokens == steps - 1  # one new position each, never the whole sequence
    assert tokens == prompt_tokens


def test_policy_runs_once_per_token_whoever_asks_first():
    env = make_toy_env(max_new_tokens=6)
    link = env.bind_policy(PolicyLink(env.reference_model))
    env.reset(seed=0)
    gen = torch.Generator().manual_seed(0)
    for t in range(6):
        # Odd steps: the agent asks the link first; even steps: a scripted action, so the env asks.
        action = int(link.sample(gen)[0]) if t % 2 else 5
        _, _, done, _, _ = env.step(action)
        if done:
            break
    # One prefill, then one forward per token that had a successor.
    assert link.decoder.forward_calls == 1 + t
    assert link.decoder.tokens_processed == int(env.engine.mask[0][:6].sum()) + t
