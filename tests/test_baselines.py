"""The sequence-level baselines (REINFORCE, RLOO, GRPO): advantages by hand, learning, run folders, bad input."""

import copy
import math

import numpy as np
import pytest
import torch

from agents.grpo import GRPOAgent, GRPOConfig, group_normalized_advantages
from agents.policy_gradient import episode_returns, policy_gradient_loss
from agents.reinforce import ReinforceAgent, ReinforceConfig, RLOOAgent, RLOOConfig, leave_one_out_advantages
from agents.run import TIMING_KEYS, TrainingRun
from textenv.toy import make_toy_env

ALGORITHMS = {
    "reinforce": (ReinforceAgent, ReinforceConfig),
    "rloo": (RLOOAgent, RLOOConfig),
    "grpo": (GRPOAgent, GRPOConfig),
}


def make_agent(algorithm: str, num_envs: int = 16, max_new_tokens: int = 5, kl_coef: float = 0.02, **config):
    agent_class, config_class = ALGORITHMS[algorithm]
    env = make_toy_env(num_envs, autoreset_mode="Disabled", kl_coef=kl_coef, max_new_tokens=max_new_tokens)
    settings = dict(learning_rate=3e-3, samples_per_prompt=4, minibatch_size=8)
    settings.update(config)
    return agent_class(copy.deepcopy(env.reference_model), env, config_class(**settings))


# ============================================================================================ advantages
def test_rloo_leave_one_out_by_hand():
    returns = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 4.0, 4.0])
    expected = [1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 6 / 3, 0 - 8 / 3, 0 - 8 / 3, 4 - 4 / 3, 4 - 4 / 3]
    advantages = leave_one_out_advantages(returns, 4)
    assert advantages.tolist() == pytest.approx(expected)
    # The identity A_i = K/(K−1)·(R_i − group mean), and each group's advantages sum to 0.
    groups = returns.view(2, 4)
    assert advantages.tolist() == pytest.approx((4 / 3 * (groups - groups.mean(1, keepdim=True))).reshape(-1).tolist())
    assert advantages.view(2, 4).sum(1).tolist() == pytest.approx([0.0, 0.0], abs=1e-6)


def test_grpo_group_normalisation_by_hand():
    returns = torch.tensor([1.0, 3.0, 2.0, 2.0, -1.0, 5.0])
    advantages = group_normalized_advantages(returns, 2, eps=1e-4)
    s = 1 / (math.sqrt(2) + 1e-4)  # group {1, 3}: mean 2, unbiased std √2; group {-1, 5}: mean 2, std 3√2
    assert advantages.tolist() == pytest.approx([-s, s, 0.0, 0.0, -3 / (3 * math.sqrt(2) + 1e-4), 3 / (3 * math.sqrt(2) + 1e-4)])
    centered = group_normalized_advantages(returns, 2, scale_by_std=False)
    assert centered.tolist() == pytest.approx([-1.0, 1.0, 0.0, 0.0, -3.0, 3.0])


def test_reinforce_moving_average_baseline_by_hand():
    agent = make_agent("reinforce", num_envs=4, minibatch_size=4, baseline_decay=0.5)
    # First batch: no history, so its own mean (2) is the baseline.
    assert agent.advantages(torch.tensor([1.0, 3.0, 1.0, 3.0])).tolist() == pytest.approx([-1, 1, -1, 1])
    agent.iteration = 1
    # Second batch: only the past, i.e. the first batch's mean 2 (bias-corrected EMA of one value).
    assert agent.advantages(torch.tensor([5.0, 5.0, 5.0, 9.0])).tolist() == pytest.approx([3, 3, 3, 7])
    agent.iteration = 2
    # Third: decay-weighted mean of the past batch means 2 (weight 0.5) and 6 (weight 1) = 14/3.
    assert agent.advantages(torch.tensor([4.0, 4.0, 4.0, 4.0])).tolist() == pytest.approx([4 - 14 / 3] * 4)
    assert agent.advantage_stats()["baseline"] == pytest.approx(14 / 3)
    # The raw average lives in the value head's bias (so checkpoints carry it): m = 0.5·m + 0.5·mean.
    assert float(agent.policy.value_head.bias.detach()) == pytest.approx(((0.5 * 2 * 0.5 + 0.5 * 6) * 0.5) + 0.5 * 4)


def test_policy_gradient_loss_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    advantages = torch.tensor([2.0, -1.0])
    loss, clipfrac, approx_kl = policy_gradient_loss(logprobs, logprobs, advantages, mask, None, "sum")
    assert float(loss) == pytest.approx((2 * 3 + -1 * 0.5) / 2)  # −A·Σ log π, mean over sequences
    assert float(clipfrac) == 0 and float(approx_kl) == 0
    loss, _, _ = policy_gradient_loss(logprobs, logprobs, advantages, mask, None, "mean")
    assert float(loss) == pytest.approx((2 * 1.5 + -1 * 0.5) / 2)
    # Clipped: ratio e^0.5 > 1.2 on a positive advantage is clipped (no gradient), on a negative one not.
    new = (logprobs + 0.5 * mask).requires_grad_()
    loss, clipfrac, _ = policy_gradient_loss(new, logprobs, advantages, mask, 0.2, "sum")
    assert float(loss.detach()) == pytest.approx((-2 * 1.2 * 2 + 1 * math.exp(0.5)) / 2)
    assert float(clipfrac) == pytest.approx(2 / 3)
    loss.backward()
    assert new.grad[0].abs().sum() == 0 and new.grad[1, 0] != 0


# ============================================================================================ rollout
def test_rollout_groups_prompts_and_returns_match_the_env():
    agent = make_agent("rloo", num_envs=8, samples_per_prompt=4)
    batch = agent.rollout()
    assert len(set(batch.prompts[:4])) == 1 and len(set(batch.prompts[4:])) == 1
    beta = agent.env.kl_controller.value
    # The return is the env's: RM score − β·Σ KL (the env's per-step rewards summed).
    assert episode_returns(batch).numpy() == pytest.approx(batch.scores - beta * batch.kl, abs=1e-5)
    again = make_agent("rloo", num_envs=8, samples_per_prompt=4).rollout()
    assert again.prompts == batch.prompts and torch.equal(again.actions, batch.actions)


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_stats_and_gold(algorithm):
    agent_class, config_class = ALGORITHMS[algorithm]
    env = make_toy_env(8, autoreset_mode="Disabled", max_new_tokens=4)
    gold = lambda prompts, completions: np.array([len(c) for c in completions], dtype=float)  # noqa: E731
    agent = agent_class(copy.deepcopy(env.reference_model), env, config_class(minibatch_size=4, top_k=10), gold)
    stats = agent.iteration_step()
    for key in ("score", "kl", "kl_coef", "entropy", "response_length", "tokens_per_s", "gold", "policy_loss"):
        assert np.isfinite(stats[key]), key
    assert stats["iteration"] == 1 and stats["gold"] > 0


# ============================================================================================ learning
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_baseline_raises_reward(algorithm, seed):
    torch.manual_seed(seed)
    agent = make_agent(algorithm, seed=seed)
    history = [agent.iteration_step() for _ in range(20)]
    before = np.mean([h["score"] for h in history[:2]])
    after = np.mean([h["score"] for h in history[-2:]])
    print(f"{algorithm} seed {seed}: keyword score {before:.3f} -> {after:.3f}, KL {history[-1]['kl']:.2f}")
    assert after > before + 0.3, (before, after)
    assert history[-1]["kl"] > 0


# ============================================================================================ run folder
def make_run(algorithm, run_dir):
    agent = make_agent(algorithm, num_envs=8, max_new_tokens=4, kl_coef=0.05, minibatch_size=4, seed=3, learning_rate=1e-3)
    return TrainingRun(agent, run_dir, checkpoint_every=2)


def strip_timing(metrics):
    return [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in metrics]


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_resume_reproduces_an_uninterrupted_run(tmp_path, algorithm):
    full = make_run(algorithm, tmp_path / "full").train(4, progress=False)
    assert [m["iteration"] for m in full] == [1, 2, 3, 4]
    for name in ("config.json", "metrics.jsonl", "plots/score.png", "latest.json", "policy/config.json"):
        assert (tmp_path / "full" / name).is_file(), name
    make_run(algorithm, tmp_path / "killed").train(2, progress=False)  # "killed" after the checkpoint at 2
    resumed = make_run(algorithm, tmp_path / "killed").train(4, resume=True, progress=False)
    assert strip_timing(resumed) == strip_timing(full)


# ============================================================================================ bad input
@pytest.mark.parametrize(
    ("config_class", "settings", "field"),
    [
        (ReinforceConfig, {"learning_rate": 0.0}, "learning_rate"),
        (ReinforceConfig, {"baseline_decay": 1.0}, "baseline_decay"),
        (ReinforceConfig, {"samples_per_prompt": 0}, "samples_per_prompt"),
        (RLOOConfig, {"samples_per_prompt": 1}, "samples_per_prompt"),
        (RLOOConfig, {"token_reduction": "max"}, "token_reduction"),
        (GRPOConfig, {"samples_per_prompt": 1}, "samples_per_prompt"),
        (GRPOConfig, {"clip_range": -0.1}, "clip_range"),
        (GRPOConfig, {"epochs": 0}, "epochs"),
        (GRPOConfig, {"std_eps": 0.0}, "std_eps"),
        (GRPOConfig, {"minibatch_size": 0}, "minibatch_size"),
        (GRPOConfig, {"max_grad_norm": 0.0}, "max_grad_norm"),
        (GRPOConfig, {"temperature": 0.0}, "temperature"),
    ],
)
def test_bad_config_names_the_field(config_class, settings, field):
    with pytest.raises(ValueError, match=field):
        config_class(**settings)


def test_agents_refuse_bad_setups():
    env = make_toy_env(8, max_new_tokens=4)  # NextStep autoreset
    lm = copy.deepcopy(env.reference_model)
    with pytest.raises(ValueError, match="autoreset_mode='Disabled'"):
        GRPOAgent(lm, env, GRPOConfig(minibatch_size=4))
    env = make_toy_env(6, autoreset_mode="Disabled", max_new_tokens=4)
    with pytest.raises(ValueError, match="samples_per_prompt=4 must divide"):
        RLOOAgent(lm, env, RLOOConfig(minibatch_size=4))
    with pytest.raises(ValueError, match="minibatch_size 16 exceeds"):
        ReinforceAgent(lm, env, ReinforceConfig(samples_per_prompt=2))
    with pytest.raises(TypeError, match="GRPOAgent needs a GRPOConfig"):
        GRPOAgent(lm, env, RLOOConfig(samples_per_prompt=2, minibatch_size=4))
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        leave_one_out_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="do not split into groups of 3"):
        group_normalized_advantages(torch.zeros(4), 3)
