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


def test_a_failing_reward_function_leaves_the_step_undone():
    """A `RewardError` is raised before the step commits anything: the same step then succeeds and matches a
    twin env that never failed, including the KL controller, and NextStep autoreset still resets the ended rows
    (a row left ``done`` without its reset flag would sit out every later step)."""
    from textenv.kl import AdaptiveKLController

    failing = {"now": False}

    def reward(prompts, completions):
        return [float("nan") if failing["now"] else 1.0] * len(prompts)

    def controller():
        return AdaptiveKLController(0.2, target=1.0, horizon=10)

    venv = make_toy_env(2, reward_fn=CallableReward(reward, name="flaky"), max_new_tokens=3, kl_coef=controller())
    twin = make_toy_env(2, reward_fn=CallableReward(lambda p, c: [1.0] * len(p)), max_new_tokens=3, kl_coef=controller())
    for env in (venv, twin):
        env.reset(seed=0)
        env.step(np.array([3, 4]))
        env.step(np.array([5, 6]))
    failing["now"] = True
    with pytest.raises(RewardError, match="flaky"):
        venv.step(np.array([7, 8]))  # the budget's last token: both episodes end and are scored
    assert not venv.engine.done.any() and (venv.engine.gen_len == 2).all()
    failing["now"] = False
    got, want = venv.step(np.array([7, 8])), twin.step(np.array([7, 8]))
    for key in got[0]:
        np.testing.assert_array_equal(got[0][key], want[0][key])
    np.testing.assert_allclose(got[1], want[1], rtol=1e-6)
    assert got[2].all() and want[2].all()
    np.testing.assert_array_equal(got[4]["score"], [1.0, 1.0])
    assert venv.engine.kl_controller.value == pytest.approx(twin.engine.kl_controller.value)
    _, _, _, _, info = venv.step(np.array([3, 3]))
    assert info["reset"].all()  # NextStep: both ended rows start new episodes


def test_an_action_the_bound_policy_cannot_sample_is_refused():
    """With top-k sampling, a token outside the top k has log-prob -inf: the k1 KL term would be -inf and the
    reward +inf. The env refuses the action and changes nothing."""
    from textenv.policy_link import PolicyLink
    from textenv.sampling import SamplingConfig

    venv, twin = make_toy_env(2), make_toy_env(2)
    for env in (venv, twin):
        env.bind_policy(PolicyLink(env.engine.ref_model, SamplingConfig(top_k=2)))
        env.reset(seed=0)
    logprobs = venv.engine.policy.logprobs()
    possible = logprobs.argmax(-1).numpy()
    impossible = possible.copy()
    impossible[1] = int(logprobs[1].argmin())
    assert logprobs[1, impossible[1]] == float("-inf")
    with pytest.raises(InvalidActionError, match=f"action {impossible[1]} in row 1 has log-prob -inf"):
        venv.step(impossible)
    got, want = venv.step(possible), twin.step(possible)
    assert np.isfinite(got[1]).all()
    np.testing.assert_allclose(got[1], want[1], rtol=1e-6)
    np.testing.assert_array_equal(got[0]["input_ids"], want[0]["input_ids"])


def test_episodes_longer_than_the_models_positions_are_refused():
    """Else the episode fails mid-way with an index error deep in the model (a device-side assert on a GPU)."""
    from textenv.models import build_tiny_causal_lm, tiny_gpt2_config

    with pytest.raises(ValueError, match="= 70 exceeds the reference LM's 64 positions"):
        make_toy_env(max_new_tokens=64)
    env = make_toy_env(max_new_tokens=40)
    short = build_tiny_causal_lm(tiny_gpt2_config(int(env.action_space.n), n_positions=32, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="= 46 exceeds the policy LM's 32 positions"):
        env.bind_policy(short)
    still_usable(env)


def test_a_failed_reset_leaves_the_prompt_generators_alone():
    """A refused reset (a bad prompt, a failure while starting the rows) must not reseed or advance the
    generators: the prompts that follow are those of an env that never saw it."""
    single, single_twin = make_toy_env(), make_toy_env()
    venv, venv_twin = make_toy_env(3), make_toy_env(3)
    for env in (single, single_twin, venv, venv_twin):
        env.reset(seed=0)
    with pytest.raises(PromptError, match="empty prompt"):
        single.reset(seed=5, options={"prompt": "   "})
    with pytest.raises(PromptError, match="empty prompt"):
        venv.reset(seed=5, options={"prompts": ["the movie", "   ", "the plot"]})
    for env in (single, venv):  # a failure after the generators were seeded and drawn from
        original = env.engine.reset_rows
        env.engine.reset_rows = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("failed to start"))
        with pytest.raises(RuntimeError, match="failed to start"):
            env.reset(seed=7)
        with pytest.raises(RuntimeError, match="failed to start"):
            env.reset()
        env.engine.reset_rows = original
    for env, twin in ((single, single_twin), (venv, venv_twin)):
        for _ in range(3):
            assert list(np.atleast_1d(env.reset()[1]["prompt"])) == list(np.atleast_1d(twin.reset()[1]["prompt"]))
    assert venv.reset(seed=np.int64(3))[1]["prompt"].tolist() == venv_twin.reset(seed=3)[1]["prompt"].tolist()
    assert single.reset(seed=np.int64(3))[1]["prompt"] == single_twin.reset(seed=3)[1]["prompt"]
    for bad in ([1, 2.7, 3], [1, True, 3]):
        with pytest.raises(ValueError, match="seeds must be integers"):
            venv.reset(seed=bad)
    assert list(venv.reset()[1]["prompt"]) == list(venv_twin.reset()[1]["prompt"])


def test_a_score_deferring_batch_refuses_a_partial_reset_that_would_drop_a_score():
    """A row that ended in a ``defer_scores`` batch awaits its score until the batch ends; a partial reset of
    that batch would drop it (and score the new episode twice)."""
    venv = make_toy_env(2, autoreset_mode="Disabled", max_new_tokens=3)
    venv.reset(seed=0, options={"defer_scores": True})
    eos = venv.engine.eos_id
    _, _, terminated, _, _ = venv.step(np.array([eos, 3]))
    assert terminated.tolist() == [True, False]
    with pytest.raises(ValueError, match=r"rows \[0\] await theirs"):
        venv.reset(options={"reset_mask": [True, False]})
    venv.step(np.array([3, 3]))
    _, _, terminated, _, info = venv.step(np.array([3, 3]))
    assert terminated[1] and info["_score"].all() and np.isfinite(info["score"]).all()


def test_a_prompt_source_failing_at_an_autoreset_leaves_the_step_undone():
    """NextStep draws the reset rows' prompts in the step after their episodes ended; a prompt generator that
    fails there (an empty prompt) must not leave the step half done: nothing moves, and once the generator
    works again the same step matches a twin env that never failed."""
    from textenv.toy import toy_prompts

    failing = {"now": False}

    def flaky_prompts(rng, n):
        texts = toy_prompts(rng, n)
        return ["   "] * n if failing["now"] else texts

    venv = make_toy_env(2, prompts=flaky_prompts, max_new_tokens=4)
    twin = make_toy_env(2, prompts=toy_prompts, max_new_tokens=4)
    eos = venv.engine.eos_id
    for env in (venv, twin):
        env.reset(seed=0)
        env.step(np.array([3, 4]))
        assert env.step(np.array([eos, 6]))[2].tolist() == [True, False]  # row 0 resets at the next step
    observation, gen_len = venv._observations(), venv.engine.gen_len.clone()
    failing["now"] = True
    with pytest.raises(PromptError, match="empty prompt"):
        venv.step(np.array([7, 8]))  # row 1 would take its third token
    for key, value in venv._observations().items():
        np.testing.assert_array_equal(value, observation[key])
    assert torch.equal(venv.engine.gen_len, gen_len)
    assert venv.engine.done.tolist() == [True, False] and venv._autoreset.tolist() == [True, False]
    failing["now"] = False
    for actions in ([7, 8], [3, 4], [5, 6]):
        got, want = venv.step(np.array(actions)), twin.step(np.array(actions))
        for key in got[0]:
            np.testing.assert_array_equal(got[0][key], want[0][key])
        np.testing.assert_allclose(got[1], want[1], rtol=1e-6)
        assert list(got[4].get("prompt", [])) == list(want[4].get("prompt", []))
