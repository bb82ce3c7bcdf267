"""Your own reward function in a textenv env, and a short PPO run that optimises it.

A reward function scores finished episodes from text: ``score(prompts, completions) -> one float each``.
Write it as a `RewardFunction` subclass (reusable, named) or wrap a plain function in `CallableReward`;
`WeightedSum` (``a + 0.5 * b``) mixes them, the way a learned RM is combined with rules in practice.
The env validates every score (one finite float per episode) and adds the per-token KL penalty.
Run: ``python examples/custom_reward.py [--tiny] [--run-dir runs/custom_reward]``.
"""

import argparse
import copy
import shutil

import torch

from agents.ppo import PPOAgent, PPOConfig
from agents.run import TrainingRun
from agents.value_head import PolicyWithValueHead
from textenv.rewards import CallableReward, RewardFunction
from textenv.toy import make_toy_env


class SentimentWords(RewardFunction):
    """+1 per positive word, -1 per negative word, divided by the completion's length in words."""

    name = "sentiment_words"
    POSITIVE, NEGATIVE = {"good", "great", "fine", "fun"}, {"bad", "awful", "dull", "boring"}

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        out = []
        for text in completions:
            words = text.split()
            out.append(sum((w in self.POSITIVE) - (w in self.NEGATIVE) for w in words) / max(len(words), 1))
        return out


def ends_a_sentence(prompt: str, completion: str) -> float:
    """A rule: completions that end with a full stop get 1."""
    return float(completion.rstrip().endswith("."))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="2 iterations (for the tests)")
    parser.add_argument("--run-dir", default="runs/custom_reward", help="run folder (replaced if it exists)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny models: one thread is fastest

    # The reward: our class plus half of a rule (a WeightedSum), plugged into the toy world's env.
    reward = SentimentWords() + 0.5 * CallableReward(ends_a_sentence, per_example=True)
    print("reward:", reward.name)
    env = make_toy_env(num_envs=16, reward_fn=reward, kl_coef=0.05, autoreset_mode="Disabled")

    # PPO on a copy of the reference LM; TrainingRun writes metrics.jsonl, plots and checkpoints.
    iterations = 2 if args.tiny else 30
    agent = PPOAgent(PolicyWithValueHead(copy.deepcopy(env.reference_model)), env,
                     PPOConfig(learning_rate=1e-3, minibatch_size=8, micro_batch_size=8, total_iterations=iterations))  # fmt: skip
    shutil.rmtree(args.run_dir, ignore_errors=True)
    metrics = TrainingRun(agent, args.run_dir).train(iterations, progress=False)
    for m in metrics:
        print(f"iteration {m['iteration']:>2}: reward {m['score']:+.3f}  KL {m['kl']:.3f}")
    print(f"run folder: {args.run_dir} (plot it with: python examples/plot_run.py {args.run_dir})")
