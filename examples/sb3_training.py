"""Train a language model with stable-baselines3's PPO, unmodified, on a textenv env.

The toy task: continue a short movie-review prompt with 3 tokens; the reward is the fraction of the words
"good", "great" and "fun" that appear. The policy is the env's own (random, tiny) reference LM wrapped in
`agents.sb3_policy.LMPolicy`, so SB3 trains the LM itself: its LM head picks tokens, a value head reads its
last hidden state. Run:

    python examples/sb3_training.py --timesteps 1024

and the mean score should rise from about 0.09 to about 0.5 in a few seconds on a laptop CPU.
"""

from __future__ import annotations

import argparse

import torch
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.monitor import Monitor

from agents.random_agent import evaluate
from agents.sb3_policy import LMPolicy, SB3Agent, bind_evaluation_env, bind_links
from textenv.toy import make_toy_env


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timesteps", type=int, default=1024, help="environment steps to train for")
    parser.add_argument("--n-envs", type=int, default=4, help="sub-envs SB3 steps in lockstep")
    parser.add_argument("--eval-episodes", type=int, default=200, help="episodes per evaluation")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny models: threads cost more than they save (and oversubscribe shared CPUs)

    # 1. The env: the toy world with a 3-token budget and a small KL penalty (β = 0.05).
    env_kwargs = dict(max_new_tokens=3, kl_coef=0.05)
    vec_env = make_vec_env(lambda: make_toy_env(**env_kwargs), n_envs=args.n_envs, seed=args.seed)

    # 2. The KL term needs log π(a): bind one model-less PolicyLink per sub-env; LMPolicy.forward hands
    #    each sub-env its row of the distribution right before SB3 calls env.step (one forward per token).
    links = bind_links(vec_env)

    # 3. The policy starts as a copy of the reference LM (LMPolicy deep-copies it; the reference stays frozen).
    reference = vec_env.envs[0].unwrapped.reference_model
    model = PPO(
        LMPolicy,
        vec_env,
        policy_kwargs=dict(model=reference, links=links),
        n_steps=32,  # per sub-env: 128 tokens per rollout
        batch_size=64,
        n_epochs=4,
        learning_rate=3e-3,  # a tiny random LM; real pretrained LMs want ~1e-5
        seed=args.seed,
        device="cpu",
    )

    # 4. Before / after: mean RM score of sampled completions on a separate env (same prompts and seed).
    eval_env = make_toy_env(**env_kwargs)
    before = evaluate(eval_env, args.eval_episodes, seed=1, agent=SB3Agent(model.policy))
    model.learn(total_timesteps=args.timesteps)
    after = evaluate(eval_env, args.eval_episodes, seed=1, agent=SB3Agent(model.policy))
    print(f"score before: {before['score']:.3f}  (kl {before['kl']:.3f})")
    print(f"score after:  {after['score']:.3f}  (kl {after['kl']:.3f}, return {after['return']:.3f})  after "
          f"{args.timesteps} steps")

    # 5. SB3's own evaluate_policy gives the same return once its env is bound to the policy's LM (unbound, the
    #    env's KL term would assume a uniform policy). deterministic=False: the sampled policy RLHF trains.
    sb3_env = Monitor(make_toy_env(**env_kwargs))
    bind_evaluation_env(sb3_env, model.policy)
    sb3_return, _ = evaluate_policy(model, sb3_env, n_eval_episodes=args.eval_episodes, deterministic=False)
    print(f"SB3 evaluate_policy on a bound env: return {sb3_return:.3f}")
    return {"before": before["score"], "after": after["score"], "return": after["return"], "sb3_return": sb3_return}


if __name__ == "__main__":
    main()
