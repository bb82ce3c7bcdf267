"""Quickstart: the standard Gymnasium loop in a textenv environment, with a random agent.

Each action is one token; the observation is the token sequence so far; the reward is -β·KL per token
plus the reward function's score at the end. Run: ``python examples/quickstart.py``.
"""

import gymnasium as gym

import textenv  # noqa: F401  (registers the textenv/... ids)

env = gym.make("textenv/Toy-v0", render_mode="ansi")
observation, info = env.reset(seed=42)
print("prompt:", info["prompt"])

episode_return, terminated, truncated = 0.0, False, False
while not (terminated or truncated):
    action = env.action_space.sample()  # a random agent: a uniformly random token id
    observation, reward, terminated, truncated, info = env.step(action)
    episode_return += reward

print(env.render())  # the prompt, each token with its reference log-prob, KL and reward
print(f"completion: {info['text']!r}  score: {info['score']:.3f}  return: {episode_return:.3f}")
env.close()
