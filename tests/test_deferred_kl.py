"""Deferred KL: one reference forward per finished batch gives the same KL, rewards and β as one per token."""

import numpy as np
import pytest
import torch

from agents.ppo import PPOAgent, PPOConfig
from agents.reinforce import RLOOAgent, RLOOConfig
from agents.value_head import PolicyWithValueHead
from textenv import AdaptiveKLController, PolicyLink
from textenv.sequence_logprobs import token_logprobs
from textenv.toy import make_toy_env, toy_components

B, T = 6, 8
TOL = 1e-5


class CountingReward:
    """The toy keyword reward, counting its calls."""

    def __init__(self) -> None:
        self.inner = toy_components()["reward_fn"]
        self.calls = 0

    def __call__(self, prompts, completions):
        self.calls += 1
        return self.inner.score(prompts, completions)


def play(defer_kl: bool, estimator: str = "k1"):
    """One batch sampled from a policy that is not the reference, rows ending at different steps."""
    reward = CountingReward()
    venv = make_toy_env(
        B, reward_fn=reward, stop_tokens=("good",), autoreset_mode="Disabled", max_new_tokens=T,
        kl_estimator=estimator, kl_coef=AdaptiveKLController(0.2, target=1.0, horizon=10),
    )  # fmt: skip
    link = venv.bind_policy(PolicyLink(toy_components(seed=3)["model"]))
    venv.reset(seed=0, options={"defer_scores": True, "defer_kl": defer_kl})
    good = venv.tokenizer.convert_tokens_to_ids("good")
    gen, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    steps = []
    while not venv.done.all():
        actions = link.sample(gen).numpy()
        actions[rng.random(B) < 0.15] = good
        _, rewards, terminated, _, info = venv.step(actions)
        steps.append((rewards, terminated, info))
    return venv, steps, reward.calls


def per_token(steps, key: str) -> np.ndarray:
    """``(B, T)`` of a per-step info value where its mask is set, NaN elsewhere."""
    out = np.full((B, T), np.nan)
    for t, (_, _, info) in enumerate(steps):
        out[info[f"_{key}"], t] = info[key][info[f"_{key}"]]
    return out


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_deferred_kl_matches_the_per_token_kl(estimator):
    env, steps, calls = play(defer_kl=False, estimator=estimator)
    env_d, steps_d, calls_d = play(defer_kl=True, estimator=estimator)
    lengths = env.engine.gen_len.numpy()
    assert len(set(lengths)) > 1, "every row ended at the same step: nothing ends early"
    np.testing.assert_array_equal(env.engine.ids.numpy(), env_d.engine.ids.numpy())  # the same episodes
    assert calls == calls_d == 1
    *before, (_, _, last) = steps_d
    for rewards, _, info in before:  # nothing about the KL is known before the batch ends
        assert not rewards.any() and not info["_kl"].any() and "token_kl" not in info and "episode_kl" not in info
    generated = np.arange(T) < lengths[:, None]
    for key in ("logprob", "ref_logprob", "kl"):
        np.testing.assert_allclose(last[f"token_{key}"], per_token(steps, key), atol=TOL, err_msg=key)
    assert np.isnan(last["token_kl"][~generated]).all() and not np.isnan(last["token_kl"][generated]).any()
    rewards = np.stack([r for r, _, _ in steps], axis=1)  # defer_scores: -β·KL_t only
    np.testing.assert_allclose(last["token_reward"], np.where(generated, rewards, 0.0), atol=TOL)
    assert last["_episode_kl"].all()
    ended_kl = np.full(B, np.nan)
    for _, terminated, info in steps:
        if terminated.any():
            ended_kl[terminated] = info["episode_kl"][terminated]
    np.testing.assert_allclose(last["episode_kl"], ended_kl, atol=1e-4)
    np.testing.assert_allclose(last["score"], steps[-1][2]["score"])
    assert np.abs(ended_kl).min() > 100 * TOL, "policy equals reference: the test would not see a wrong KL"
    assert env_d.engine.kl_controller.value == pytest.approx(env.engine.kl_controller.value, abs=1e-6)
    assert env_d.engine.kl_controller.value != 0.2  # the controller moved once, with the deferred KL


def test_deferred_kl_runs_one_reference_forward_per_batch():
    calls = []
    env, _, _ = play(defer_kl=False)
    per_token_forwards = env.engine.reference.forward_calls
    env_d = make_toy_env(B, autoreset_mode="Disabled", max_new_tokens=T, render_mode="ansi")
    env_d.bind_policy(PolicyLink(toy_components(seed=3)["model"]))
    env_d.reference_model.register_forward_hook(lambda *_: calls.append(1))
    env_d.reset(seed=0, options={"defer_kl": True})
    while not env_d.done.all():
        *_, info = env_d.step(np.full(B, 5))
    assert per_token_forwards > T / 2  # the prefill and one cached forward per step
    assert env_d.engine.reference.forward_calls == 0 and len(calls) == 1
    # What `render` shows is filled in once the KL is known.
    records = env_d.engine.history[2]
    assert [r.kl for r in records] == pytest.approx(info["token_kl"][2].tolist(), abs=1e-9)
    assert [r.reward for r in records] == pytest.approx(info["token_reward"][2].tolist(), abs=1e-9)


def test_token_logprobs_in_chunks_match_one_forward_and_unpadded_forwards():
    model = toy_components()["model"]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 40, (5, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :3] = mask[2, :1] = 0  # left padding
    whole = token_logprobs(model, ids, mask, first=4, count=5)
    chunked = token_logprobs(model, ids, mask, first=4, count=5, max_elements=1)  # one row per chunk
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=0)
    for r in range(5):
        real = ids[r][mask[r].bool()]
        with torch.no_grad():
            full = torch.log_softmax(model(real.view(1, -1)).logits[0].float(), -1)
        expected = full[len(real) - 6 : len(real) - 1].gather(-1, real[-5:].view(-1, 1)).squeeze(-1)
        torch.testing.assert_close(whole[r], expected, atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="cannot score"):
        token_logprobs(model, ids, mask, first=0, count=5)


def test_defer_kl_refuses_what_it_cannot_do_and_leaves_the_env_usable():
    with pytest.raises(ValueError, match="Disabled"):
        make_toy_env(2).reset(seed=0, options={"defer_kl": True})
    with pytest.raises(ValueError, match="single-sample"):
        make_toy_env(2, autoreset_mode="Disabled", kl_estimator="full").reset(seed=0, options={"defer_kl": True})
    venv = make_toy_env(2, autoreset_mode="Disabled")
    venv.reset(seed=0, options={"defer_kl": True})
    venv.step(np.array([5, venv.tokenizer.eos_token_id]))  # row 1 ends
    before = [p.text for p in venv.engine.prompts]
    with pytest.raises(ValueError, match="defers its KL"):
        venv.reset(options={"reset_mask": [False, True]})
    assert [p.text for p in venv.engine.prompts] == before  # nothing changed
    with pytest.raises(ValueError, match="defers its KL"):
        venv.engine.reset_rows([1], before[:1])
    _, _, _, _, info = venv.step(np.array([venv.tokenizer.eos_token_id, 5]))  # the batch ends and is scored
    assert info["_token_kl"].all() and np.isfinite(info["episode_kl"]).all()
    venv.reset(seed=1)  # a per-token batch follows
    _, _, _, _, info = venv.step(np.array([5, 6]))
    assert info["_kl"].all()


@pytest.mark.parametrize("agent_kind", ["ppo", "rloo"])
def test_agents_collect_the_same_rollout_with_a_deferred_kl(agent_kind):
    def rollout(defer_kl: bool):
        env = make_toy_env(8, autoreset_mode="Disabled", stop_tokens=("good",), max_new_tokens=T, kl_coef=0.1)
        policy = PolicyWithValueHead(toy_components(seed=3)["model"])
        if agent_kind == "ppo":
            agent = PPOAgent(policy, env, PPOConfig(minibatch_size=8, micro_batch_size=8, defer_kl=defer_kl))
        else:
            agent = RLOOAgent(policy, env, RLOOConfig(minibatch_size=8, samples_per_prompt=2, defer_kl=defer_kl))
        return agent.rollout()

    plain, deferred = rollout(False), rollout(True)
    torch.testing.assert_close(deferred.actions, plain.actions, atol=0, rtol=0)
    assert len(set(plain.mask.sum(1).tolist())) > 1
    torch.testing.assert_close(deferred.rewards, plain.rewards, atol=TOL, rtol=0)
    np.testing.assert_allclose(deferred.kl, plain.kl, atol=1e-4)
    np.testing.assert_allclose(deferred.scores, plain.scores)
    assert np.abs(plain.kl).min() > 100 * TOL
    assert deferred.completions == plain.completions
