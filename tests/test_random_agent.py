"""The random baseline: its distribution, its exact KL, and `evaluate`'s averages."""

import math

import numpy as np
import pytest
import torch

from agents.random_agent import RandomAgent, evaluate
from textenv.toy import make_toy_env


def test_evaluate_reports_means_and_is_deterministic():
    env = make_toy_env(max_new_tokens=4)
    a = evaluate(env, 30, seed=3)
    b = evaluate(env, 30, seed=3)
    assert a == b
    assert set(a) == {"score", "return", "kl", "length", "n_episodes"}
    assert 0 <= a["score"] <= 1 and 1 <= a["length"] <= 4
    assert a["return"] == pytest.approx(a["score"] - 0.1 * a["kl"], abs=1e-6)  # r = score - β·Σ KL_t
    assert evaluate(env, 30, seed=4) != a


def test_uniform_agent_kl_matches_the_envs_uniform_assumption():
    # With nothing bound the env assumes a policy uniform over the action space: the random agent's
    # provided distribution is exactly that, so the same actions give the same KL.
    env = make_toy_env(max_new_tokens=4)
    agent = RandomAgent.for_env(env)
    provided = evaluate(env, 1, seed=0)
    assert env.policy is None  # evaluate restored the (absent) binding
    obs, _ = env.reset(seed=0)  # the same prompt and samples as evaluate's episode
    gen = torch.Generator().manual_seed(0)
    kl, done = 0.0, False
    while not done:
        action = int(torch.multinomial(agent.logprobs(obs).exp(), 1, generator=gen))
        obs, _, done, _, info = env.step(action)
        assert info["logprob"] == pytest.approx(-math.log(env.action_space.n))
        kl += info["kl"]
    assert provided["kl"] == pytest.approx(kl, abs=1e-6)


def test_tokenizer_only_and_min_length():
    env = make_toy_env(max_new_tokens=3)
    n_tok = len(env.tokenizer)
    agent = RandomAgent.for_env(env, tokenizer_only=True, min_length=3)
    obs, _ = env.reset(seed=0)
    lp = agent.logprobs(obs)
    assert torch.isinf(lp[n_tok:]).all() and torch.isinf(lp[env.tokenizer.eos_token_id])
    assert float(torch.logsumexp(lp, 0)) == pytest.approx(0.0, abs=1e-6)
    gen = torch.Generator().manual_seed(0)
    picks = {agent.act(obs, gen) for _ in range(200)}
    assert max(picks) < n_tok and env.tokenizer.eos_token_id not in picks and len(picks) > 10
    result = evaluate(env, 40, seed=0, agent=agent)
    assert result["length"] == 3  # EOS never sampled before the budget
    free = RandomAgent.for_env(env, tokenizer_only=True)
    assert np.isfinite(float(free.logprobs(obs)[env.tokenizer.eos_token_id]))


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_ids"):
        RandomAgent(10, num_ids=11)
    with pytest.raises(ValueError, match="n_episodes"):
        evaluate(make_toy_env(), 0)
