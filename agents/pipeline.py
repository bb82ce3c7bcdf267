"""The main job: all three RLHF stages on an offline task, end to end, in one run folder.

1. **Language model**: pretrain a tiny LM on the task's corpus (or load the user's LM folder / hub name);
2. **Reward model**: sample K completions per prompt from the LM, have simulated annotators rank them by
   the hidden gold reward (or load the user's preference JSONL), train a Bradley–Terry RM (or load the
   user's RM);
3. **PPO**: a copy of the LM learns in `TextGenerationVectorEnv` against the RM minus the KL penalty.

Then the policy before and after PPO is evaluated on held-out prompts (gold reward, RM score, KL,
perplexity, distinct-n), printed as a table with sample texts, and saved as ``summary.json``. Each stage
reuses its artefact if the run folder already has it, so ``resume=True`` continues a killed run.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from agents.checkpoint import write_json_atomic
from agents.evaluation import EvalResult, evaluate_policy
from agents.ppo import PPOAgent, PPOConfig, cuda_bf16_autocast
from agents.run import TrainingRun
from agents.value_head import PolicyWithValueHead, check_lora_rank
from textenv.kl import AdaptiveKLController
from textenv.models import load_causal_lm, load_reward_model, load_tokenizer, same_vocabulary
from textenv.rewards import CallableReward, RewardFunction, RewardModelScorer
from textenv.static_decoding import DECODINGS
from textenv.tasks import get_task
from textenv.vector_env import TextGenerationVectorEnv


@dataclass
class RLHFConfig:
    """Settings of the main job. The defaults run on 2 CPU cores in a few minutes.

    Stages 1-2 use the task's default budget (``textenv.tasks.artifacts.DEFAULT_TASK_BUDGETS``).
    """

    task: str = "sentiment"
    """Built-in task name (see ``textenv.tasks.TASKS``)."""
    run_dir: str = "runs/rlhf"
    """Where every artefact goes."""
    seed: int = 0
    """Seeds every stage."""
    lm: str | None = None
    """Start from this LM (folder or hub name) instead of pretraining."""
    rm: str | None = None
    """Use this reward model (folder or hub name) instead of training one."""
    preferences: str | None = None
    """Train the RM on this preference JSONL instead of simulated labels."""
    iterations: int = 60
    """PPO iterations."""
    num_envs: int = 64
    """Episodes per PPO iteration (the batch)."""
    init_kl_coef: float = 0.05
    """Initial β."""
    target_kl: float = 4.0
    """Per-episode KL the adaptive controller aims for (nats)."""
    kl_horizon: int = 2000
    """Episodes for the adaptive controller to make a full correction."""
    decoding: str = "dynamic"
    """How the PPO rollouts decode: ``dynamic``, ``static`` or ``compiled`` (policy and reference LMs; with
    ``compiled`` the reward model's forward is compiled too). See `textenv.static_decoding`: compiling costs
    seconds up front and pays in long runs and on GPUs."""
    defer_kl: bool = False
    """PPO's rollouts compute the reference log-probs once per batch, with one forward over the finished
    sequences as TRL does, instead of one cached reference forward per token (`PPOConfig.defer_kl`): faster
    rollouts, the same rewards to float tolerance. A resumed run may change it."""
    device: str = "cpu"
    """Where every stage runs: ``cpu``, ``cuda`` or ``cuda:N``. The default tiny models run best on the CPU;
    a GPU pays for real LMs (``lm``). New models are built and seeded on the CPU, so a seed starts the same
    anywhere; after that the numbers follow the device's kernels."""
    bf16: bool = False
    """CUDA only: PPO's forwards run under bf16 autocast (the policy and value head keep float32 weights for
    AdamW) and the frozen reference LM and reward model are held in bf16, as TRL's PPO runs with ``bf16=True``
    (so the RM's scores carry bf16's 3 significant digits; its normalisation was measured in float32). With
    ``lora_r`` the LM's frozen base is bf16 too. Stages 1-2 train in float32. A run cannot change it on resume."""
    ppo: dict[str, Any] = field(default_factory=lambda: dict(learning_rate=2e-4, minibatch_size=16, micro_batch_size=16))
    """Extra `PPOConfig` fields."""
    lora_r: int = 0
    """If > 0, PPO trains LoRA adapters of this rank (peft: ``pip install -e ".[lora]"``) instead of every
    weight of the LM, so the gradients and Adam's moments cover only the adapters and the value head. The
    run's ``ppo/policy/`` then holds the LM with the adapters merged in, and ``ppo/policy_adapter/`` the
    adapters alone. LoRA usually wants a higher ``ppo.learning_rate`` than full fine-tuning."""
    lora_alpha: int = 16
    """LoRA's scaling numerator (the adapters' output is scaled by ``lora_alpha / lora_r``)."""
    lora_target_modules: list[str] | None = None
    """The modules to adapt (None: peft's defaults for the architecture, e.g. GPT-2's ``c_attn``)."""
    eval_prompts: int = 256
    """Held-out prompts for the before/after evaluation."""
    checkpoint_every: int = 5
    """PPO checkpoint interval (iterations)."""
    kl_bound: float = 15.0
    """The stated bound on the final mean per-sequence KL, checked in the summary."""
    stage_budget: dict[str, Any] = field(default_factory=dict)
    """Overrides of the task's stage 1-2 budget (`TaskBudget` fields; ``pretrain`` takes a dict of
    `PretrainBudget` fields), e.g. ``{"n_prompts": 200, "rm_steps": 50, "pretrain": {"steps": 100}}``."""


def stage_budget(cfg: RLHFConfig):
    """The task's default stage 1-2 budget with ``cfg.stage_budget`` applied (None: the default)."""
    import dataclasses

    from textenv.tasks.artifacts import DEFAULT_TASK_BUDGETS, TaskBudget

    if not cfg.stage_budget:
        return None
    base = DEFAULT_TASK_BUDGETS.get(cfg.task, TaskBudget())
    overrides = dict(cfg.stage_budget)
    try:
        if "pretrain" in overrides:
            overrides["pretrain"] = dataclasses.replace(base.pretrain, **overrides["pretrain"])
        return dataclasses.replace(base, **overrides)
    except TypeError as exc:
        valid = [f.name for f in dataclasses.fields(TaskBudget)]
        raise ValueError(f"invalid stage_budget {cfg.stage_budget}: {exc}; TaskBudget fields are {valid}") from exc


def _stages_1_2(
    cfg: RLHFConfig, run_dir: Path, device: torch.device, progress: bool, console: Console
) -> tuple[Path | str, Path | str | None]:
    """The LM and RM paths: the user's, or built into ``run_dir/models`` (reused when already there).

    Tasks with a programmatic reward (``Task.learned_reward`` false) have no stage 2: the RM path is None.
    """
    if cfg.rm is not None:
        if cfg.lm is None:
            raise ValueError("--rm needs --lm too: the reward model must be paired with the LM it judges")
        return cfg.lm, cfg.rm
    models = run_dir / "models"
    if not (models / "build.json").exists():
        from textenv.preferences import load_preferences
        from textenv.tasks.artifacts import build_task_models

        records = load_preferences(cfg.preferences) if cfg.preferences is not None else None
        console.print("[bold]Stages 1-2[/bold]: " + ("pretrained LM" if cfg.lm is None else f"LM {cfg.lm}") + ", "
                      + ("simulated preferences" if records is None else f"{len(records)} preference records")
                      + ", Bradley-Terry reward model")  # fmt: skip
        metrics = build_task_models(
            cfg.task, models, stage_budget(cfg), seed=cfg.seed, progress=progress, lm=cfg.lm, records=records,
            device=device,
        )
        console.print(json.dumps({k: v for k, v in metrics.items() if k != "budget"}, indent=1))
    built = json.loads((models / "build.json").read_text())
    rm_path = models / "rm" if (models / "rm" / "config.json").exists() else None
    return built.get("lm") or models / "lm", rm_path  # "lm": null when built into models/lm


RESUMABLE_CHANGES = ("run_dir", "iterations", "decoding", "defer_kl", "checkpoint_every", "device")
"""`RLHFConfig` fields a resumed run may change: more iterations, another decode path, KL timing or device (the
same computation, to float tolerance: a run started on a GPU without ``bf16`` can finish on the CPU), another
checkpoint interval. Any other change would mix the artefacts of two settings."""


def resolve_device(name: str, bf16: bool) -> torch.device:
    """``RLHFConfig.device`` as a torch device, refused up front (before stages 1-2 spend minutes) if this
    machine cannot run it, or if ``bf16`` asks for autocast where PPO has none."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {name!r} is not a torch device (cpu, cuda, cuda:1, ...): {exc}") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {name!r}: CUDA is not available to this torch {torch.__version__} (a CPU build, or no GPU "
                "visible); run on the CPU (--device cpu) or install a CUDA build of torch"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError(f"device {name!r}: textenv runs on cpu or cuda devices")
    if bf16 and device.type != "cuda":
        raise ValueError(
            "bf16 needs a CUDA device (--device cuda): PPO's bf16 autocast is CUDA-only, so on the CPU it would only "
            "round the frozen reference and reward model"
        )
    return device


def check_same_run(cfg: RLHFConfig, run_dir: Path) -> None:
    """Refuse to resume ``run_dir`` with settings other than those it was started with (its ``rlhf_config.json``):
    its built models, checkpoints and metrics would silently belong to the old ones."""
    path = run_dir / "rlhf_config.json"
    if not path.exists():
        return
    before, now = json.loads(path.read_text()), json.loads(json.dumps(asdict(cfg)))
    # A field the folder's file lacks was added to RLHFConfig after the run started: it ran with the default.
    defaults = json.loads(json.dumps(asdict(RLHFConfig())))
    before = {**{k: v for k, v in defaults.items() if k not in before}, **before}
    changed = sorted(k for k in now.keys() | before.keys() if k not in RESUMABLE_CHANGES and before.get(k) != now.get(k))
    if changed:
        diff = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise ValueError(
            f"{run_dir} was started with other settings ({diff}); resume it with its own, or start a new run folder"
        )


def run_rlhf(cfg: RLHFConfig, resume: bool = False, progress: bool = True, console: Console | None = None) -> dict[str, Any]:
    """Run the main job; returns (and writes to ``summary.json``) the before/after figures."""
    console = console or Console()
    if cfg.decoding not in DECODINGS:
        raise ValueError(f"decoding must be one of {DECODINGS}, got {cfg.decoding!r}")
    check_lora_rank(cfg.lora_r)
    for name in ("bf16", "defer_kl"):
        if not isinstance(getattr(cfg, name), bool):  # a config file's "false" is truthy
            raise ValueError(f"{name} must be true or false, got {getattr(cfg, name)!r}")
    if not isinstance(cfg.device, str):
        raise ValueError(f"device must be a string such as 'cpu' or 'cuda', got {cfg.device!r}")
    device = resolve_device(cfg.device, cfg.bf16)
    if "bf16" in cfg.ppo:
        raise ValueError("set bf16 as RLHFConfig.bf16 (--bf16), not among the ppo fields: it also sets the frozen models' dtype")
    if "defer_kl" in cfg.ppo:  # one place for it, so that --defer-kl and the run's rlhf_config.json say what ran
        raise ValueError("set defer_kl as RLHFConfig.defer_kl (--defer-kl), not among the ppo fields")
    ppo_config = PPOConfig(
        **{"total_iterations": cfg.iterations, "seed": cfg.seed, "decoding": cfg.decoding, "defer_kl": cfg.defer_kl,
           "bf16": cfg.bf16, **cfg.ppo}
    )  # fmt: skip
    if ppo_config.minibatch_size > cfg.num_envs:  # PPOAgent refuses it too, but only after stages 1-2 have run
        raise ValueError(
            f"num_envs {cfg.num_envs} is smaller than ppo.minibatch_size {ppo_config.minibatch_size}: pass a larger "
            "--num-envs, or a smaller minibatch_size (and micro_batch_size) in the config's ppo fields"
        )
    task = get_task(cfg.task)
    run_dir = Path(cfg.run_dir)
    if run_dir.exists() and any(run_dir.iterdir()) and not resume:
        raise FileExistsError(f"run folder {run_dir} is not empty: pass resume=True (--resume) or pick another")
    if resume:
        check_same_run(cfg, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "rlhf_config.json", asdict(cfg))
    torch.manual_seed(cfg.seed)

    lm_path, rm_path = _stages_1_2(cfg, run_dir, device, progress, console)

    # ---- stage 3: PPO against the RM, with the KL penalty to the frozen pretrained LM.
    console.print("[bold]Stage 3[/bold]: PPO" + ("" if device.type == "cpu" else f" on {device}") + (", bf16" if cfg.bf16 else ""))
    # The policy and the reference load separately, each in its own dtype and moved to the device as it loads
    # (no float32 deep copy: the host holds one of them at a time). Trained weights are float32 whatever the
    # folder's dtype (transformers loads a bf16 checkpoint as bf16, whose weights would round AdamW's updates
    # away); frozen ones, the reference, the RM and a LoRA base under bf16, need no float32 master weights.
    # Under LoRA the policy's frozen base *is* the reference's weights: one copy serves both.
    frozen_dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    tokenizer = load_tokenizer(lm_path)
    reference = load_causal_lm(lm_path, dtype=frozen_dtype, device=device)
    lm = reference if cfg.lora_r > 0 else load_causal_lm(lm_path, dtype=torch.float32, device=device)
    policy = PolicyWithValueHead(lm, cfg.lora_r, cfg.lora_alpha, cfg.lora_target_modules)
    if rm_path is None:  # programmatic reward: train on the task's own (verifiable) reward
        scorer: RewardFunction = CallableReward(task.gold_reward, name=f"{cfg.task}_reward")
    else:
        rm, rm_tokenizer = load_reward_model(rm_path, dtype=frozen_dtype, device=device), load_tokenizer(rm_path)
        if not same_vocabulary(tokenizer, rm_tokenizer):
            console.print("note: the reward model has its own tokenizer; completions are re-tokenised as text for it")
        scorer = RewardModelScorer(rm, rm_tokenizer, join=task.join, compile=cfg.decoding == "compiled")
    env = TextGenerationVectorEnv(
        reference, scorer, task.prompts, num_envs=cfg.num_envs, tokenizer=tokenizer,
        max_prompt_tokens=task.max_prompt_tokens, max_new_tokens=task.max_new_tokens,
        kl_coef=AdaptiveKLController(cfg.init_kl_coef, cfg.target_kl, cfg.kl_horizon), autoreset_mode="Disabled",
        join=task.join, decoding=ppo_config.decoding,
    )  # fmt: skip
    agent = PPOAgent(policy, env, ppo_config, gold_reward=task.gold_reward)
    heldout = task.prompts(np.random.default_rng([cfg.seed, 99]), cfg.eval_prompts)

    def evaluate(lm) -> EvalResult:
        with cuda_bf16_autocast(cfg.bf16, device.type):  # the policy as PPO's rollouts run it
            return evaluate_policy(
                lm, reference, tokenizer, scorer, heldout, task.max_prompt_tokens, task.max_new_tokens,
                gold_reward=task.gold_reward, seed=cfg.seed + 1, join=task.join,
            )  # fmt: skip

    run = TrainingRun(agent, run_dir / "ppo", cfg.checkpoint_every, evaluate, {"task": cfg.task, "lm": str(lm_path), "rm": str(rm_path)})
    run.train(cfg.iterations, resume=resume, progress=progress)  # (killed before its first checkpoint: starts over)
    before = json.loads((run_dir / "ppo" / "eval_before.json").read_text())
    after = json.loads((run_dir / "ppo" / "eval_after.json").read_text())
    summary = summarize(before, after, cfg)
    write_json_atomic(run_dir / "summary.json", summary)
    print_summary(summary, run_dir, console)
    return summary


def summarize(before: dict[str, Any], after: dict[str, Any], cfg: RLHFConfig) -> dict[str, Any]:
    """Before/after figures and the two claims the main job makes (gold improvement, KL bound)."""
    summary: dict[str, Any] = {"task": cfg.task, "before": before, "after": after, "kl_bound": cfg.kl_bound}
    if before.get("gold") is not None and after.get("gold") is not None:
        std = before["gold_std"] or 1.0
        summary["gold_improvement"] = after["gold"] - before["gold"]
        summary["gold_improvement_in_std"] = (after["gold"] - before["gold"]) / std
        summary["gold_improved_by_1_std"] = summary["gold_improvement_in_std"] >= 1.0
    summary["kl_within_bound"] = after["kl"] <= cfg.kl_bound
    return summary


def print_summary(summary: dict[str, Any], run_dir: Path, console: Console) -> None:
    """The before/after table and a few sample texts."""
    table = Table(title=f"RLHF on {summary['task']}: pretrained LM vs PPO policy (held-out prompts)")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for key in ("gold", "score", "kl", "perplexity", "distinct_1", "distinct_2", "length"):
        b, a = summary["before"].get(key), summary["after"].get(key)
        if b is not None:
            table.add_row(key, f"{b:.3f}", f"{a:.3f}")
    console.print(table)
    if "gold_improvement_in_std" in summary:
        console.print(
            f"gold reward improved by {summary['gold_improvement']:.3f} = "
            f"{summary['gold_improvement_in_std']:.2f} std of the pretrained LM's gold reward; "
            f"final KL {summary['after']['kl']:.2f} (bound {summary['kl_bound']})"
        )
    for when in ("before", "after"):
        path = run_dir / "ppo" / f"samples_{when}.jsonl"
        samples = [json.loads(line) for line in path.read_text().splitlines()[:3]]
        console.print(f"[bold]samples {when}[/bold]")
        for s in samples:
            console.print(f"  {s['prompt']} [cyan]{s['completion']}[/cyan]  (gold {s.get('gold', float('nan')):.2f})")
    console.print(f"run folder: {run_dir}")
