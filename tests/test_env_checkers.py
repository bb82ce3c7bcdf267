"""Gymnasium's and stable-baselines3's env checkers pass, with zero warnings, on every registered id."""

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
