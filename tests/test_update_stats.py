"""The updates keep their statistics on the device and read them once (`agents.update_stats`): no ``.item()``
per micro-batch, which on a GPU would make the host wait for the queue before launching the next forward."""

import copy
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import agents.ppo
import agents.update_stats
from agents.policy_gradient import episode_returns
from agents.ppo import PPOAgent, PPOConfig
from agents.reinforce import RLOOAgent, RLOOConfig
from agents.update_stats import UpdateStats
from agents.value_head import PolicyWithValueHead
from textenv.toy import make_toy_env

_ROOT = Path(agents.update_stats.__file__).resolve().parent.parent  # the checkout (which may hold the venv too)
PROJECT_CODE = (str(_ROOT / "agents") + os.sep, str(_ROOT / "textenv") + os.sep)


def test_means_are_those_of_the_recorded_values():
    values = [torch.tensor(0.1), torch.tensor(0.25, requires_grad=True) * 2, torch.tensor(-1.0)]
    stats = UpdateStats(("loss", "never"))
    for v in values:
        stats.add("loss", v)
    assert all(v.grad_fn is None for v in stats._values["loss"])  # a kept loss keeps no autograd graph alive
    out = stats.means(extra=torch.tensor(3.5))
    assert out == {"loss": np.mean([v.item() for v in values]), "never": 0.0, "extra": 3.5}


@pytest.fixture
def counted_reads(monkeypatch):
    """Counts the project's ``Tensor.item`` / ``float(tensor)`` calls, `UpdateStats`' transfers and PPO's
    ``target_kl`` reads."""
    counts = {"item": 0, "float": 0, "to_host": 0, "decisions": 0}
    item, as_float, to_host = torch.Tensor.item, torch.Tensor.__float__, agents.update_stats.to_host

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename  # torch's own reads (Adam's CPU step count) are not ours
            counts[name] += caller.startswith(PROJECT_CODE)
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(torch.Tensor, "item", counting("item", item))
    monkeypatch.setattr(torch.Tensor, "__float__", counting("float", as_float))
    monkeypatch.setattr(agents.update_stats, "to_host", counting("to_host", to_host))
    monkeypatch.setattr(agents.ppo, "to_host", counting("decisions", to_host))  # target_kl's early-stop reads
    return counts


def ppo_agent(**config):
    env = make_toy_env(8, autoreset_mode="Disabled", max_new_tokens=4)
    settings = dict(minibatch_size=4, micro_batch_size=2, ppo_epochs=2, ptx_coef=0.0, **config)
    return PPOAgent(PolicyWithValueHead(copy.deepcopy(env.reference_model)), env, PPOConfig(**settings))


def test_a_ppo_update_reads_the_device_once(counted_reads):
    agent = ppo_agent()
    batch = agent.rollout()
    counted_reads.update(item=0, float=0, to_host=0)
    stats = agent.update(batch)  # 2 epochs x 2 minibatches x 2 micro-batches
    assert counted_reads == {"item": 0, "float": 0, "to_host": 1, "decisions": 0}
    assert stats["entropy"] > 0 and stats["value_loss"] > 0 and np.isfinite(stats["explained_variance"])


def test_target_kl_reads_once_per_minibatch_to_decide(counted_reads):
    agent = ppo_agent(target_kl=1e9)  # never stops, but must look after each minibatch
    batch = agent.rollout()
    counted_reads.update(item=0, float=0, to_host=0)
    stats = agent.update(batch)
    assert counted_reads == {"item": 0, "float": 0, "to_host": 1, "decisions": 4}  # one per minibatch
    assert stats["early_stopped"] == 0.0
    agent = ppo_agent(target_kl=1e-12)  # stops as soon as the policy has moved: no read after that
    batch = agent.rollout()
    counted_reads.update(decisions=0)
    assert agent.update(batch)["early_stopped"] == 1.0 and 1 <= counted_reads["decisions"] < 4


def test_a_policy_gradient_update_reads_the_device_once(counted_reads):
    env = make_toy_env(8, autoreset_mode="Disabled", max_new_tokens=4)
    agent = RLOOAgent(copy.deepcopy(env.reference_model), env, RLOOConfig(samples_per_prompt=2, minibatch_size=4))
    batch = agent.rollout()
    advantages = agent.advantages(episode_returns(batch))
    counted_reads.update(item=0, float=0, to_host=0)
    stats = agent.update(batch, advantages)
    assert counted_reads == {"item": 0, "float": 0, "to_host": 1, "decisions": 0}
    assert stats["grad_norm"] > 0 and stats["entropy"] > 0
