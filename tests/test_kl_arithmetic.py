"""The env's per-step reference log-probs, KL and rewards, recomputed with independent full forwards."""

import math

import numpy as np
import pytest
import torch

from textenv import AdaptiveKLController, PolicyLink, SamplingConfig, kl_penalty
from textenv.models import build_tiny_causal_lm, tiny_gpt2_config
from textenv.toy import make_toy_env

TOL = 1e-5


def full_logprobs(model, ids: list[int]) -> torch.Tensor:
    """Log-probs of every next token, from one uncached forward over the unpadded sequence."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


def run_episode(env, policy_link=None, seed=0):
    obs, info = env.reset(seed=seed)
    gen = torch.Generator().manual_seed(seed)
    steps, done = [], False
    while not done:
        action = (
            int(policy_link.sample(gen)[0])
            if policy_link
            else int(torch.randint(3, int(env.action_space.n), (1,), generator=gen))
        )  # never EOS: full budget
        obs, reward, done, _, info = env.step(action)
        steps.append((action, reward, info))
    return obs, steps


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "full"])
def test_reference_logprobs_and_kl_match_full_forwards_without_policy(estimator):
    env = make_toy_env(kl_estimator=estimator, kl_coef=0.2)
    obs, steps = run_episode(env)
    ids = obs["input_ids"][obs["attention_mask"].astype(bool)].tolist()
    prompt_len = len(ids) - len(steps)
    ref = full_logprobs(env.reference_model, ids)
    V = env.action_space.n
    uniform = torch.full((V,), -math.log(V))
    for t, (action, reward, info) in enumerate(steps):
        ref_dist = ref[prompt_len + t - 1]
        assert info["ref_logprob"] == pytest.approx(float(ref_dist[action]), abs=TOL)
        assert info["logprob"] == pytest.approx(-math.log(V), abs=TOL)
        expected = kl_penalty(
            torch.tensor([-math.log(V)]),
            ref_dist[action].view(1),
            estimator,
            uniform.view(1, -1),
            ref_dist.view(1, -1),
        )
        assert info["kl"] == pytest.approx(float(expected), abs=TOL)
        score = info.get("score", 0.0)
        assert reward == pytest.approx(-0.2 * info["kl"] + score, abs=TOL)
    assert "score" in steps[-1][2] and "score" not in steps[0][2]
    assert steps[-1][2]["episode_kl"] == pytest.approx(sum(s[2]["kl"] for s in steps), abs=TOL)


@pytest.mark.parametrize(
    "sampling", [SamplingConfig(), SamplingConfig(temperature=0.7, top_k=5), SamplingConfig(top_p=0.8)]
)
def test_kl_with_bound_policy_matches_full_forwards(sampling):
    env = make_toy_env(kl_estimator="k1")
    policy = build_tiny_causal_lm(
        tiny_gpt2_config(int(env.action_space.n), n_positions=64, n_embd=32, n_layer=2, n_head=2), seed=7
    )
    link = env.bind_policy(PolicyLink(policy, sampling))
    obs, steps = run_episode(env, link, seed=3)
    ids = obs["input_ids"][obs["attention_mask"].astype(bool)].tolist()
    prompt_len = len(ids) - len(steps)
    ref = full_logprobs(env.reference_model, ids)
    with torch.no_grad():
        pol = sampling.logprobs(policy(torch.tensor([ids])).logits[0])
    for t, (action, _, info) in enumerate(steps):
        row = prompt_len + t - 1
        assert info["logprob"] == pytest.approx(float(pol[row, action]), abs=TOL)
        assert info["ref_logprob"] == pytest.approx(float(ref[row, action]), abs=TOL)
        assert info["kl"] == pytest.approx(float(pol[row, action] - ref[row, action]), abs=TOL)
        assert np.isfinite(info["logprob"]), (
            "a sampled token must have finite log-prob under the sampling distribution"
        )


def test_policy_equal_to_reference_gives_zero_kl():
    env = make_toy_env()
    link = env.bind_policy(env.reference_model)
    _, steps = run_episode(env, link)
    assert all(abs(info["kl"]) < TOL for _, _, info in steps)


def test_adaptive_controller_is_fed_by_finished_episodes():
    controller = AdaptiveKLController(value=0.1, target=1000.0, horizon=10)
    env = make_toy_env(kl_coef=controller)
    _, steps = run_episode(env)
    # One finished episode whose KL is far below the target: beta shrinks by the clipped step (20% / horizon).
    assert controller.value == pytest.approx(0.1 * (1 - 0.2 * 1 / 10))
    assert steps[-1][2]["kl_coef"] == pytest.approx(0.1)
