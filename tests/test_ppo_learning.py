"""PPO raises the reward on a small task, on every one of three seeds, in seconds."""

import copy
import dataclasses

import numpy as np
import pytest
import torch

from agents.ppo import PPOAgent, PPOConfig
from agents.value_head import PolicyWithValueHead
from textenv.toy import make_toy_env


def train(seed: int, iterations: int = 12, **config):
    torch.manual_seed(seed)
    env = make_toy_env(16, autoreset_mode="Disabled", kl_coef=0.02, max_new_tokens=5)
    policy = PolicyWithValueHead(copy.deepcopy(env.reference_model))
    cfg = dict(learning_rate=3e-3, minibatch_size=8, micro_batch_size=8, total_iterations=iterations, anneal_lr=False, seed=seed)
    cfg.update(config)
    agent = PPOAgent(policy, env, PPOConfig(**cfg))
    return [agent.iteration_step() for _ in range(iterations)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ppo_raises_reward(seed):
    history = train(seed)
    before = np.mean([h["score"] for h in history[:2]])
    after = np.mean([h["score"] for h in history[-2:]])
    print(f"seed {seed}: keyword score {before:.3f} -> {after:.3f}, KL {history[-1]['kl']:.2f}")
    assert after > before + 0.25, (before, after)
    assert history[-1]["kl"] > 0  # it moved away from the reference, and the env measured it


def test_ppo_ptx_and_options_run():
    from textenv.models import pad_left

    def ptx_batches():
        ids = [torch.tensor([3, 4, 5, 6, 1]), torch.tensor([7, 8, 1])]
        return pad_left(ids, 0)

    env = make_toy_env(8, autoreset_mode="Disabled", max_new_tokens=4)
    agent = PPOAgent(
        PolicyWithValueHead(copy.deepcopy(env.reference_model)),
        env,
        PPOConfig(minibatch_size=4, micro_batch_size=2, ptx_coef=0.5, missing_eos_penalty=1.0, whiten_rewards=True,
                  target_kl=0.0001, temperature=0.8, top_k=10, gradient_checkpointing=True),
        ptx_batches=ptx_batches,
    )  # fmt: skip
    stats = agent.iteration_step()
    assert stats["ptx_loss"] > 0 and stats["early_stopped"] == 1.0
    assert np.isfinite([v for v in stats.values()]).all()


def test_whiten_rewards_scales_the_rewards_without_shifting_them(monkeypatch):
    """``whiten_rewards`` standardises the per-token rewards' scale but keeps their mean (a shift would change
    which episodes are better than the value's baseline); the advantages are then whitened in full."""
    import agents.ppo

    calls = []
    real_whiten = agents.ppo.whiten

    def recording_whiten(x, mask, shift_mean=True):
        calls.append(shift_mean)
        return real_whiten(x, mask, shift_mean)

    monkeypatch.setattr(agents.ppo, "whiten", recording_whiten)
    env = make_toy_env(4, autoreset_mode="Disabled", max_new_tokens=4)
    for whiten_rewards, expected in ((True, [False, True]), (False, [True])):
        calls.clear()
        config = PPOConfig(minibatch_size=4, micro_batch_size=4, ppo_epochs=1, whiten_rewards=whiten_rewards)
        PPOAgent(PolicyWithValueHead(copy.deepcopy(env.reference_model)), env, config).iteration_step()
        assert calls == expected


def test_learning_rate_anneals_linearly_from_the_full_rate():
    env = make_toy_env(4, autoreset_mode="Disabled", max_new_tokens=2)
    config = PPOConfig(learning_rate=1e-3, total_iterations=4, minibatch_size=4, micro_batch_size=4, ppo_epochs=1)
    agent = PPOAgent(PolicyWithValueHead(copy.deepcopy(env.reference_model)), env, config)
    assert [agent.iteration_step()["lr"] for _ in range(3)] == pytest.approx([1e-3, 0.75e-3, 0.5e-3])
    constant_lr = dataclasses.replace(config, anneal_lr=False)
    constant = PPOAgent(PolicyWithValueHead(copy.deepcopy(env.reference_model)), env, constant_lr)
    assert [constant.iteration_step()["lr"] for _ in range(2)] == [1e-3, 1e-3]


def test_pretraining_batches_draw_left_padded_documents_and_refuse_bad_input():
    from agents.pretraining_batches import PretrainingBatches

    batches = PretrainingBatches([[3, 4, 5, 1], [6, 1], []], batch_size=5, pad_id=0, seed=2)
    ids, mask = batches()
    assert ids.shape == mask.shape and ids.shape[0] == 5
    for row, keep in zip(ids, mask.bool(), strict=True):  # each row is a whole document, padded on the left
        assert row[keep].tolist() in ([3, 4, 5, 1], [6, 1]) and not keep[: len(keep) - int(keep.sum())].any()
    state = batches.state_dict()
    following = batches()
    batches.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(batches(), following, strict=True))
    with pytest.raises(ValueError, match="at least one non-empty"):
        PretrainingBatches([[], []], batch_size=2, pad_id=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        PretrainingBatches([[3]], batch_size=0, pad_id=0)


def test_ppo_refuses_bad_setups():
    env = make_toy_env(4, max_new_tokens=4)  # NextStep autoreset
    policy = PolicyWithValueHead(copy.deepcopy(env.reference_model))
    with pytest.raises(ValueError, match="autoreset_mode='Disabled'"):
        PPOAgent(policy, env, PPOConfig(minibatch_size=4, micro_batch_size=4))
    env = make_toy_env(4, autoreset_mode="Disabled", max_new_tokens=4)
    with pytest.raises(ValueError, match="minibatch_size 8 exceeds"):
        PPOAgent(policy, env, PPOConfig(minibatch_size=8, micro_batch_size=8))
    with pytest.raises(ValueError, match="ptx_batches"):
        PPOAgent(policy, env, PPOConfig(minibatch_size=4, micro_batch_size=4, ptx_coef=1.0))
    # A policy whose vocabulary differs from the reference's: refused when the agent binds it, before any work.
    from textenv.models import build_tiny_causal_lm, tiny_gpt2_config

    stranger = PolicyWithValueHead(build_tiny_causal_lm(tiny_gpt2_config(17, n_positions=64, n_embd=32, n_layer=1, n_head=2)))
    with pytest.raises(ValueError, match="disagree on the action space"):
        PPOAgent(stranger, env, PPOConfig(minibatch_size=4, micro_batch_size=4))


def test_agents_warn_when_the_policy_trains_half_precision_weights():
    """A bf16 policy (transformers loads a bf16 checkpoint as bf16) learns little: Adam's small steps round
    away. PPO and the policy-gradient agents warn, naming the fixes; float32, or a bf16 base under LoRA, do not."""
    import warnings

    from agents.reinforce import ReinforceAgent, ReinforceConfig

    env = make_toy_env(4, autoreset_mode="Disabled", max_new_tokens=4)
    settings = dict(minibatch_size=4, micro_batch_size=4)
    with pytest.warns(UserWarning, match=r"trains bfloat16 weights.*dtype=torch.float32.*PPOConfig\(bf16=True\)"):
        PPOAgent(PolicyWithValueHead(copy.deepcopy(env.reference_model).to(torch.bfloat16)), env, PPOConfig(**settings))
    with pytest.warns(UserWarning, match="trains float16 weights"):
        ReinforceAgent(copy.deepcopy(env.reference_model).to(torch.float16), env, ReinforceConfig(minibatch_size=4))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="the policy trains")
        PPOAgent(PolicyWithValueHead(copy.deepcopy(env.reference_model)), env, PPOConfig(**settings))
        lora = PolicyWithValueHead(copy.deepcopy(env.reference_model).to(torch.bfloat16), lora_r=4, lora_target_modules=["c_attn"])
        assert {p.dtype for p in lora.parameters() if p.requires_grad} == {torch.float32}  # peft's adapters
        PPOAgent(lora, env, PPOConfig(**settings))


def test_lora_trains_only_adapters_and_value_head():
    env = make_toy_env(8, autoreset_mode="Disabled", max_new_tokens=4)
    policy = PolicyWithValueHead(copy.deepcopy(env.reference_model), lora_r=4, lora_target_modules=["c_attn"])
    base_before = {k: v.clone() for k, v in policy.lm.get_base_model().state_dict().items() if "lora" not in k}
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in n or n.startswith("value_head") for n in trainable)
    agent = PPOAgent(policy, env, PPOConfig(learning_rate=1e-2, minibatch_size=4, micro_batch_size=4))
    stats = agent.iteration_step()
    assert np.isfinite(stats["policy_loss"]) and stats["approx_kl"] > 0  # the adapters moved the policy
    after = policy.lm.get_base_model().state_dict()
    assert all(torch.equal(v, after[k]) for k, v in base_before.items())  # base weights untouched
    # An adapter on an embedding tied to the LM head would be merged into both uses of it: refused, and the
    # model handed in is left as it was (no adapters, gradients on).
    for targets in (["wte"], ["lm_head"]):
        lm = copy.deepcopy(env.reference_model).requires_grad_(True)
        with pytest.raises(ValueError, match="ties to its LM head"):
            PolicyWithValueHead(lm, lora_r=4, lora_target_modules=targets)
        assert not hasattr(lm, "peft_config") and all(p.requires_grad for p in lm.parameters())


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.7, "top_k": 10}])
def test_update_forward_reproduces_the_rollout(sampling):
    """Before any update, one full-sequence forward (LM head on generated positions only) gives back the
    rollout's log-probs and values: the first PPO ratio is exactly 1, for PPO and the baselines alike."""
    from agents.reinforce import ReinforceAgent, ReinforceConfig

    env = make_toy_env(8, autoreset_mode="Disabled", max_new_tokens=6)
    agent = PPOAgent(
        PolicyWithValueHead(copy.deepcopy(env.reference_model)), env,
        PPOConfig(minibatch_size=8, micro_batch_size=8, **sampling),
    )  # fmt: skip
    torch.nn.init.normal_(agent.policy.value_head.weight)  # non-zero values, so they are compared for real
    batch = agent.rollout()
    rows = torch.arange(8)
    logprobs, values, _ = agent._token_outputs(batch, rows)
    m = batch.mask.bool()
    torch.testing.assert_close(logprobs[m], batch.logprobs[m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(values[m], batch.values[m], atol=1e-5, rtol=1e-5)

    baseline = ReinforceAgent(copy.deepcopy(env.reference_model), env, ReinforceConfig(minibatch_size=8, **sampling))
    batch = baseline.rollout()
    logprobs, _ = baseline.token_outputs(batch, rows)
    m = batch.mask.bool()
    torch.testing.assert_close(logprobs[m], batch.logprobs[m], atol=1e-5, rtol=1e-5)
