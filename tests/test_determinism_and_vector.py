"""Same seed, same episodes; the vector env matches B single envs; autoreset semantics."""

import os

import numpy as np
import pytest
import torch

from textenv import PolicyLink
from textenv.toy import make_toy_env

B = 4


def actions_for(step: int, n: int) -> np.ndarray:
    return (np.arange(n) * 7 + step * 3) % 30 + 3


def test_same_seed_same_episode():
    runs = []
    for _ in range(2):
        env = make_toy_env()
        obs, _ = env.reset(seed=123)
        trace = [obs["input_ids"].copy()]
        for t in range(8):
            obs, r, term, _, info = env.step(int(actions_for(t, 1)[0]))
            trace.append((obs["input_ids"].copy(), r, info["kl"]))
            if term:
                break
        runs.append(trace)
    assert np.array_equal(runs[0][0], runs[1][0])
    for a, b in zip(runs[0][1:], runs[1][1:], strict=True):
        assert np.array_equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]


def test_sampling_through_the_link_is_seeded():
    texts = []
    for _ in range(2):
        env = make_toy_env()
        link = env.bind_policy(env.reference_model)
        env.reset(seed=5)
        gen = torch.Generator().manual_seed(5)
        done = False
        while not done:
            _, _, done, _, info = env.step(int(link.sample(gen)[0]))
        texts.append(info["text"])
    assert texts[0] == texts[1]


@pytest.mark.parametrize("stop", [(), ("good",)])
def test_vector_env_matches_single_envs(stop):
    venv = make_toy_env(B, autoreset_mode="Disabled", stop_tokens=stop)
    singles = [make_toy_env(stop_tokens=stop) for _ in range(B)]
    vobs, vinfo = venv.reset(seed=10)
    for i, env in enumerate(singles):
        obs, info = env.reset(seed=10 + i)
        assert np.array_equal(obs["input_ids"], vobs["input_ids"][i])
        assert info["prompt"] == vinfo["prompt"][i]
    done = np.zeros(B, bool)
    for t in range(venv.engine.max_new_tokens):
        acts = actions_for(t, B)
        vobs, vr, vterm, _, vinf = venv.step(acts)
        for i, env in enumerate(singles):
            if done[i]:
                assert vr[i] == 0.0 and not vinf["_kl"][i]
                continue
            obs, r, term, _, info = env.step(int(acts[i]))
            assert np.array_equal(obs["input_ids"], vobs["input_ids"][i])
            assert r == pytest.approx(vr[i], abs=1e-5)
            assert info["kl"] == pytest.approx(vinf["kl"][i], abs=1e-5)
            assert term == vterm[i]
            if term:
                assert info["score"] == pytest.approx(vinf["score"][i]) and info["text"] == vinf["text"][i]
        done |= vterm
        if done.all():
            break
    assert done.all()


def test_next_step_autoreset_resets_only_finished_rows_and_keeps_kl_exact():
    """Rows end at different times (a stop token); their resets must not disturb the other rows' caches."""
    venv = make_toy_env(B, stop_tokens=("good",))
    venv.reset(seed=0)
    good = venv.tokenizer.convert_tokens_to_ids("good")
    rng = np.random.default_rng(0)
    saw_reset = False
    for _ in range(30):
        acts = rng.integers(3, 30, size=B)
        acts[rng.random(B) < 0.2] = good
        before = venv.engine.sequences()
        _, rewards, term, _, info = venv.step(acts)
        if "reset" in info:
            saw_reset = True
            assert (rewards[info["reset"]] == 0).all() and not term[info["reset"]].any()
        for i in np.flatnonzero(info["_kl"]):
            with torch.no_grad():
                logits = venv.reference_model(before[i].view(1, -1)).logits[0, -1]
            ref = torch.log_softmax(logits.float(), -1)[acts[i]]
            assert info["ref_logprob"][i] == pytest.approx(float(ref), abs=1e-5)
    assert saw_reset


def test_next_step_infos_match_gymnasiums_sync_vector_env():
    """NextStep autoreset as gymnasium's own `SyncVectorEnv` over single envs reports it, infos included: an
    ended row's score, text and prompt; on the next step, the reset row's new prompt (the reset's info)."""
    from gymnasium.vector import SyncVectorEnv

    stop = ("good", "the")
    venv = make_toy_env(B, stop_tokens=stop, max_new_tokens=4)
    sync = SyncVectorEnv([lambda: make_toy_env(stop_tokens=stop, max_new_tokens=4) for _ in range(B)])
    venv.reset(seed=0)
    sync.reset(seed=0)
    rng = np.random.default_rng(0)
    resets = 0
    for _ in range(12):
        acts = rng.integers(3, 30, size=B)
        obs, rewards, terminated, _, info = venv.step(acts)
        sync_obs, sync_rewards, sync_terminated, _, sync_info = sync.step(acts)
        np.testing.assert_array_equal(obs["input_ids"], sync_obs["input_ids"])
        np.testing.assert_allclose(rewards, sync_rewards, atol=1e-5)
        np.testing.assert_array_equal(terminated, sync_terminated)
        for key in ("score", "text", "prompt", "kl_coef", "logprob"):
            np.testing.assert_array_equal(info.get(f"_{key}", np.zeros(B, bool)), sync_info.get(f"_{key}", np.zeros(B, bool)))
            rows = np.flatnonzero(info.get(f"_{key}", np.zeros(B, bool)))
            assert [info[key][r] for r in rows] == [sync_info[key][r] for r in rows], key
        resets += int(info.get("reset", np.zeros(B, bool)).sum())
    assert resets > 0


def test_vector_env_with_policy_link_samples_each_row():
    venv = make_toy_env(B, autoreset_mode="Disabled")
    link = venv.bind_policy(PolicyLink(venv.reference_model))
    venv.reset(seed=0)
    gen = torch.Generator().manual_seed(0)
    while not venv.done.all():
        _, _, _, _, info = venv.step(link.sample(gen))
        assert np.allclose(info["kl"][info["_kl"]], 0.0, atol=1e-5)
    # Disabled autoreset: finished rows stay finished until reset.
    with pytest.raises(Exception, match="every episode ended"):
        venv.step(np.full(B, 3))
    venv.reset(options={"reset_mask": np.array([True, False, False, False])})
    assert venv.done.tolist() == [False, True, True, True]
    # The partial reset restarted the bound policy's row too: its next log-prob is the reference's again (the
    # policy is the reference), not one computed on the finished episode's context.
    _, rewards, _, _, info = venv.step(link.sample(gen))
    assert info["_kl"].tolist() == [True, False, False, False]
    assert abs(info["kl"][0]) < 1e-5 and rewards[1:].tolist() == [0.0, 0.0, 0.0]


def test_inactive_rows_report_zero_kl():
    """A finished row (Disabled autoreset) takes no part in later steps: reward 0 and KL 0, whatever its cache
    and the uniform policy assumed with no policy bound would give."""
    venv = make_toy_env(2, autoreset_mode="Disabled", max_new_tokens=4)
    venv.reset(seed=0)
    eos = venv.tokenizer.eos_token_id
    _, _, terminated, _, _ = venv.step(np.array([eos, 3]))
    assert terminated.tolist() == [True, False]
    _, rewards, _, _, info = venv.step(np.array([3, 3]))
    assert rewards[0] == 0.0 and info["kl"][0] == 0.0
    assert info["kl"][1] != 0.0  # the uniform policy against the reference: a nonzero KL where a row is active


def test_seeded_rng_repeats_its_draws_and_restores_the_callers_stream(monkeypatch):
    """`textenv.models.seeded_rng`, which stages 1-2 train and sample under: the same draws each time, on the CPU
    and on the model's device (``TEXTENV_TEST_DEVICE``: a GPU's own RNG), and the caller's streams untouched.
    A CPU block seeds no GPU (``torch.manual_seed`` would reseed them all, and ``fork_rng`` restores none)."""
    from textenv.models import seeded_rng

    with monkeypatch.context() as patch:
        patch.setattr(torch.cuda, "manual_seed_all", lambda seed: pytest.fail("a CPU block reseeded every GPU"))
        patch.setattr(torch.cuda, "manual_seed", lambda seed: pytest.fail("a CPU block seeded a GPU"))
        with seeded_rng(5):
            torch.rand(1)

    device = torch.device(os.environ.get("TEXTENV_TEST_DEVICE", "cpu"))
    torch.manual_seed(1)
    expected = torch.rand(2, device=device), torch.rand(2)
    torch.manual_seed(1)
    blocks = []
    for _ in range(2):
        with seeded_rng(5, device):
            blocks.append((torch.rand(3, device=device), torch.rand(3)))
    assert all(torch.equal(a, b) for a, b in zip(blocks[0], blocks[1], strict=True))
    after = torch.rand(2, device=device), torch.rand(2)
    assert all(torch.equal(a, b) for a, b in zip(expected, after, strict=True))
