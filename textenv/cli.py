"""The ``textenv`` command: the RLHF stages as subcommands (``textenv <subcommand> --help``).

Each subcommand is one ``add_<name>`` function that declares its arguments and one ``run_<name>``
function that does the work with the Python API; adding a subcommand means writing that pair and
listing the ``add_`` function in ``SUBCOMMANDS``. Heavy imports happen inside the ``run_`` functions so
``textenv label`` starts instantly.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


# ------------------------------------------------------------------------------------------------ pretrain
def add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="stage 1: train or fine-tune a causal LM on a task's corpus or your text")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--task", help="train on this task's generated corpus (sentiment, arithmetic, keywords, reverse)")
    src.add_argument("--corpus", type=Path, help="a text file (one document per line) or JSONL with a 'text' field")
    p.add_argument("--init", type=Path, help="an LM folder to fine-tune instead of a new tiny model")
    p.add_argument("--tokenizer", type=Path, help="tokenizer folder for --corpus (default: the --init folder's, "
                   "else a word-level tokenizer over the corpus)")  # fmt: skip
    p.add_argument("--steps", type=int, default=800, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=64, help="documents per step")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    p.add_argument("--n-docs", type=int, default=20000, help="corpus size for --task")
    p.add_argument("--seed", type=int, default=0, help="seeds the corpus, the model and the batches")
    p.add_argument("--out", type=Path, required=True, help="folder to save the LM and tokenizer in")
    p.set_defaults(func=run_pretrain)


def run_pretrain(args: argparse.Namespace) -> int:
    import torch

    from textenv.models import build_word_tokenizer, load_causal_lm, load_tokenizer
    from textenv.pretraining import pretrain_lm, pretrain_task_lm, read_corpus_file
    from textenv.tasks import get_task

    if args.task:
        if args.init:
            raise SystemExit("--init is for fine-tuning on --corpus")
        result = pretrain_task_lm(get_task(args.task), seed=args.seed, out_dir=args.out, steps=args.steps,
                                  batch_size=args.batch_size, lr=args.lr, n_docs=args.n_docs)  # fmt: skip
    else:
        texts = read_corpus_file(args.corpus)
        # First, as it checks the folder exists. In float32 whatever the folder's dtype: transformers loads a bf16
        # checkpoint as bf16, whose weights would round AdamW's updates away.
        model = load_causal_lm(args.init, dtype=torch.float32) if args.init else None
        tok_dir = args.tokenizer or args.init
        tokenizer = load_tokenizer(tok_dir) if tok_dir else build_word_tokenizer(w for t in texts for w in t.split())
        result = pretrain_lm(texts, tokenizer, model=model, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                             seed=args.seed, out_dir=args.out)  # fmt: skip
    print(f"{result.summary()}; saved to {result.out_dir}")
    return 0


# ------------------------------------------------------------------------------------------------ sample
def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lm", type=Path, help="LM folder to sample from (default: the task's default LM)")
    p.add_argument("--n", type=int, default=100, help="number of prompts")
    p.add_argument("--k", type=int, default=2, help="completions per prompt (at least 2)")
    p.add_argument("--seed", type=int, default=0, help="seeds the prompts and the sampling")


def _sample(args: argparse.Namespace) -> list:
    import numpy as np

    from textenv.models import load_causal_lm, load_tokenizer
    from textenv.preferences import make_samples, sample_completions
    from textenv.tasks import get_task
    from textenv.tasks.artifacts import task_models

    if args.n < 1 or args.k < 2:  # preference records need a prompt and two completions to compare
        raise ValueError(f"--n must be >= 1 and --k >= 2 (completions to compare), got --n {args.n} --k {args.k}")
    task = get_task(args.task)
    lm_dir = args.lm or task_models(args.task, progress=True)[0]
    lm, tokenizer = load_causal_lm(lm_dir), load_tokenizer(lm_dir)
    prompts = task.prompts(np.random.default_rng([args.seed, 11]), args.n)
    completions = sample_completions(lm, tokenizer, prompts, args.k, task.max_new_tokens, seed=args.seed, progress=True)
    return make_samples(prompts, completions, id_prefix=f"{args.task}-{args.seed}")


def add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="stage 2: sample K completions per prompt into a JSONL file to label")
    p.add_argument("--task", required=True)
    _add_sampling_args(p)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=run_sample)


def run_sample(args: argparse.Namespace) -> int:
    from textenv.preferences import write_records

    records = _sample(args)
    print(f"{len(records)} samples written to {write_records(records, args.out)}")
    return 0


# ------------------------------------------------------------------------------------------------ preferences
def add_preferences(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("preferences", help="stage 2: label samples with simulated annotators (Bradley–Terry on the gold reward)")
    p.add_argument("--task", required=True)
    p.add_argument("--samples", type=Path, help="label this sample file instead of sampling anew")
    _add_sampling_args(p)
    p.add_argument("--annotators", type=int, default=5, help="number of simulated annotators")
    p.add_argument("--temperature", type=float, default=0.3, help="choice noise of each annotator")
    p.add_argument("--disagreement", type=float, default=0.15, help="scale of each annotator's own opinion")
    p.add_argument("--tie-margin", type=float, default=0.0, help="K=2: a tie when utilities differ by less")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=run_preferences)


def run_preferences(args: argparse.Namespace) -> int:
    from textenv.preferences import (
        SimulatedAnnotators,
        agreement_with_gold,
        expand_to_pairs,
        load_samples,
        write_records,
    )
    from textenv.tasks import get_task

    task = get_task(args.task)
    samples = load_samples(args.samples) if args.samples else _sample(args)
    annotators = SimulatedAnnotators(task, args.annotators, args.temperature, args.disagreement, args.tie_margin, args.seed)
    records = annotators.label(samples, progress=True)
    write_records(records, args.out)
    agreement = agreement_with_gold(expand_to_pairs(records), task)
    print(f"{len(records)} labelled records written to {args.out}; annotators agree with the gold reward on {agreement:.1%} of pairs")
    return 0


# ------------------------------------------------------------------------------------------------ label
def add_label(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("label", help="stage 2: label samples yourself in the terminal (resumable)")
    p.add_argument("samples", type=Path, help="sample file from `textenv sample`")
    p.add_argument("out", type=Path, help="JSONL file the labels are appended to")
    p.add_argument("--annotator", default="human", help="your name, stored with each label")
    p.set_defaults(func=run_label)


def run_label(args: argparse.Namespace) -> int:
    from textenv.labeling import label_interactively
    from textenv.preferences import load_samples

    session = label_interactively(load_samples(args.samples), args.out, annotator=args.annotator)
    return 130 if session.interrupted else 0


# ------------------------------------------------------------------------------------------------ train-rm
def add_train_rm(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-rm", help="stage 2: train a Bradley–Terry reward model on preference records")
    p.add_argument("--preferences", type=Path, required=True, help="labelled JSONL file(s), comma-separated")
    p.add_argument("--lm", type=Path, required=True, help="LM folder or hub name: its tokenizer, and its trunk unless --scratch")
    p.add_argument("--scratch", action="store_true", help="start from a new tiny model instead of the LM's trunk")
    p.add_argument("--task", help="the task, for joining text and reporting agreement with its gold reward")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (the default builds use 1500)")
    p.add_argument("--batch-size", type=int, default=16, help="records per step (the sentiment build uses 32)")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (the sentiment build uses 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="seeds the split, the model and the batches")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=run_train_rm)


def run_train_rm(args: argparse.Namespace) -> int:
    from textenv.models import load_tokenizer
    from textenv.preferences import load_preferences
    from textenv.reward_model_training import train_reward_model
    from textenv.tasks import get_task

    records = [r for path in str(args.preferences).split(",") for r in load_preferences(path)]
    result = train_reward_model(
        records, load_tokenizer(args.lm), task=get_task(args.task) if args.task else None,
        init_from=None if args.scratch else args.lm, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        seed=args.seed, out_dir=args.out,
    )  # fmt: skip
    print(f"{result.summary()}; saved to {result.out_dir}")
    return 0


# ------------------------------------------------------------------------------------------------ build
def add_build(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="build (or find) a task's default LM and RM in $TEXTENV_HOME")
    p.add_argument("--task", required=True)
    p.add_argument("--home", type=Path, help="cache folder (default $TEXTENV_HOME or ~/.cache/textenv)")
    p.set_defaults(func=run_build)


def run_build(args: argparse.Namespace) -> int:
    from textenv.tasks.artifacts import task_build_metrics, task_models

    lm_dir, rm_dir = task_models(args.task, args.home, progress=True)
    metrics = task_build_metrics(args.task, args.home)
    print(f"LM: {lm_dir}\nRM: {rm_dir}")
    print(json.dumps({k: v for k, v in metrics.items() if k != "budget"}, indent=2))
    return 0


# ------------------------------------------------------------------------------------------------ rlhf
def add_rlhf(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rlhf", help="the main job: pretrain LM, simulated preferences, reward model, PPO, before/after table"
    )
    p.add_argument("--task", help="built-in task (default: sentiment)")
    p.add_argument("--run-dir", help="run folder (default: runs/rlhf)")
    # The defaults are RLHFConfig's (a flag left out keeps the config file's value, or else RLHFConfig's);
    # tests/test_pipeline.py checks that these help texts name them.
    p.add_argument("--seed", type=int, help="seeds every stage (default: 0)")
    p.add_argument("--lm", help="start from this LM folder or hub name (skips stage 1)")
    p.add_argument("--rm", help="use this reward-model folder or hub name (skips stage 2)")
    p.add_argument("--preferences", help="train the RM on this preference JSONL (skips simulated labelling)")
    p.add_argument("--iterations", type=int, help="PPO iterations (default: 60)")
    p.add_argument(
        "--num-envs", type=int, help="episodes per PPO iteration (default: 64; at least ppo.minibatch_size, 16)"
    )
    p.add_argument(
        "--decoding", help="rollout KV cache and decode step: dynamic, static or compiled (torch.compile) (default: dynamic)"
    )
    p.add_argument(
        "--lora-r", type=int, help="train LoRA adapters of this rank instead of every weight (needs peft; default 0: off)"
    )
    p.add_argument(
        "--defer-kl", action=argparse.BooleanOptionalAction, default=None,
        help="PPO computes the reference log-probs once per batch after generation, as TRL does, not once per "
        "token: faster rollouts, the same rewards to float tolerance (default: off)",
    )  # fmt: skip
    p.add_argument("--device", help="where every stage runs: cpu, cuda or cuda:N (default: cpu)")
    p.add_argument(
        "--bf16", action=argparse.BooleanOptionalAction, default=None,
        help="with --device cuda: PPO under bf16 autocast, frozen reference and RM in bf16 (default: off)",
    )  # fmt: skip
    p.add_argument("--config", type=Path, help="JSON or YAML file of RLHFConfig fields")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir where it stopped")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=run_rlhf)


def _load_config_file(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of RLHFConfig fields")
    return data


def run_rlhf(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from agents.pipeline import RLHFConfig, run_rlhf

    if args.threads:
        torch.set_num_threads(args.threads)
    fields = {f.name for f in dataclasses.fields(RLHFConfig)}
    values = _load_config_file(args.config) if args.config else {}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"unknown RLHF config fields {unknown}; valid: {sorted(fields)}")
    # Flags given on the command line override the config file; the rest keep RLHFConfig's defaults.
    for name in (
        "task", "run_dir", "seed", "lm", "rm", "preferences", "iterations", "num_envs", "decoding", "defer_kl",
        "lora_r", "device", "bf16",
    ):  # fmt: skip
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    run_rlhf(RLHFConfig(**values), resume=args.resume)
    return 0


# ------------------------------------------------------------------------------------------------ evaluate
def add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score a policy on held-out prompts: gold, RM score, KL, perplexity, diversity")
    p.add_argument("--task", required=True, help="built-in task (prompts, gold reward)")
    p.add_argument("--policy", required=True, help="policy LM folder or hub name")
    p.add_argument("--reference", help="reference LM (default: the task's pretrained LM)")
    p.add_argument("--rm", help="reward model folder (default: the task's RM)")
    p.add_argument("--prompts", type=int, default=256, help="number of held-out prompts")
    p.add_argument("--seed", type=int, default=0, help="seeds the prompts and the sampling")
    p.add_argument("--device", default="cpu", help="where the models run: cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--out", type=Path, help="write the metrics and samples as JSON here")
    p.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    import numpy as np

    from agents.evaluation import evaluate_policy
    from agents.pipeline import resolve_device
    from textenv.models import load_causal_lm, load_reward_model, load_tokenizer
    from textenv.rewards import RewardModelScorer
    from textenv.task_env import default_reward_source, task_reward
    from textenv.tasks import get_task
    from textenv.tasks.artifacts import task_models

    task = get_task(args.task)
    device = resolve_device(args.device, bf16=False)  # before any model is built or loaded
    reference_path = args.reference or task_models(args.task, progress=True)[0]
    policy, tokenizer = load_causal_lm(args.policy, device=device), load_tokenizer(args.policy)
    reference = load_causal_lm(reference_path, device=device)
    if args.rm is not None:
        scorer = RewardModelScorer(load_reward_model(args.rm, device=device), load_tokenizer(args.rm), join=task.join)
    else:  # the task's default: its learned RM, or its programmatic reward
        scorer = task_reward(args.task, default_reward_source(args.task))
        if isinstance(scorer, RewardModelScorer):
            scorer.model.to(device)
    prompts = task.prompts(np.random.default_rng([args.seed, 99]), args.prompts)
    result = evaluate_policy(
        policy, reference, tokenizer, scorer, prompts, task.max_prompt_tokens, task.max_new_tokens,
        gold_reward=task.gold_reward, seed=args.seed, join=task.join,
    )  # fmt: skip
    print(json.dumps(result.metrics(), indent=2))
    if args.out:
        args.out.write_text(json.dumps({"metrics": result.metrics(), "samples": result.samples}, indent=2))
    return 0


# ------------------------------------------------------------------------------------------------ benchmark
def add_benchmark(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "benchmark", help="run an algorithms × tasks × seeds grid (resumable) and write a results table and plots"
    )
    p.add_argument("--algos", default="ppo,rloo,grpo,sb3-ppo", help="comma-separated (ppo, reinforce, rloo, grpo, sb3-ppo)")
    p.add_argument("--tasks", default="toy", help="comma-separated: toy and/or built-in tasks (sentiment, arithmetic, keywords, reverse)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0 … n-1)")
    p.add_argument("--budget", type=int, default=20, help="iterations per run (one batch of --num-envs episodes each)")
    p.add_argument("--out", type=Path, default=Path("runs/benchmark"), help="grid folder (re-run to resume)")
    p.add_argument("--num-envs", type=int, default=16, help="episodes per iteration")
    p.add_argument("--lr", type=float, default=5e-4, help="learning rate of every algorithm")
    p.add_argument("--samples-per-prompt", type=int, default=4, help="K for RLOO / GRPO / REINFORCE")
    p.add_argument("--kl-coef", type=float, default=0.05, help="fixed KL penalty β")
    p.add_argument("--reward", choices=("auto", "rm", "gold"), default="auto",
                   help="env reward of built-in tasks (auto: the learned RM for sentiment, gold otherwise)")  # fmt: skip
    p.add_argument("--eval-prompts", type=int, default=64, help="held-out prompts for each run's final evaluation")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.set_defaults(func=run_benchmark)


def run_benchmark(args: argparse.Namespace) -> int:
    from agents.benchmark import BenchmarkSettings, check_names

    algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    check_names(algos, tasks)  # before any heavy import: a typo fails fast with the valid names

    import torch

    from agents.benchmark import run_grid

    torch.set_num_threads(args.threads)
    settings = BenchmarkSettings(
        num_envs=args.num_envs, learning_rate=args.lr, samples_per_prompt=args.samples_per_prompt,
        kl_coef=args.kl_coef, reward=args.reward, eval_prompts=args.eval_prompts,
    )  # fmt: skip
    run_grid(algos, tasks, args.seeds, args.budget, args.out, settings)
    print((args.out / "results.md").read_text())
    print(f"results.md, results.csv, curves_<task>.png and frontier.png in {args.out}")
    return 0


# ------------------------------------------------------------------------------------------------ main
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_pretrain, add_sample, add_preferences, add_label, add_train_rm, add_build, add_rlhf, add_evaluate,
    add_benchmark,
]  # fmt: skip


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, except where it is None or False (a flag, or a value the command
    takes from the task or config, which the help text names)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="textenv", description="RLHF as a Gymnasium environment.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<subcommand>")
    for add in SUBCOMMANDS:
        add(sub)
    for subparser in sub.choices.values():
        subparser.formatter_class = DefaultsHelpFormatter
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``textenv`` command; returns the exit status.

    :param argv: arguments (default ``sys.argv[1:]``).
    """
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileExistsError, ImportError) as exc:  # ModelLoadError, PreferenceFormatError,
        # CorpusFormatError, bad arguments, a run or cache folder that is already there, a missing optional extra
        print(f"textenv {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
