"""The full RLHF pipeline through the Python API: pretrain an LM, learn a reward model, PPO, evaluate.

`agents.pipeline.run_rlhf` runs the three stages of Ouyang et al. (2022) on an offline task:

1. a tiny LM is pretrained on the task's generated corpus;
2. it samples K completions per prompt, simulated annotators rank them by the hidden *gold* reward, and a
   Bradley–Terry reward model is trained on the rankings;
3. PPO trains a copy of the LM against the RM minus a KL penalty to the pretrained LM;

then it prints a before/after table on held-out prompts (gold reward, RM score, KL, perplexity).
``--prebuilt`` reuses the task's cached default LM and RM (``textenv build --task ...``, in
``$TEXTENV_HOME``) instead of running stages 1-2 in the run folder: the same code, built once.
Run: ``python examples/full_rlhf.py [--task arithmetic] [--tiny] [--prebuilt]``.
"""

import argparse
import shutil

import torch

from agents.pipeline import RLHFConfig, run_rlhf

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="arithmetic", help="built-in task (arithmetic builds fastest)")
    parser.add_argument("--run-dir", default="runs/full_rlhf", help="run folder (replaced if it exists)")
    parser.add_argument("--tiny", action="store_true", help="2 PPO iterations of 8 episodes (for the tests)")
    parser.add_argument(
        "--prebuilt", action="store_true", help="take stages 1-2 from the task's cached models"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny models: one thread is fastest

    lm = rm = None
    if args.prebuilt:  # stages 1-2 as `textenv build` runs them, cached across runs
        from textenv.tasks.artifacts import task_models

        lm_dir, rm_dir = task_models(args.task, progress=True)
        lm, rm = str(lm_dir), str(rm_dir)

    # Every knob of the job is a field of RLHFConfig (the CLI's `textenv rlhf` reads the same fields).
    config = RLHFConfig(
        task=args.task,
        run_dir=args.run_dir,
        lm=lm,
        rm=rm,
        iterations=2 if args.tiny else 40,  # PPO iterations
        num_envs=8 if args.tiny else 64,  # episodes per iteration
        ppo=dict(learning_rate=2e-4, minibatch_size=8, micro_batch_size=8),
        eval_prompts=16 if args.tiny else 256,
    )
    shutil.rmtree(args.run_dir, ignore_errors=True)
    summary = run_rlhf(config, progress=not args.tiny)  # prints the before/after table and samples
    print(f"gold reward before PPO: {summary['before']['gold']:.3f}, after: {summary['after']['gold']:.3f}")
