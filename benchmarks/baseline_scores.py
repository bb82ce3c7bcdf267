"""The baseline score table: what a random agent and the untouched pretrained LM score on every task.

A learner's number means nothing without the floor (tokens at random) and the starting point (the
pretrained LM, the RLHF reference policy) measured on the same prompts with the same reward. For every
registered id this prints one Markdown row with both, on the task's gold reward (the true reward; for the
programmatic tasks it is also the env's own reward) and, for the Toy world, its keyword reward:

- *random*: `agents.random_agent.evaluate` on ``gym.make(id, reward="gold")``, uniform over the action space
  (EOS included, so episodes are short);
- *pretrained LM*: `agents.evaluation.evaluate_policy` with the reference LM as the policy, plain sampling
  at temperature 1, one completion per held-out prompt.

Missing task models are built on first use under ``$TEXTENV_HOME`` (several minutes for all of them).

    python benchmarks/baseline_scores.py                      # 200 episodes / prompts per task
    python benchmarks/baseline_scores.py --n 50 --ids textenv/Reverse-v0
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import textenv  # noqa: F401  (registers the ids)
from agents.evaluation import evaluate_policy
from agents.random_agent import evaluate
from textenv.registration import TASK_IDS

ALL_IDS = ["textenv/Toy-v0", *TASK_IDS]


def baseline_row(env_id: str, n: int, seed: int) -> dict[str, float | str]:
    """Random-agent and pretrained-LM scores of one env id.

    :param env_id: a registered textenv id.
    :param n: episodes for the random agent and prompts for the LM.
    :param seed: seeds both (the LM's prompts come from ``default_rng([seed, 7])``, held out from the build).
    """
    started = time.perf_counter()
    kwargs = {} if env_id == "textenv/Toy-v0" else {"reward": "gold"}
    env = gym.make(env_id, **kwargs)
    engine = env.unwrapped.engine  # the reference LM, tokenizer, reward and join of the env
    random_result = evaluate(env, n_episodes=n, seed=seed)
    if env_id == "textenv/Toy-v0":
        from textenv.toy import toy_prompts

        prompts, gold = toy_prompts(np.random.default_rng([seed, 7]), n), None
    else:
        from textenv.tasks import get_task

        task = get_task(TASK_IDS[env_id][0])
        prompts, gold = task.prompts(np.random.default_rng([seed, 7]), n), task.gold_reward
    lm = evaluate_policy(
        engine.ref_model, engine.ref_model, engine.tokenizer, engine.reward_fn, prompts, engine.max_prompt_tokens,
        engine.max_new_tokens, gold_reward=gold, seed=seed, join=engine.join,
    )  # fmt: skip
    lm_score = lm.gold if lm.gold is not None else lm.score
    lm_samples = np.array([s.get("gold", s["score"]) for s in lm.samples])
    return {
        "id": env_id,
        "random": random_result["score"],
        "random_length": random_result["length"],
        "lm": float(lm_score),
        "lm_std": float(lm_samples.std()),
        "lm_length": lm.length,
        "seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="episodes (random agent) and prompts (LM) per id")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ids", nargs="+", default=ALL_IDS, help="env ids (default: every registered id)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(
        f"| id | random agent | pretrained LM (T=1) | LM std | random / LM length | seconds |  (n={args.n}, seed={args.seed})"
    )
    print("|---|---|---|---|---|---|")
    for env_id in args.ids:
        row = baseline_row(env_id, args.n, args.seed)
        print(
            f"| `{row['id']}` | {row['random']:.3f} | {row['lm']:.3f} | {row['lm_std']:.3f} "
            f"| {row['random_length']:.1f} / {row['lm_length']:.1f} | {row['seconds']:.0f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
