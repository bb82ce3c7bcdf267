"""Gymnasium's and stable-baselines3's env checkers pass, with zero warnings, on every registered id."""

import functools
import warnings

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import textenv

CHEAP_IDS = [i for i in textenv.ENV_IDS if i not in textenv.registration.TRAINED_IDS]


def _check_without_warnings(env: gym.Env) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gym_check_env(env)
        sb3_check_env(env)
    messages = [str(w.message) for w in caught]
    assert messages == [], messages


@pytest.mark.parametrize("env_id", CHEAP_IDS)
def test_checkers_pass_on_registered_env(env_id):
    env = gym.make(env_id, render_mode="ansi")
    _check_without_warnings(env.unwrapped)


@pytest.mark.parametrize("env_id", textenv.registration.TRAINED_IDS)
def test_checkers_pass_on_trained_task_env(env_id, task_home):
    env = gym.make(env_id, render_mode="ansi")
    _check_without_warnings(env.unwrapped)


@pytest.mark.parametrize("env_id", CHEAP_IDS)
def test_checkers_pass_on_vector_env_single_counterpart(env_id):
    venv = gym.make_vec(env_id, num_envs=3, vectorization_mode="vector_entry_point")
    assert isinstance(venv, textenv.TextGenerationVectorEnv)
    single = gym.make(env_id).unwrapped
    assert single.observation_space == venv.single_observation_space
    assert single.action_space == venv.single_action_space
    _check_without_warnings(single)


def test_vector_env_declares_autoreset_mode():
    venv = gym.make_vec("textenv/Toy-v0", num_envs=2, vectorization_mode="vector_entry_point")
    assert venv.metadata["autoreset_mode"] == gym.vector.AutoresetMode.NEXT_STEP
    disabled = textenv.toy.make_toy_env(2, autoreset_mode="Disabled")
    assert disabled.metadata["autoreset_mode"] == gym.vector.AutoresetMode.DISABLED


def test_specs_serialise_and_the_reward_source_is_an_ordinary_kwarg(task_home):
    """String entry points and JSON kwargs: ``spec.to_json()`` works (dataset tools store it) and the spec
    round-trips through it; ``reward`` overrides the task's default like any kwarg."""
    for env_id in textenv.ENV_IDS:
        spec = gym.spec(env_id)
        assert gym.envs.registration.EnvSpec.from_json(spec.to_json()) == spec
    default, gold = gym.make("textenv/Sentiment-v0"), gym.make("textenv/Sentiment-v0", reward="gold")
    assert (default.spec.kwargs["reward"], gold.spec.kwargs["reward"]) == ("rm", "gold")
    assert isinstance(default.unwrapped.engine.reward_fn, textenv.RewardModelScorer)
    assert not isinstance(gold.unwrapped.engine.reward_fn, textenv.RewardModelScorer)
    # The vector entry point takes the override too.
    make_vec = functools.partial(gym.make_vec, "textenv/Sentiment-v0", num_envs=2, vectorization_mode="vector_entry_point")
    assert isinstance(make_vec().engine.reward_fn, textenv.RewardModelScorer)
    assert not isinstance(make_vec(reward="gold").engine.reward_fn, textenv.RewardModelScorer)


def test_stable_baselines3_makes_envs_from_their_ids():
    """SB3's ``make_vec_env(id)`` and ``PPO(policy, id)`` ask for ``render_mode="rgb_array"`` and retry without
    one only on a TypeError: the render-mode error is both a ValueError and a TypeError."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    with pytest.raises(textenv.UnsupportedRenderModeError, match="render_mode must be one of"):
        gym.make("textenv/Toy-v0", render_mode="rgb_array")
    vec = make_vec_env("textenv/Toy-v0", n_envs=2, seed=0)
    assert vec.num_envs == 2 and vec.reset()["input_ids"].shape[0] == 2
    assert PPO("MultiInputPolicy", "textenv/Toy-v0", n_steps=8, batch_size=8).learn(8).num_timesteps >= 8


def test_make_vec_takes_max_episode_steps_as_gymnasium_vector_envs_do():
    """``make_vec`` hands ``max_episode_steps`` to the vector entry point: a limit the token budget reaches
    first is accepted; a shorter one would truncate unscored episodes and is refused with the alternatives."""
    venv = gym.make_vec("textenv/Toy-v0", num_envs=2, vectorization_mode="vector_entry_point", max_episode_steps=8)
    assert venv.engine.max_new_tokens == 8
    with pytest.raises(ValueError, match=r"max_episode_steps=2 .* pass max_new_tokens=2"):
        gym.make_vec("textenv/Toy-v0", num_envs=2, vectorization_mode="vector_entry_point", max_episode_steps=2)
    short = gym.make_vec("textenv/Toy-v0", num_envs=2, vectorization_mode="vector_entry_point", max_new_tokens=2)
    short.reset(seed=0)
    short.step([3, 3])
    assert short.step([3, 3])[2].all()
