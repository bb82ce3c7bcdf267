"""A random agent and the episode-level evaluation loop: the floor of docs/baseline_scores.md.

A learner is only interesting if it beats picking tokens at random, so benchmarks need that number on the
same env, seeds and metrics. `RandomAgent` samples uniformly over the whole action space (every id the LM
head can emit) or over the tokenizer's ids only, optionally refusing EOS / stop tokens until a minimum
length. `evaluate` runs any agent that exposes its next-token distribution (``logprobs(obs) -> (V,)``) for a
number of episodes and reports mean score, return, KL and length.

The KL term is exact for every agent, the random one included: `evaluate` binds a model-less `PolicyLink`
and provides the agent's own distribution each step (for the random agent: uniform over the allowed ids,
not the env's default assumption of a uniform policy over the whole action space).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
import torch

from textenv.policy_link import PolicyLink


class Agent(Protocol):
    """What `evaluate` needs: the log-probs ``(V,)`` of the agent's next-token distribution at ``obs``."""

    def logprobs(self, observation: dict[str, np.ndarray]) -> torch.Tensor: ...


class RandomAgent:
    """Uniform random tokens.

    :param num_actions: size of the action space (the LM's output size).
    :param num_ids: sample only ids ``< num_ids`` (e.g. ``len(tokenizer)``, skipping the LM head's padding
        rows); default: the whole action space.
    :param stop_ids: EOS / stop token ids, never sampled before ``min_length`` tokens were generated.
    :param min_length: the number of tokens to generate before a stop id may be sampled.
    :param prompt_slots: the env's ``max_prompt_tokens`` (generated tokens are the real ones after them).
    """

    def __init__(
        self,
        num_actions: int,
        num_ids: int | None = None,
        stop_ids: Sequence[int] = (),
        min_length: int = 0,
        prompt_slots: int = 0,
    ) -> None:
        self.num_actions = int(num_actions)
        self.num_ids = self.num_actions if num_ids is None else int(num_ids)
        if not 0 < self.num_ids <= self.num_actions:
            raise ValueError(f"num_ids must be in [1, {self.num_actions}], got {self.num_ids}")
        self.stop_ids = [int(i) for i in stop_ids]
        self.min_length = int(min_length)
        self.prompt_slots = int(prompt_slots)

    @classmethod
    def for_env(cls, env: gym.Env, tokenizer_only: bool = False, min_length: int = 0) -> RandomAgent:
        """A random agent for a textenv env (its action space, tokenizer size, stop ids and layout).

        :param tokenizer_only: sample ids ``< len(tokenizer)`` only.
        :param min_length: no EOS / stop token before this many generated tokens.
        """
        engine = env.unwrapped.engine
        return cls(
            int(env.action_space.n),
            num_ids=len(engine.tokenizer) if tokenizer_only else None,
            stop_ids=engine.stop_ids,
            min_length=min_length,
            prompt_slots=engine.max_prompt_tokens,
        )

    def logprobs(self, observation: dict[str, np.ndarray]) -> torch.Tensor:
        """``(V,)`` log-probs: uniform over the allowed ids, ``-inf`` elsewhere."""
        generated = int(np.asarray(observation["attention_mask"])[self.prompt_slots :].sum())
        allowed = torch.zeros(self.num_actions, dtype=torch.bool)
        allowed[: self.num_ids] = True
        if generated < self.min_length and self.stop_ids:
            allowed[torch.as_tensor(self.stop_ids)] = False
        n = int(allowed.sum())
        if n == 0:
            raise ValueError("the random agent has no allowed token (every id is a stop id)")
        return torch.where(allowed, torch.tensor(-math.log(n)), torch.tensor(float("-inf")))

    def act(self, observation: dict[str, np.ndarray], generator: torch.Generator | None = None) -> int:
        """One uniformly random allowed id."""
        return int(torch.multinomial(self.logprobs(observation).exp(), 1, generator=generator))


def evaluate(
    env: gym.Env, n_episodes: int = 100, seed: int = 0, agent: Agent | None = None
) -> dict[str, Any]:
    """Run ``n_episodes`` episodes, sampling from the agent's distribution, and average what benchmarks report.

    The agent's distribution also feeds the env's KL term (a model-less `PolicyLink` is bound for the run,
    and the env's previous binding is restored afterwards), so the reported KL and return are exact.

    :param env: a textenv env (single, possibly wrapped).
    :param n_episodes: number of episodes.
    :param seed: seeds the first ``reset`` (the prompt sequence) and the token sampling.
    :param agent: anything with ``logprobs(obs) -> (V,)``; default `RandomAgent.for_env(env)`.
    :return: ``score``, ``return``, ``kl`` and ``length`` (means over episodes) and ``n_episodes``.
    """
    if n_episodes <= 0:
        raise ValueError(f"n_episodes must be > 0, got {n_episodes}")
    agent = agent if agent is not None else RandomAgent.for_env(env)
    generator = torch.Generator().manual_seed(seed)
    base = env.unwrapped
    previous = base.policy
    link = base.bind_policy(PolicyLink(None))
    scores, returns, kls, lengths = [], [], [], []
    try:
        obs, _ = env.reset(seed=seed)
        for _ in range(n_episodes):
            total, kl, length, done = 0.0, 0.0, 0, False
            while not done:
                logprobs = agent.logprobs(obs).detach().float().cpu().view(1, -1)
                link.provide(logprobs)
                action = int(torch.multinomial(logprobs.exp(), 1, generator=generator))
                obs, reward, terminated, truncated, info = env.step(action)
                total, kl, length = total + float(reward), kl + info["kl"], length + 1
                done = terminated or truncated
            scores.append(info.get("score", float("nan")))
            returns.append(total)
            kls.append(kl)
            lengths.append(length)
            obs, _ = env.reset()
    finally:
        base.bind_policy(previous)
    return {
        "score": float(np.mean(scores)),
        "return": float(np.mean(returns)),
        "kl": float(np.mean(kls)),
        "length": float(np.mean(lengths)),
        "n_episodes": n_episodes,
    }
