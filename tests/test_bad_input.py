"""Every bad input raises an exception naming the problem, and the env stays usable after reset."""

import numpy as np
import pytest
import torch

from textenv import EpisodeEndedError, InvalidActionError, PromptError, RewardError
from textenv.rewards import CallableReward
from textenv.toy import make_toy_env


def still_usable(env):
    obs, _ = env.reset(seed=1)
    obs, reward, _, _, info = env.step(3)  # a normal step works again
    assert obs["input_ids"][env.engine.max_prompt_tokens] == 3 and info["kl"] == info["kl"]


@pytest.mark.parametrize(
    "action, message",
    [
        (-1, "outside the action space"),
        (10_000, "outside the action space"),
        (1.5, "integer token id"),
        (np.float32(3.0), "integer token id"),
        (np.array([1, 2]), "shape"),
        (np.array([[1]]), "shape"),
        ("a", "integer token id"),
        (True, "integer token id"),
    ],
)
def test_invalid_action(action, message):
    env = make_toy_env()
    env.reset(seed=0)
    with pytest.raises(InvalidActionError, match=message):
        env.step(action)
    env.step(4)  # the failed step changed nothing: the same episode continues
    still_usable(env)


def test_accepts_numpy_and_torch_scalar_actions():
    env = make_toy_env()
    env.reset(seed=0)
    env.step(np.int64(3))
    env.step(np.array(4))
    env.step(torch.tensor(5))


def test_step_after_end_and_before_reset():
    env = make_toy_env(max_new_tokens=2)
    with pytest.raises(EpisodeEndedError, match="before reset"):
        env.step(3)
    env.reset(seed=0)
    env.step(3)
    _, _, terminated, _, _ = env.step(3)
    assert terminated
    with pytest.raises(EpisodeEndedError, match="after the episode ended"):
        env.step(3)
    still_usable(env)


def test_empty_prompt():
    env = make_toy_env()
    with pytest.raises(PromptError, match="empty prompt"):
        env.reset(options={"prompt": "   "})
    still_usable(env)


def test_overlong_prompt_rejected_or_truncated():
    long_prompt = "the movie was very very good and the acting was great"
    strict = make_toy_env(overflow="error")
    with pytest.raises(PromptError, match="longer than max_prompt_tokens=6"):
        strict.reset(options={"prompt": long_prompt})
    still_usable(strict)
    lenient = make_toy_env()
    obs, info = lenient.reset(options={"prompt": long_prompt})
    assert info["prompt"] == "good and the acting was great"
    assert obs["attention_mask"][:6].sum() == 6  # kept the last 6 tokens


def test_reward_returning_nan_is_an_error():
    calls = {"n": 0}

    def flaky(prompts, completions):
        calls["n"] += 1
        return [float("nan")] if calls["n"] == 1 else [1.0]

    env = make_toy_env(reward_fn=CallableReward(flaky, name="flaky"), max_new_tokens=1)
    env.reset(seed=0)
    with pytest.raises(RewardError, match="flaky.*not finite"):
        env.step(3)
    env.reset(seed=0)
    _, reward, terminated, _, info = env.step(3)
    assert terminated and info["score"] == 1.0


def test_reward_of_wrong_length_is_an_error():
    env = make_toy_env(reward_fn=lambda p, c: [1.0, 2.0], max_new_tokens=1)
    env.reset(seed=0)
    with pytest.raises(RewardError, match="2 scores for 1 episodes"):
        env.step(3)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="kl_estimator"):
        make_toy_env(kl_estimator="k9")
    with pytest.raises(ValueError, match="render_mode"):
        make_toy_env(render_mode="human")
    with pytest.raises(ValueError, match="overflow"):
        make_toy_env(overflow="drop")
    with pytest.raises(ValueError, match="stop token 'zzz'"):
        make_toy_env(stop_tokens=["zzz"])
    with pytest.raises(ValueError, match="unknown reset options"):
        make_toy_env().reset(options={"promt": "the movie"})


def test_vector_env_bad_actions():
    venv = make_toy_env(3)
    venv.reset(seed=0)
    with pytest.raises(InvalidActionError, match="shape"):
        venv.step(np.array([1, 2]))
    with pytest.raises(InvalidActionError, match="integer"):
        venv.step(np.array([1.0, 2.0, 3.0]))
    with pytest.raises(InvalidActionError, match="outside"):
        venv.step(np.array([1, 2, 99999]))
    venv.step(np.array([3, 4, 5]))


@pytest.mark.parametrize("bad", [-1, 99999])
def test_vector_env_out_of_range_tensor_action_changes_nothing(bad):
    """The range is checked in the step's one device read, after the new state is computed out of place:
    the failed step must leave every row, the KL sums and the reference cache as a twin env's that never saw it."""
    venv, twin = make_toy_env(3), make_toy_env(3)
    venv.reset(seed=0)
    twin.reset(seed=0)
    for env in (venv, twin):
        env.step(torch.tensor([3, 4, 5]))
    with pytest.raises(InvalidActionError, match=f"action {bad} is outside the action space"):
        venv.step(torch.tensor([6, bad, 7]))
    obs, rewards, terminated, _, info = venv.step(torch.tensor([6, 8, 7]))
    twin_obs, twin_rewards, twin_terminated, _, twin_info = twin.step(torch.tensor([6, 8, 7]))
    for key in obs:
        np.testing.assert_array_equal(obs[key], twin_obs[key])
    np.testing.assert_allclose(rewards, twin_rewards, rtol=1e-6)
    np.testing.assert_array_equal(terminated, twin_terminated)
    np.testing.assert_allclose(info["ref_logprob"], twin_info["ref_logprob"], rtol=1e-6)
    np.testing.assert_allclose(venv.engine.episode_kl, twin.engine.episode_kl, rtol=1e-6)
    assert obs["input_ids"][1, venv.engine.max_prompt_tokens + 1] == 8


def test_policy_with_wrong_vocabulary_is_refused():
    from textenv.models import build_tiny_causal_lm, tiny_gpt2_config

    env = make_toy_env()
    other = build_tiny_causal_lm(tiny_gpt2_config(17, n_positions=64, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="disagree on the action space"):
        env.bind_policy(other)
    still_usable(env)


def test_engine_reset_rows_checks_rows_before_writing():
    """Row indices are checked on the host: on a GPU a bad index would be a fatal device-side assert."""
    venv = make_toy_env(3)
    engine = venv.engine
    prompt = venv.prompt_source.encode("the movie")
    with pytest.raises(RuntimeError, match="first reset must start every row"):
        engine.reset_rows([0], [prompt])
    assert engine.done.all() and engine.prompts == [None, None, None]  # nothing was written
    venv.reset(seed=0)
    before = engine.observation()
    for rows in ([0, 0], [3], [-1]):
        with pytest.raises(ValueError, match="distinct indices"):
            engine.reset_rows(rows, [prompt] * len(rows))
    with pytest.raises(ValueError, match="2 rows to reset but 1 prompts"):
        engine.reset_rows([0, 1], [prompt])
    for now, then in zip(engine.observation(), before, strict=True):
        np.testing.assert_array_equal(now, then)
    venv.step(np.array([3, 4, 5]))  # still usable
