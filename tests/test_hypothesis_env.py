"""Random action sequences and reset options never crash the env or leave its spaces."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from textenv.toy import TOY_WORDS, make_toy_env

ENV = make_toy_env(stop_tokens=("good",))
VENV = make_toy_env(3, stop_tokens=("good",))
V = ENV.action_space.n
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    prompt=st.one_of(st.none(), st.lists(st.sampled_from(TOY_WORDS), min_size=1, max_size=10).map(" ".join)),
    actions=st.lists(st.integers(0, V - 1), min_size=1, max_size=20),
)
def test_random_episodes_stay_in_spaces(seed, prompt, actions):
    options = None if prompt is None else {"prompt": prompt}
    obs, _ = ENV.reset(seed=seed, options=options)
    assert ENV.observation_space.contains(obs)
    for action in actions:
        obs, reward, terminated, truncated, info = ENV.step(action)
        assert ENV.observation_space.contains(obs)
        assert np.isfinite(reward) and not truncated
        assert np.isfinite(info["kl"]) and np.isfinite(info["ref_logprob"])
        if terminated:
            assert np.isfinite(info["score"]) and isinstance(info["text"], str)
            obs, _ = ENV.reset(seed=seed)
            assert ENV.observation_space.contains(obs)


@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    steps=st.lists(st.lists(st.integers(0, V - 1), min_size=3, max_size=3), max_size=25),
)
def test_random_vector_steps_stay_in_spaces(seed, steps):
    obs, _ = VENV.reset(seed=seed)
    assert VENV.observation_space.contains(obs)
    for acts in steps:
        obs, rewards, term, trunc, info = VENV.step(np.array(acts))
        assert VENV.observation_space.contains(obs)
        assert np.isfinite(rewards).all() and not trunc.any()
        # A row's mask is contiguous: left padding, then real tokens in one block, then padding.
        for row in obs["attention_mask"]:
            ones = np.flatnonzero(row)
            assert len(ones) and (np.diff(ones) == 1).all()
