"""Deferred scoring: one reward call per batch, and the same rewards once each score sits at its last token."""

import copy
import os
import sys

import numpy as np
import pytest
import torch

from agents.ppo import PPOAgent, PPOConfig
from agents.value_head import PolicyWithValueHead
from textenv.rewards import KeywordReward, RewardFunction
from textenv.toy import make_toy_env

B = 6


class CountingReward(RewardFunction):
    """The toy keyword reward, counting its calls."""

    def __init__(self) -> None:
        self.inner = KeywordReward(["good", "great", "fun"])
        self.calls = 0

    def score(self, prompts, completions):
        self.calls += 1
        return self.inner.score(prompts, completions)


def play(defer: bool):
    """One batch with rows ending at different steps (a stop token); returns rewards, scores, RM calls."""
    reward = CountingReward()
    venv = make_toy_env(B, reward_fn=reward, stop_tokens=("good",), autoreset_mode="Disabled", max_new_tokens=10)
    venv.reset(seed=0, options={"defer_scores": defer})
    good = venv.tokenizer.convert_tokens_to_ids("good")
    rng = np.random.default_rng(0)
    rewards, last, scores = [], np.zeros(B, dtype=int), np.full(B, np.nan)
    for t in range(10):
        actions = rng.integers(3, 30, size=B)
        actions[rng.random(B) < 0.2] = good
        _, r, terminated, _, info = venv.step(actions)
        rewards.append(r)
        last[terminated] = t
        if "score" in info:
            scores[info["_score"]] = info["score"][info["_score"]]
        if venv.done.all():
            break
    return np.array(rewards), last, scores, reward.calls


def test_deferred_scoring_calls_the_reward_once_and_keeps_the_returns():
    per_step, last, scores, calls = play(defer=False)
    deferred, last_d, scores_d, calls_d = play(defer=True)
    assert len(set(last)) > 1, "every row ended at the same step: nothing to defer"
    assert calls > 1 and calls_d == 1
    np.testing.assert_array_equal(last, last_d)
    np.testing.assert_allclose(scores, scores_d)
    rows = np.arange(B)
    np.testing.assert_allclose(per_step[last, rows], deferred[last, rows] + scores_d)  # score at the last token
    deferred[last, rows] = per_step[last, rows]
    np.testing.assert_allclose(per_step, deferred)  # everywhere else the same -β·KL_t


def test_defer_scores_needs_disabled_autoreset_and_a_whole_batch():
    with pytest.raises(ValueError, match="Disabled"):
        make_toy_env(2).reset(seed=0, options={"defer_scores": True})
    venv = make_toy_env(2, autoreset_mode="Disabled")
    venv.reset(seed=0)
    before = [p.text for p in venv.engine.prompts]
    with pytest.raises(ValueError, match="whole batch"):
        venv.reset(options={"defer_scores": True, "reset_mask": [True, False]})
    assert [p.text for p in venv.engine.prompts] == before  # nothing changed
    venv.reset(options={"defer_scores": True})  # still usable
    venv.step(np.array([5, 6]))


def test_agent_rollout_puts_each_score_at_its_last_token():
    env = make_toy_env(8, autoreset_mode="Disabled", stop_tokens=("good",), max_new_tokens=6)
    agent = PPOAgent(PolicyWithValueHead(copy.deepcopy(env.reference_model)), env,
                     PPOConfig(minibatch_size=8, micro_batch_size=8))  # fmt: skip
    batch = agent.rollout()
    lengths = batch.mask.sum(1).long()
    assert len(set(lengths.tolist())) > 1
    # The policy is the reference, so every KL term is 0: each row's reward is its score, at its last token.
    expected = torch.zeros_like(batch.rewards)
    expected[torch.arange(8), lengths - 1] = torch.as_tensor(batch.scores, dtype=torch.float32)
    torch.testing.assert_close(batch.rewards, expected, atol=1e-6, rtol=0)
    assert batch.scores.any()
    # The recorded completions are the texts that were scored, and each is its row's generated tokens.
    np.testing.assert_allclose(env.engine.reward_fn(batch.prompts, batch.completions), batch.scores)
    tokenizer = env.engine.tokenizer
    for r, text in enumerate(batch.completions):
        assert text == tokenizer.decode(batch.actions[r, : lengths[r]].tolist(), skip_special_tokens=True)


def test_evaluation_scores_each_chunk_once_and_right():
    from agents.evaluation import evaluate_policy
    from textenv.toy import TOY_PROMPTS, toy_components

    parts = toy_components(0)
    reward = CountingReward()
    result = evaluate_policy(parts["model"], parts["model"], parts["tokenizer"], reward, TOY_PROMPTS * 2, 6, 8,
                             batch_size=4)  # fmt: skip
    assert reward.calls == 3  # 12 prompts in chunks of 4: one reward call per chunk
    samples = result.samples
    rescored = reward.inner.score([s["prompt"] for s in samples], [s["completion"] for s in samples])
    np.testing.assert_allclose([s["score"] for s in samples], rescored)


def test_evaluation_keeps_the_distribution_on_its_device(monkeypatch):
    """Evaluation draws through the link, on the policy's device: no host copy of the ``(B, V)`` distribution
    per step (on a GPU each would be a wait and B × V floats)."""
    from agents.evaluation import evaluate_policy
    from textenv.toy import TOY_PROMPTS, toy_components

    copies, cpu = [], torch.Tensor.cpu

    def counting(self, *args, **kwargs):
        if sys._getframe(1).f_code.co_filename.endswith(os.path.join("agents", "evaluation.py")) and self.ndim == 2:
            copies.append(tuple(self.shape))
        return cpu(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counting)
    parts = toy_components(0)
    result = evaluate_policy(parts["model"], parts["model"], parts["tokenizer"], CountingReward(), TOY_PROMPTS, 6, 8,
                             batch_size=4)  # fmt: skip
    assert copies == [] and len(result.samples) == len(TOY_PROMPTS)
