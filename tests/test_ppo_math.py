"""PPO's pieces against hand-computed values."""

import math

import pytest
import torch

from agents.ppo import PPOConfig, clipped_policy_loss, clipped_value_loss, compute_gae, whiten
from textenv import AdaptiveKLController, SamplingConfig, kl_penalty
from textenv.sampling import sample_tokens


def test_gae_on_a_tiny_trajectory():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, 0.5, 0.5], [0.2, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    adv, ret = compute_gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # Row 0: δ = [0, 0, 0.5]; A2 = 0.5, A1 = 0.5·0.5, A0 = 0.5·0.25. Row 1 ends after one token: A0 = 1 - 0.2.
    assert torch.allclose(adv, torch.tensor([[0.125, 0.25, 0.5], [0.8, 0.0, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[0.625, 0.75, 1.0], [1.0, 0.0, 0.0]]))


def test_gae_with_discount():
    adv, _ = compute_gae(torch.tensor([[0.0, 1.0]]), torch.zeros(1, 2), torch.ones(1, 2), gamma=0.9, lam=1.0)
    assert torch.allclose(adv, torch.tensor([[0.9, 1.0]]))


def test_whitening():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0])
    mask = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])
    std = math.sqrt(5 / 3)  # unbiased variance of 1..4 is 5/3
    expected = torch.tensor([-1.5, -0.5, 0.5, 1.5, 0.0]) / std
    assert torch.allclose(whiten(x, mask), expected, atol=1e-6)
    kept = whiten(x, mask, shift_mean=False)
    assert torch.allclose(kept[:4], expected[:4] + 2.5, atol=1e-6)


def test_clipped_policy_loss():
    old = torch.zeros(1, 2)
    new = torch.full((1, 2), math.log(1.5))
    mask = torch.ones(1, 2)
    loss, clipfrac, approx_kl = clipped_policy_loss(new, old, torch.ones(1, 2), mask, clip=0.2)
    assert loss.item() == pytest.approx(-1.2)  # positive advantage: the ratio's gain is capped at 1 + ε
    assert clipfrac.item() == pytest.approx(1.0)
    assert approx_kl.item() == pytest.approx(0.5 - math.log(1.5))
    loss, clipfrac, _ = clipped_policy_loss(new, old, -torch.ones(1, 2), mask, clip=0.2)
    assert loss.item() == pytest.approx(1.5)  # negative advantage: the pessimistic (unclipped) term
    assert clipfrac.item() == 0.0


def test_clipped_policy_loss_lower_clip_on_negative_advantage():
    """A ratio below 1 − ε with a negative advantage: the clipped term (the pessimistic one) is taken."""
    old, new, mask = torch.zeros(1, 2), torch.full((1, 2), math.log(0.5)), torch.ones(1, 2)
    loss, clipfrac, _ = clipped_policy_loss(new, old, -torch.ones(1, 2), mask, clip=0.2)
    assert loss.item() == pytest.approx(0.8)  # max(−A·0.5, −A·0.8) with A = −1
    assert clipfrac.item() == 1.0


def test_kl_estimators_by_hand():
    """π(a) = ½, π_ref(a) = ¼, so r = π_ref/π = ½; and the exact KL of (½, ½) from (¼, ¾)."""
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(math.log(2) - 0.5)
    policy, reference = torch.log(torch.tensor([[0.5, 0.5]])), torch.log(torch.tensor([[0.25, 0.75]]))
    full = kl_penalty(logp, ref, "full", policy_logprobs=policy, ref_logprobs=reference)
    assert full.item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))


def test_clipped_value_loss():
    loss, frac = clipped_value_loss(torch.ones(1, 1), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), clip=0.2)
    assert loss.item() == pytest.approx(0.5 * 0.8**2)
    assert frac.item() == 1.0


def test_adaptive_kl_update():
    controller = AdaptiveKLController(value=0.1, target=6.0, horizon=100)
    controller.update(kl=9.0, n_episodes=10)  # error = clip(9/6 - 1) = 0.2
    assert controller.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    controller.update(kl=5.4, n_episodes=50)  # error = -0.1
    assert controller.value == pytest.approx(0.102 * (1 - 0.1 * 50 / 100))


def test_a_negative_or_nan_kl_coefficient_is_refused():
    from textenv.kl import FixedKLController
    from textenv.toy import make_toy_env

    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="KL coefficient must be finite and >= 0"):
            FixedKLController(bad)
        with pytest.raises(ValueError, match="KL coefficient must be finite and >= 0"):
            make_toy_env(kl_coef=bad)
    controller = FixedKLController(0.1)
    with pytest.raises(ValueError, match="KL coefficient"):
        controller.load_state_dict({"value": float("nan")})
    assert controller.value == 0.1


def test_the_adaptive_controller_refuses_nan_settings_and_a_nan_kl_leaving_beta_as_it_was():
    nan, inf = float("nan"), float("inf")
    for value, target, horizon in ((nan, 6.0, 10), (0.1, nan, 10), (0.1, 6.0, nan), (inf, 6.0, 10), (0.1, inf, 10)):
        with pytest.raises(ValueError, match="need finite value"):
            AdaptiveKLController(value, target, horizon)
    controller = AdaptiveKLController(value=0.1, target=6.0, horizon=100)
    for kl in (nan, inf):
        with pytest.raises(ValueError, match="measured KL must be finite"):
            controller.update(kl, n_episodes=10)
    with pytest.raises(ValueError, match="need finite value"):
        controller.load_state_dict({"value": nan, "target": 6.0, "horizon": 100})
    assert (controller.value, controller.target, controller.horizon, controller.history) == (0.1, 6.0, 100, [])


def test_top_k_temperature_logprobs_match_the_sampling_distribution():
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.5]])
    sampling = SamplingConfig(temperature=0.5, top_k=2)
    logprobs = sampling.logprobs(logits)
    kept = torch.tensor([4.0, 6.0])  # logits 2 and 3 divided by 0.5
    expected = torch.log_softmax(kept, 0)
    assert torch.isinf(logprobs[0, [0, 3]]).all()
    assert torch.allclose(logprobs[0, [1, 2]], expected)
    gen = torch.Generator().manual_seed(0)
    draws = sample_tokens(logprobs.expand(20000, -1), gen)
    freq = torch.bincount(draws, minlength=4).float() / 20000
    assert torch.allclose(freq, logprobs[0].exp(), atol=0.01)
    # The KL of the sampling distribution to the plain softmax, estimated with the right log-probs, is
    # positive and matches the exact value; it never goes negative from a sampling mismatch.
    ref = torch.log_softmax(logits, -1).expand(20000, -1)
    k1 = kl_penalty(logprobs[0, draws], ref.gather(1, draws.view(-1, 1)).squeeze(1), "k1")
    exact = kl_penalty(logprobs[0, :1], ref[0, :1], "full", logprobs, ref[:1])
    assert exact.item() > 0 and k1.mean().item() == pytest.approx(exact.item(), rel=0.05)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    logprobs = SamplingConfig(top_p=0.75).logprobs(logits)
    assert torch.isfinite(logprobs[0, :2]).all() and torch.isinf(logprobs[0, 2:]).all()
    assert torch.allclose(logprobs[0, :2].exp(), torch.tensor([0.625, 0.375]))


def test_top_p_drops_a_token_once_the_mass_before_it_is_exactly_p():
    """Four equal tokens (probabilities exactly ¼) and p = ½: the third token's mass before it is exactly ½,
    which already reaches p, so two tokens stay."""
    logprobs = SamplingConfig(top_p=0.5).logprobs(torch.zeros(1, 4))
    assert int(torch.isfinite(logprobs).sum()) == 2
    assert torch.allclose(logprobs[torch.isfinite(logprobs)].exp(), torch.tensor([0.5, 0.5]))


@pytest.mark.parametrize(
    "field, value",
    [("learning_rate", 0.0), ("ppo_epochs", 0), ("micro_batch_size", 3), ("lam", 1.5), ("temperature", 0.0), ("top_p", 0.0)],
)
def test_invalid_config_values_fail_at_start(field, value):
    with pytest.raises(ValueError, match=field):
        PPOConfig(**{field: value})


# ------------------------------------------------------------------------------------------ the agent's loop
def toy_ppo(num_envs=8, env_kwargs=None, **config):
    import copy

    from agents.ppo import PPOAgent
    from agents.value_head import PolicyWithValueHead
    from textenv.toy import make_toy_env

    env = make_toy_env(num_envs, autoreset_mode="Disabled", **{"max_new_tokens": 4, "kl_coef": 0.05, **(env_kwargs or {})})
    policy = PolicyWithValueHead(copy.deepcopy(env.reference_model))
    return PPOAgent(policy, env, PPOConfig(**{"minibatch_size": 4, "micro_batch_size": 4, **config}))


def test_every_episode_is_trained_on_when_the_minibatch_does_not_divide_the_batch():
    """12 episodes in minibatches of 8: each epoch trains on all 12 (8, then 4), as SB3 does, not on 8."""
    agent = toy_ppo(12, minibatch_size=8, micro_batch_size=4, ppo_epochs=2)
    seen, steps = [], []
    token_outputs, optimizer_step = agent._token_outputs, agent.optimizer.step

    def spy(batch, rows, *args, **kwargs):
        seen.append(rows.tolist())
        return token_outputs(batch, rows, *args, **kwargs)

    agent._token_outputs = spy
    agent.optimizer.step = lambda *a, **k: (steps.append(1), optimizer_step(*a, **k))[1]
    agent.update(agent.rollout())
    assert [len(rows) for rows in seen] == [4, 4, 4] * 2  # micro-batches: 8 = 4 + 4, then the short 4
    for epoch in (seen[:3], seen[3:]):
        assert sorted(sum(epoch, [])) == list(range(12))
    assert len(steps) == 4  # two optimizer steps per epoch


def test_each_micro_batch_weighs_its_share_of_its_minibatch(monkeypatch):
    """The gradient of a minibatch is the mean of its micro-batches' losses weighted by their share of it: ½ for
    each half of an 8-episode minibatch, 1 for the short 4-episode one (not ½, as a fixed accumulation count
    would make it)."""
    import agents.ppo as ppo

    agent = toy_ppo(12, minibatch_size=8, micro_batch_size=4, ppo_epochs=1)
    losses, backwards = [], []
    policy_loss, value_loss = ppo.clipped_policy_loss, ppo.clipped_value_loss

    def record_policy_loss(*args):
        out = policy_loss(*args)
        losses.append([out[0].detach()])
        return out

    def record_value_loss(*args):
        out = value_loss(*args)
        losses[-1].append(out[0].detach())
        return out

    backward = torch.Tensor.backward
    monkeypatch.setattr(ppo, "clipped_policy_loss", record_policy_loss)
    monkeypatch.setattr(ppo, "clipped_value_loss", record_value_loss)
    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *a, **k: (backwards.append(self.detach()), backward(self, *a, **k))[1])
    agent.update(agent.rollout())
    unscaled = [pg + agent.config.vf_coef * vf for pg, vf in losses]
    assert len(backwards) == 3
    for scaled, loss, share in zip(backwards, unscaled, (0.5, 0.5, 1.0), strict=True):
        torch.testing.assert_close(scaled, loss * share)


def test_missing_eos_penalty_spares_episodes_that_end_on_a_stop_token():
    """The env ends an episode on EOS or a stop token alike; only episodes cut off by the budget are penalised."""
    stop_words = ["the", "movie", "was", "a", "good", "plot"]
    env_kwargs = {"stop_tokens": stop_words, "max_new_tokens": 3}
    plain = toy_ppo(16, env_kwargs=env_kwargs, seed=1)
    penalised = toy_ppo(16, env_kwargs=env_kwargs, seed=1, missing_eos_penalty=1.0)
    batch, penalised_batch = plain.rollout(), penalised.rollout()
    torch.testing.assert_close(batch.actions, penalised_batch.actions)
    lengths = batch.mask.sum(1).long()
    last = batch.actions.gather(1, (lengths - 1).view(-1, 1)).squeeze(1)
    on_stop = torch.isin(last, torch.tensor(plain.env.engine.stop_ids))
    assert on_stop.any() and (~on_stop).any()  # both kinds in the batch
    difference = (batch.rewards - penalised_batch.rewards).sum(1)
    torch.testing.assert_close(difference, (~on_stop).float())


def test_the_logged_kl_coef_is_the_one_the_batch_was_rewarded_with():
    """An adaptive β moves when the batch ends; the metrics must show the β this batch's rewards used."""
    agent = toy_ppo(4, env_kwargs={"kl_coef": AdaptiveKLController(0.2, target=0.01, horizon=10)})
    stats = agent.iteration_step()
    assert stats["kl_coef"] == pytest.approx(0.2)
    assert agent.env.kl_controller.value != pytest.approx(0.2)  # it moved after the batch
