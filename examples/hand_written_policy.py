"""A hand-written policy in the standard Gymnasium loop, scored against a random agent.

The toy env rewards the words "good", "great" and "fun" in a short completion. A policy here is any
function from the observation to log-probs over the vocabulary; this one writes each missing keyword,
then EOS. The env's KL penalty needs ``log π(token)``, so we bind a model-less `PolicyLink` and
``provide`` our distribution before every step: the KL the env reports is then exactly ours.
Run: ``python examples/hand_written_policy.py [--tiny]``.
"""

import argparse

import gymnasium as gym
import numpy as np
import torch

import textenv  # noqa: F401  (registers the textenv/... ids)
from agents.random_agent import RandomAgent
from textenv.policy_link import PolicyLink


def keyword_policy(env: gym.Env):
    """``policy(obs) -> (V,) log-probs``: strongly prefer keywords not yet written, then end the episode."""
    engine = env.unwrapped.engine
    keywords = engine.tokenizer.convert_tokens_to_ids(["good", "great", "fun"])
    slots, vocab = engine.max_prompt_tokens, env.action_space.n

    def policy(obs: dict[str, np.ndarray]) -> torch.Tensor:
        generated = obs["input_ids"][slots:][obs["attention_mask"][slots:] == 1]  # tokens after the prompt
        logits = torch.zeros(vocab)  # anything is possible (a finite KL to the reference) ...
        missing = [k for k in keywords if k not in generated]
        logits[missing or [engine.eos_id]] = 8.0  # ... but the next keyword, or EOS, is very likely
        return torch.log_softmax(logits, -1)

    return policy


def run(env: gym.Env, policy, episodes: int, seed: int) -> tuple[float, float]:
    """The Gymnasium loop; returns the mean final score and mean episode KL."""
    link = env.unwrapped.bind_policy(PolicyLink(None))  # the env reads log π(a) from here
    generator = torch.Generator().manual_seed(seed)
    scores, kls = [], []
    obs, info = env.reset(seed=seed)
    for _ in range(episodes):
        done, kl = False, 0.0
        while not done:
            logprobs = policy(obs)
            link.provide(logprobs.view(1, -1))  # hand our distribution to the env's KL term
            action = int(torch.multinomial(logprobs.exp(), 1, generator=generator))
            obs, reward, terminated, truncated, info = env.step(action)
            kl, done = kl + info["kl"], terminated or truncated
        scores.append(info["score"])
        kls.append(kl)
        obs, info = env.reset()
    return float(np.mean(scores)), float(np.mean(kls))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few episodes only (for the tests)")
    episodes = 5 if parser.parse_args().tiny else 200
    torch.set_num_threads(1)  # tiny models: one thread is fastest
    env = gym.make("textenv/Toy-v0")
    random_agent = RandomAgent.for_env(env)
    for name, policy in (("random", random_agent.logprobs), ("hand-written", keyword_policy(env))):
        score, kl = run(env, policy, episodes, seed=0)
        print(
            f"{name:>12} policy: score {score:.3f}  KL to the reference {kl:.2f} nats  ({episodes} episodes)"
        )
