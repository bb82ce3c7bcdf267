"""Deferred KL: one reference forward per finished batch gives the same KL, rewards and β as one per token.

The tests run on the CPU. ``TEXTENV_TEST_DEVICE=cuda`` runs the env-level ones on a GPU instead
(benchmarks/gpu_suite.sh does), where the full-sequence forward and the cached one use different kernels.
"""

import os

import numpy as np
import pytest
import torch

import textenv.sequence_logprobs
from agents.ppo import PPOAgent, PPOConfig
from agents.reinforce import RLOOAgent, RLOOConfig
from agents.value_head import PolicyWithValueHead
from textenv import AdaptiveKLController, PolicyLink
from textenv.errors import InvalidActionError
from textenv.sequence_logprobs import token_logprobs
from textenv.toy import make_toy_env, toy_components

B, T = 6, 8
TOL = 1e-5
DEVICE = torch.device(os.environ.get("TEXTENV_TEST_DEVICE", "cpu"))


class CountingReward:
    """The toy keyword reward, counting its calls."""

    def __init__(self) -> None:
        self.inner = toy_components()["reward_fn"]
        self.calls = 0

    def __call__(self, prompts, completions):
        self.calls += 1
        return self.inner.score(prompts, completions)


def policy_env(estimator: str = "k1", decoding: str = "dynamic", kl_coef=None, **kwargs):
    """The toy vector env (B rows, stop token "good") with a bound policy that is not the reference;
    by default an adaptive KL controller that moves fast."""
    venv = make_toy_env(
        B, stop_tokens=("good",), autoreset_mode="Disabled", max_new_tokens=T, kl_estimator=estimator,
        kl_coef=kl_coef or AdaptiveKLController(0.2, target=1.0, horizon=10), device=DEVICE, decoding=decoding,
        **kwargs,
    )  # fmt: skip
    link = venv.bind_policy(PolicyLink(toy_components(seed=3)["model"].to(DEVICE), decoding=decoding))
    return venv, link


def play(venv, link, options: dict, seed: int = 0):
    """One batch sampled from the bound policy, some tokens replaced by the stop token so rows end at
    different steps; returns ``[(rewards, terminated, info), ...]``."""
    venv.reset(seed=seed, options=options)
    good = venv.tokenizer.convert_tokens_to_ids("good")
    gen, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    steps = []
    while not venv.done.all():
        actions = link.sample(gen).cpu().numpy()
        actions[rng.random(B) < 0.15] = good
        _, rewards, terminated, _, info = venv.step(actions)
        steps.append((rewards, terminated, info))
    return steps


def per_token(steps, key: str) -> np.ndarray:
    """``(B, T)`` of a per-step info value where its mask is set, NaN elsewhere."""
    out = np.full((B, T), np.nan)
    for t, (_, _, info) in enumerate(steps):
        out[info[f"_{key}"], t] = info[key][info[f"_{key}"]]
    return out


def assert_same_kl(per_step_steps, deferred_last: dict, lengths: np.ndarray) -> None:
    """The deferred batch's per-token values equal the per-step ones (and nothing past each episode's end)."""
    generated = np.arange(T) < lengths[:, None]
    for key in ("logprob", "ref_logprob", "kl"):
        np.testing.assert_allclose(deferred_last[f"token_{key}"], per_token(per_step_steps, key), atol=TOL, err_msg=key)
    assert np.isnan(deferred_last["token_kl"][~generated]).all()
    assert not np.isnan(deferred_last["token_kl"][generated]).any()
    rewards = np.stack([r for r, _, _ in per_step_steps], axis=1)  # defer_scores: -β·KL_t only
    np.testing.assert_allclose(deferred_last["token_reward"], np.where(generated, rewards, 0.0), atol=TOL)


@pytest.mark.parametrize(
    "estimator, decoding, one_row_chunks", [("k1", "dynamic", False), ("k2", "static", True), ("k3", "dynamic", True)]
)
def test_deferred_kl_matches_the_per_token_kl(estimator, decoding, one_row_chunks, monkeypatch):
    if one_row_chunks:  # the batch's reference forward in B chunks of one row
        monkeypatch.setattr(textenv.sequence_logprobs, "MAX_LOGIT_ELEMENTS", 1)
    reward, reward_d = CountingReward(), CountingReward()
    env, link = policy_env(estimator, decoding, reward_fn=reward)
    env_d, link_d = policy_env(estimator, decoding, reward_fn=reward_d)
    steps = play(env, link, {"defer_scores": True})
    steps_d = play(env_d, link_d, {"defer_kl": True})
    lengths = env.engine.gen_len.cpu().numpy()
    assert len(set(lengths)) > 1, "every row ended at the same step: nothing ends early"
    np.testing.assert_array_equal(env.engine.ids.cpu().numpy(), env_d.engine.ids.cpu().numpy())  # same episodes
    assert reward.calls == reward_d.calls == 1
    *before, (_, _, last) = steps_d
    for rewards, _, info in before:  # nothing about the KL is known before the batch ends
        assert not rewards.any() and not info["_kl"].any() and not info["_ref_logprob"].any()
        assert np.isnan(info["kl"]).all() and np.isnan(info["ref_logprob"]).all()
        assert "token_kl" not in info and "episode_kl" not in info
    assert_same_kl(steps, last, lengths)
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


def test_batches_of_either_kind_follow_each_other():
    """Per-token, deferred, per-token, deferred on one env: each batch as on an env that ran only it."""
    env, link = policy_env(kl_coef=0.1)  # a fixed β: a fresh env's β is the same
    for seed, defer_kl in ((1, False), (2, True), (3, False), (4, True)):
        steps = play(env, link, {"defer_scores": True, "defer_kl": defer_kl}, seed=seed)
        fresh, fresh_link = policy_env(kl_coef=0.1)
        fresh_steps = play(fresh, fresh_link, {"defer_scores": True}, seed=seed)
        np.testing.assert_array_equal(env.engine.ids.cpu().numpy(), fresh.engine.ids.cpu().numpy())
        if defer_kl:
            assert_same_kl(fresh_steps, steps[-1][2], fresh.engine.gen_len.cpu().numpy())
        else:
            np.testing.assert_allclose(per_token(steps, "kl"), per_token(fresh_steps, "kl"), atol=TOL)


def test_deferred_kl_runs_one_reference_forward_per_batch():
    calls = []
    env, link = policy_env()
    play(env, link, {"defer_scores": True})
    per_token_forwards = env.engine.reference.forward_calls
    env_d, link_d = policy_env(render_mode="ansi")
    env_d.reference_model.register_forward_hook(lambda *_: calls.append(1))
    steps = play(env_d, link_d, {"defer_kl": True})
    assert per_token_forwards > T / 2  # the prefill and one cached forward per step
    assert env_d.engine.reference.forward_calls == 0 and len(calls) == 1
    env_d.engine.step(torch.zeros(B, dtype=torch.long), np.zeros(B, dtype=bool))  # nothing active: no rerun
    assert len(calls) == 1
    # What `render` shows is filled in once the KL is known.
    info = steps[-1][2]
    records = env_d.engine.history[2]
    assert [r.kl for r in records] == pytest.approx(info["token_kl"][2, : len(records)].tolist(), abs=1e-9)
    assert [r.reward for r in records] == pytest.approx(info["token_reward"][2, : len(records)].tolist(), abs=1e-9)


def test_an_invalid_action_in_a_deferred_batch_changes_nothing():
    env, link = policy_env()
    twin, twin_link = policy_env()
    env.reset(seed=0, options={"defer_kl": True})
    twin.reset(seed=0, options={"defer_kl": True})
    gen = torch.Generator().manual_seed(0)
    last = None
    for t in range(T):
        actions = link.sample(gen).cpu().numpy()
        twin_link.logprobs()  # the twin's policy sees the same states
        if t == 2:
            bad = actions.copy()
            bad[1] = env.action_space.nvec[0]  # one past the action space
            with pytest.raises(InvalidActionError):
                env.step(bad)
        *_, last = env.step(actions)
        *_, twin_last = twin.step(actions)
        if env.done.all():
            break
    assert env.done.all() and twin.done.all()
    for key in ("token_logprob", "token_ref_logprob", "token_kl", "token_reward"):
        np.testing.assert_array_equal(last[key], twin_last[key])


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
    venv, twin = (make_toy_env(2, autoreset_mode="Disabled") for _ in range(2))
    for env in (venv, twin):
        env.reset(seed=0, options={"defer_kl": True})
        env.step(np.array([5, env.tokenizer.eos_token_id]))  # row 1 ends
    before = [p.text for p in venv.engine.prompts]
    with pytest.raises(ValueError, match="defers its KL"):
        venv.reset(options={"reset_mask": [False, True]})
    with pytest.raises(ValueError, match="defers its KL"):
        venv.engine.reset_rows([1], venv.engine.prompts[1:])
    assert [p.text for p in venv.engine.prompts] == before  # nothing changed
    for env in (venv, twin):
        _, _, _, _, info = env.step(np.array([env.tokenizer.eos_token_id, 5]))  # the batch ends and is scored
        assert info["_token_kl"].all() and np.isfinite(info["episode_kl"]).all()
        env.reset()  # a per-token batch follows, with the prompts each row's generator draws next
    assert [p.text for p in venv.engine.prompts] == [p.text for p in twin.engine.prompts]  # no draw was lost
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
        return agent.rollout(), env

    (plain, _), (deferred, env) = rollout(False), rollout(True)
    # The agent's first reset deferred the KL too: the env's reference never ran a cached forward, and holds no
    # KV cache through the run.
    assert env.engine.reference.forward_calls == 0 and env.engine.reference.cache is None
    torch.testing.assert_close(deferred.actions, plain.actions, atol=0, rtol=0)
    assert len(set(plain.mask.sum(1).tolist())) > 1
    torch.testing.assert_close(deferred.rewards, plain.rewards, atol=TOL, rtol=0)
    np.testing.assert_allclose(deferred.kl, plain.kl, atol=1e-4)
    np.testing.assert_allclose(deferred.scores, plain.scores)
    assert np.abs(plain.kl).min() > 100 * TOL
    assert deferred.completions == plain.completions
