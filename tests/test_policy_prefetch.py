"""The bound policy's next forward is queued inside the env's step (`PolicyLink.prefetch`), right after its one
host read, instead of when the agent next asks. Only the moment changes: the same outputs, the same number of
forwards, the agent's autocast, and nothing at all for an invalid action or after a batch's last step.

The tests run on the CPU. ``TEXTENV_TEST_DEVICE=cuda`` runs them on a GPU instead (benchmarks/gpu_suite.sh does).
"""

import os
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from agents.ppo import PPOAgent, PPOConfig
from agents.value_head import PolicyWithValueHead
from textenv import PolicyLink
from textenv.errors import InvalidActionError
from textenv.toy import make_toy_env, toy_components

B, T = 4, 8
DEVICE = torch.device(os.environ.get("TEXTENV_TEST_DEVICE", "cpu"))


def policy_model(seed: int = 3):
    return toy_components(seed=seed)["model"].to(DEVICE)


@pytest.mark.parametrize("decoding", ["dynamic", "static"])
@pytest.mark.parametrize("defer_kl", [False, True])
def test_a_ppo_rollout_is_the_same_with_and_without_prefetch(defer_kl, decoding):
    batches, forwards = [], []
    for prefetch in (True, False):
        venv = make_toy_env(B, autoreset_mode="Disabled", max_new_tokens=T, device=DEVICE, decoding=decoding)
        venv.engine.prefetch_policy = prefetch
        config = PPOConfig(decoding=decoding, minibatch_size=B, micro_batch_size=B, defer_kl=defer_kl)
        agent = PPOAgent(PolicyWithValueHead(policy_model(5)), venv, config)
        batches.append(agent.rollout())
        assert agent.link.decoder is not None
        forwards.append(agent.link.decoder.forward_calls)
    a, b = batches
    assert torch.equal(a.actions, b.actions)
    for name in ("logprobs", "values", "rewards", "mask"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-6, rtol=0, msg=name)
    assert forwards[0] == forwards[1], "prefetching ran a forward the lazy order does not"


@pytest.mark.parametrize("prefetch", [True, False])
def test_the_forward_runs_inside_the_step_while_rows_go_on_and_not_after_the_last(prefetch):
    venv = make_toy_env(B, autoreset_mode="Disabled", max_new_tokens=3, device=DEVICE)
    venv.engine.prefetch_policy = prefetch
    link = venv.bind_policy(PolicyLink(policy_model()))
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


def test_an_invalid_action_prefetches_nothing():
    venv = make_toy_env(B, autoreset_mode="Disabled", max_new_tokens=T, device=DEVICE)
    link = venv.bind_policy(PolicyLink(policy_model()))
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
    for name, context in (("autocast", autocast), ("none", nullcontext)):
        venv = make_toy_env(B, autoreset_mode="Disabled", max_new_tokens=T, device=DEVICE)
        link = venv.bind_policy(PolicyLink(policy_model(), autocast=context))
        venv.reset(seed=0)
        venv.step(link.sample(torch.Generator().manual_seed(0)))
        assert link._pending is None  # computed in the step
        outputs[name] = link.outputs().logits
    assert entered, "the prefetched forward ran without the link's autocast"
    assert not torch.equal(outputs["autocast"], outputs["none"])  # bf16 matmuls round differently

    # and the same numbers as a lazy forward under the same autocast
    venv = make_toy_env(B, autoreset_mode="Disabled", max_new_tokens=T, device=DEVICE)
    venv.engine.prefetch_policy = False
    link = venv.bind_policy(PolicyLink(policy_model(), autocast=autocast))
    venv.reset(seed=0)
    venv.step(link.sample(torch.Generator().manual_seed(0)))
    torch.testing.assert_close(link.outputs().logits, outputs["autocast"], atol=0, rtol=0)


def test_next_step_autoreset_is_the_same_with_and_without_prefetch():
    """Rows that end are restarted at the next step; the prefetched forward already covered them."""
    records = []
    for prefetch in (True, False):
        venv = make_toy_env(B, stop_tokens=("good",), max_new_tokens=T, device=DEVICE)
        venv.engine.prefetch_policy = prefetch
        link = venv.bind_policy(PolicyLink(policy_model()))
        venv.reset(seed=0)
        gen = torch.Generator().manual_seed(0)
        good = venv.tokenizer.convert_tokens_to_ids("good")
        run = []
        for _ in range(30):
            tokens = link.sample(gen)
            tokens[(torch.rand(B, generator=gen) < 0.2).to(tokens.device)] = good
            _, rewards, terminated, _, info = venv.step(tokens)
            run.append((rewards, terminated, info["logprob"], info["kl"]))
        records.append(run)
        assert link.decoder is not None
    assert any(step[1].any() for step in records[0])
    for a, b in zip(*records, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_allclose(x, y, atol=1e-6, equal_nan=True)
