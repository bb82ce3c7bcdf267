"""A prefetching policy link (``PolicyLink(prefetch=True)``, as textenv's agents build it) has the env queue the
policy's next forward at the end of its step instead of when the agent next asks. Only the moment changes: the
same outputs and number of forwards over a batch, the link's autocast, nothing after a batch's last step or for an
invalid action, and no prefetch at all for a link that did not ask for it.

The tests run on the CPU. ``TEXTENV_TEST_DEVICE=cuda`` runs them on a GPU instead (benchmarks/gpu_suite.sh does),
where ``compiled`` (CUDA graphs) and PPO's bf16 autocast are also compared.
"""

import os
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from agents.ppo import PPOAgent, PPOConfig
from agents.reinforce import RLOOAgent, RLOOConfig
from agents.value_head import PolicyWithValueHead
from textenv import PolicyLink
from textenv.errors import InvalidActionError
from textenv.toy import make_toy_env, toy_components

B, T = 4, 8
DEVICE = torch.device(os.environ.get("TEXTENV_TEST_DEVICE", "cpu"))
CUDA = DEVICE.type == "cuda"


def policy_model(seed: int = 3):
    return toy_components(seed=seed)["model"].to(DEVICE)


def disabled_env(max_new_tokens: int = T, **kwargs):
    return make_toy_env(B, autoreset_mode="Disabled", max_new_tokens=max_new_tokens, device=DEVICE, **kwargs)


@pytest.mark.parametrize("decoding", ["dynamic", "static", *(["compiled"] if CUDA else [])])
@pytest.mark.parametrize("defer_kl", [False, True])
def test_a_ppo_rollout_is_the_same_with_and_without_prefetch(defer_kl, decoding):
    batches, forwards = [], []
    for prefetch in (True, False):
        venv = disabled_env(decoding=decoding)
        config = PPOConfig(decoding=decoding, minibatch_size=B, micro_batch_size=B, defer_kl=defer_kl, bf16=CUDA)
        agent = PPOAgent(PolicyWithValueHead(policy_model(5)), venv, config)
        assert agent.link.prefetch_forward  # the agents build prefetching links
        agent.link.prefetch_forward = prefetch
        batches.append(agent.rollout())
        assert agent.link.decoder is not None
        forwards.append(agent.link.decoder.forward_calls)
    a, b = batches
    assert torch.equal(a.actions, b.actions)
    for name in ("logprobs", "values", "rewards", "mask"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-6, rtol=0, msg=name)
    assert forwards[0] == forwards[1], "prefetching ran a forward the lazy order does not"


def test_the_policy_gradient_agents_prefetch_too():
    agent = RLOOAgent(policy_model(5), disabled_env(), RLOOConfig(samples_per_prompt=2, minibatch_size=B))
    assert agent.link.prefetch_forward


@pytest.mark.parametrize("prefetch", [True, False])
def test_the_forward_runs_inside_the_step_while_rows_go_on_and_not_after_the_last(prefetch):
    venv = disabled_env(max_new_tokens=3)
    link = venv.bind_policy(PolicyLink(policy_model(), prefetch=prefetch))
    venv.reset(seed=0)
    gen = torch.Generator().manual_seed(0)
    assert link.decoder is not None
    for step in range(3):
        tokens = link.sample(gen)  # the lazy order runs the pending forward here
        calls = link.decoder.forward_calls
        venv.step(tokens)
        if step < 2 and not venv.done.all():  # some row goes on: its forward ran in the step, or waits
            assert (link.decoder.forward_calls == calls + 1) == prefetch
            assert (link._pending is None) == prefetch
    assert venv.done.all()  # the length budget of 3 ended every row at the third step
    assert link._pending is not None, "a forward after the batch's last step would be wasted"


def test_links_do_not_prefetch_unless_asked():
    """A loop may change the weights between ``env.step`` and the next ``logprobs()`` (SB3 updates there)."""
    venv = disabled_env()
    link = venv.bind_policy(policy_model())  # bind_policy(model) builds a default link
    assert isinstance(link, PolicyLink) and not link.prefetch_forward
    venv.reset(seed=0)
    venv.step(link.sample(torch.Generator().manual_seed(0)))
    assert link._pending is not None


def test_an_invalid_action_prefetches_nothing():
    venv = disabled_env()
    link = venv.bind_policy(PolicyLink(policy_model(), prefetch=True))
    venv.reset(seed=0)
    gen = torch.Generator().manual_seed(0)
    venv.step(link.sample(gen))
    assert link.decoder is not None
    calls, current = link.decoder.forward_calls, link.outputs().logits.clone()
    actions = link.sample(gen).cpu().numpy()
    actions[1] = venv.engine.vocab_size  # one past the action space
    with pytest.raises(InvalidActionError):
        venv.step(actions)
    assert link.decoder.forward_calls == calls
    torch.testing.assert_close(link.outputs().logits, current, atol=0, rtol=0)


def test_the_prefetched_forward_runs_under_the_links_autocast():
    """An agent's autocast (PPO with ``bf16``) covers a forward the env runs, outside the agent's ``with``."""
    entered = []

    def autocast():
        entered.append(1)
        return torch.autocast(DEVICE.type, dtype=torch.bfloat16)

    outputs = {}
    for name, context, prefetch in (("prefetched", autocast, True), ("none", nullcontext, True), ("lazy", autocast, False)):
        venv = disabled_env()
        link = venv.bind_policy(PolicyLink(policy_model(), autocast=context, prefetch=prefetch))
        venv.reset(seed=0)
        venv.step(link.sample(torch.Generator().manual_seed(0)))
        assert (link._pending is None) == prefetch
        if name == "prefetched":
            assert entered, "the prefetched forward ran without the link's autocast"
        outputs[name] = link.outputs().logits
    assert not torch.equal(outputs["prefetched"], outputs["none"])  # bf16 matmuls round differently
    torch.testing.assert_close(outputs["prefetched"], outputs["lazy"], atol=0, rtol=0)


@pytest.mark.parametrize("decoding", ["dynamic", "static"])
def test_new_episodes_are_prefilled_under_the_links_autocast(decoding):
    """The prefill (in the env's ``reset``, and for rows a NextStep autoreset restarts) runs in the link's
    autocast too: a float32 prefill would allocate a float32 KV cache that every bf16 step converts in full."""
    def autocast():
        return torch.autocast(DEVICE.type, dtype=torch.bfloat16)

    first_logits = {}
    for name, context in (("float32", nullcontext), ("bf16", autocast)):
        venv = make_toy_env(B, stop_tokens=("good",), max_new_tokens=T, device=DEVICE)
        link = venv.bind_policy(PolicyLink(policy_model(), autocast=context, decoding=decoding))
        venv.reset(seed=0)
        first_logits[name] = link.outputs().logits
    assert not torch.equal(first_logits["bf16"], first_logits["float32"])  # the prefill's matmuls ran in bf16
    assert link.decoder is not None and link.decoder.cache is not None
    assert {layer.keys.dtype for layer in link.decoder.cache.layers} == {torch.bfloat16}
    good = venv.tokenizer.convert_tokens_to_ids("good")
    venv.step(torch.full((B,), good))  # every row stops: the next step restarts them all (replace_rows)
    venv.step(torch.full((B,), good))
    assert {layer.keys.dtype for layer in link.decoder.cache.layers} == {torch.bfloat16}


def test_next_step_autoreset_is_the_same_with_and_without_prefetch():
    """Rows that end are restarted at the next step; the prefetched forward already covered them."""
    records, forwards = [], []
    for prefetch in (True, False):
        venv = make_toy_env(B, stop_tokens=("good",), max_new_tokens=T, device=DEVICE)
        link = venv.bind_policy(PolicyLink(policy_model(), prefetch=prefetch))
        obs, _ = venv.reset(seed=0)
        gen = torch.Generator().manual_seed(0)
        good = venv.tokenizer.convert_tokens_to_ids("good")
        run = [obs["input_ids"]]
        for _ in range(30):
            tokens = link.sample(gen)
            tokens[(torch.rand(B, generator=gen) < 0.2).to(tokens.device)] = good
            obs, rewards, terminated, _, info = venv.step(tokens)
            run += [obs["input_ids"], rewards, terminated, info["logprob"], info["kl"]]
        link.logprobs()  # the lazy order's last pending forward, so both have run the same ones
        records.append(run)
        assert link.decoder is not None
        forwards.append(link.decoder.forward_calls)
    assert any(x.any() for x in records[0][3::5])  # some episodes ended (and restarted)
    for a, b in zip(*records, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, equal_nan=True)
    assert forwards[0] == forwards[1]
