"""The default pretrained LM and reward model of each task, built on first use and cached on disk.

An env id such as ``textenv/Sentiment-v0`` needs a real LM and a real RM, and there is no network to
download them from, so the first use runs the stage 1 and 2 pipeline with the task's default budget
(pretrain the LM, sample completions, label them with simulated annotators, train the RM) and caches the
two folders under ``$TEXTENV_HOME/<task>/{lm,rm}`` (default ``~/.cache/textenv``). The whole task folder is
built in a temporary folder beside it and moved into place with one ``os.replace``, so a crash or a
concurrent build never leaves a half-written model behind. ``build.json`` next to them records the
measured numbers (perplexity, annotator agreement, RM accuracy, times).

Tasks whose reward is programmatic (``Task.learned_reward`` is ``False``: keywords, reverse) have nothing to
learn a reward model for, so their build is stage 1 only: ``task_models`` returns ``(lm_dir, None)`` and
``build.json`` records the LM's measured gold reward on sampled completions.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from textenv.models import load_causal_lm, load_tokenizer
from textenv.preferences import (
    PreferenceRecord,
    SimulatedAnnotators,
    make_samples,
    sample_completions,
    write_records,
)
from textenv.pretraining import DEFAULT_BUDGETS, PretrainBudget, pretrain_task_lm
from textenv.reward_model_training import train_reward_model
from textenv.tasks import Task, get_task

if TYPE_CHECKING:
    import torch

BUILD_FILE = "build.json"


@dataclass(frozen=True)
class TaskBudget:
    """The default budget of the stage 1 + 2 pipeline for one task.

    :ivar pretrain: stage 1 (corpus size, LM size, steps).
    :ivar n_prompts: prompts to sample completions for in stage 2.
    :ivar k: completions per prompt (each simulated label is a full ranking of ``k``).
    :ivar annotators: keyword arguments of `SimulatedAnnotators`.
    :ivar rm_steps: RM optimiser steps of ``rm_batch_size`` records each.
    :ivar rm_lr: the RM's AdamW learning rate (linear decay to 10%).
    """

    pretrain: PretrainBudget = field(default_factory=PretrainBudget)
    n_prompts: int = 2000
    k: int = 4
    # Choice noise 0.4 puts the simulated annotators' agreement with the gold reward near 0.81 on sentiment:
    # noisy like real labellers (InstructGPT reports 73-77% labeller-labeller agreement), not an oracle.
    annotators: dict[str, Any] = field(default_factory=lambda: dict(n_annotators=5, temperature=0.4, disagreement=0.15))
    rm_steps: int = 600
    rm_batch_size: int = 16
    rm_lr: float = 2e-3


DEFAULT_TASK_BUDGETS: dict[str, TaskBudget] = {
    # rm_lr 1e-3, not the 2e-3 default: over five RM seeds on two builds' preferences (a 2-core Intel Xeon) the RM
    # came 4.7 points below the annotators' gold agreement on average instead of 6.5. Batches of 32 records, not
    # 16: on an AMD EPYC's one-thread build the gap was 5.5 / 3.5 / 4.6 points for RM seeds 0 / 1 / 2 with 16,
    # 3.4 / 3.2 / 3.8 with 32 (twice the RM's compute; 750 steps of 32 gave 5.4 / 3.3 / 4.0). docs/stages.md.
    "sentiment": TaskBudget(
        pretrain=DEFAULT_BUDGETS["sentiment"], n_prompts=8000, k=4, rm_steps=1500, rm_batch_size=32, rm_lr=1e-3
    ),
    "arithmetic": TaskBudget(pretrain=DEFAULT_BUDGETS["arithmetic"], n_prompts=2000, k=4, rm_steps=600),
    # programmatic rewards: stage 1 only; n_prompts x k samples measure the LM's gold reward for build.json
    "keywords": TaskBudget(pretrain=DEFAULT_BUDGETS["keywords"], n_prompts=500, k=1),
    "reverse": TaskBudget(pretrain=DEFAULT_BUDGETS["reverse"], n_prompts=500, k=1),
}  # fmt: skip


def textenv_home(home: str | Path | None = None) -> Path:
    """The artefact cache: ``home`` if given, else ``$TEXTENV_HOME``, else ``~/.cache/textenv``."""
    if home is not None:
        return Path(home).expanduser()
    return Path(os.environ.get("TEXTENV_HOME") or Path.home() / ".cache" / "textenv").expanduser()


def _complete(folder: Path, task: Task) -> bool:
    subs = ("lm", "rm") if task.learned_reward else ("lm",)
    return all((folder / sub / "config.json").is_file() for sub in subs) and (folder / BUILD_FILE).is_file()


def build_task_models(
    task_name: str,
    out_dir: str | Path,
    budget: TaskBudget | None = None,
    seed: int = 0,
    progress: bool = False,
    lm: str | Path | None = None,
    records: Sequence[PreferenceRecord] | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Run stage 1 and stage 2 for a task into ``out_dir/{lm,rm}`` (not atomic; see `task_models`).

    Also writes ``out_dir/preferences.jsonl`` (the labels used) and ``out_dir/build.json``. For a task with a
    programmatic reward (``task.learned_reward`` is ``False``) only stage 1 runs: ``out_dir/lm`` and
    ``build.json``, whose ``lm_mean_gold_reward`` is measured on ``n_prompts × k`` sampled completions.

    :param task_name: a name in ``textenv.tasks.TASKS``.
    :param budget: default ``DEFAULT_TASK_BUDGETS[task_name]``.
    :param lm: start from this LM (folder or hub name) instead of pretraining one (stage 1 skipped).
    :param records: train the RM on these preference records instead of simulated labels.
    :param device: where the LM trains and samples and the RM trains (default: the CPU).
    :returns: the measured numbers (also in ``build.json``).
    :raises ValueError: ``records`` given for a task without a learned reward.
    """
    task = get_task(task_name)
    if records is not None and not task.learned_reward:
        raise ValueError(f"task {task_name!r} has a programmatic reward; there is no reward model to train on records")
    budget = budget or DEFAULT_TASK_BUDGETS.get(task_name, TaskBudget())
    out_dir = Path(out_dir)
    started = time.perf_counter()
    lm_metrics: dict[str, Any] = {}
    if lm is None:
        lm_result = pretrain_task_lm(
            task, budget.pretrain, seed=seed, out_dir=out_dir / "lm", progress=progress, device=device
        )
        lm_metrics = {"lm_perplexity": lm_result.perplexity, "uniform_perplexity": lm_result.uniform_perplexity}
        del lm_result  # and its model: stage 2 loads the LM from the folder it was saved in
        lm = out_dir / "lm"
    t_lm = time.perf_counter() - started
    tokenizer = load_tokenizer(lm)
    # build.json's "lm": null when stage 1 built it into lm/ beside the file (which may move, as a finished
    # cache build does), else the user's LM as an absolute path (resumable from any folder) or a hub name.
    source = None if lm == out_dir / "lm" else str(Path(lm).resolve()) if Path(lm).exists() else str(lm)
    if not task.learned_reward:
        model = load_causal_lm(lm, device=device)
        return _write_lm_only_metrics(task, model, tokenizer, budget, seed, out_dir, source, lm_metrics, started, t_lm, progress)
    if records is None:
        prompts = task.prompts(np.random.default_rng([seed, 5]), budget.n_prompts)
        model = load_causal_lm(lm, device=device)
        completions = sample_completions(model, tokenizer, prompts, budget.k, task.max_new_tokens, seed=seed, progress=progress)
        del model  # the RM trains next, from the LM's folder: no copy of the LM left beside it and its optimizer
        annotators = SimulatedAnnotators(task, seed=seed, **budget.annotators)
        records = annotators.label(make_samples(prompts, completions, id_prefix=task_name), progress=progress)
    write_records(records, out_dir / "preferences.jsonl")
    t_pref = time.perf_counter() - started - t_lm
    prompts = [r.prompt for r in records for _ in r.completions]
    gold = task.gold_reward(prompts, [c for r in records for c in r.completions])
    rm_result = train_reward_model(
        records, tokenizer, task=task, init_from=lm, steps=budget.rm_steps, batch_size=budget.rm_batch_size,
        lr=budget.rm_lr, seed=seed, out_dir=out_dir / "rm", progress=progress, device=device,
    )  # fmt: skip
    t_rm = time.perf_counter() - started - t_lm - t_pref
    metrics = {
        "task": task_name,
        "seed": seed,
        "lm": source,
        **lm_metrics,
        "lm_mean_gold_reward": float(gold.mean()),
        "rm_heldout_accuracy": rm_result.heldout_accuracy,
        "rm_heldout_accuracy_all_pairs": rm_result.heldout_accuracy_all,
        "annotator_gold_agreement": rm_result.annotator_gold_agreement,
        "rm_gold_agreement": rm_result.rm_gold_agreement,
        "rm_mean": rm_result.mean,
        "rm_std": rm_result.std,
        "seconds_lm": t_lm,
        "seconds_preferences": t_pref,
        "seconds_rm": t_rm,
        "seconds_total": time.perf_counter() - started,
        "budget": asdict(budget),
    }
    (out_dir / BUILD_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _write_lm_only_metrics(
    task: Task, model: Any, tokenizer: Any, budget: TaskBudget, seed: int, out_dir: Path, lm: str | None,
    lm_metrics: dict[str, Any], started: float, t_lm: float, progress: bool,
) -> dict[str, Any]:  # fmt: skip
    """``build.json`` of a stage-1-only build: the LM's gold reward on sampled completions, and times."""
    prompts = task.prompts(np.random.default_rng([seed, 5]), budget.n_prompts)
    completions = sample_completions(model, tokenizer, prompts, budget.k, task.max_new_tokens, seed=seed, progress=progress)
    gold = task.gold_reward([p for p in prompts for _ in range(budget.k)], [c for cs in completions for c in cs])
    metrics = {
        "task": task.name,
        "seed": seed,
        "lm": lm,
        **lm_metrics,
        "lm_mean_gold_reward": float(gold.mean()),
        "lm_std_gold_reward": float(gold.std()),
        "lm_fraction_max_gold_reward": float((gold >= 1.0).mean()),
        "seconds_lm": t_lm,
        "seconds_total": time.perf_counter() - started,
        "budget": asdict(budget),
    }
    (out_dir / BUILD_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def task_models(task_name: str, home: str | Path | None = None, progress: bool = False) -> tuple[Path, Path | None]:
    """``(lm_dir, rm_dir)`` of a task's default LM and RM, building them on first use (atomically).

    ``rm_dir`` is ``None`` for a task with a programmatic reward (``Task.learned_reward`` is ``False``): its
    build is the LM only.

    :param task_name: a name in ``textenv.tasks.TASKS``.
    :param home: the cache folder (default ``$TEXTENV_HOME`` or ``~/.cache/textenv``).
    :param progress: show progress bars while building.
    """
    task = get_task(task_name)  # unknown names fail before any work
    home = textenv_home(home)
    target = home / task_name
    if not _complete(target, task):
        if target.exists():
            raise FileExistsError(f"{target} exists but is not a complete textenv build; remove it to rebuild")
        home.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{task_name}-building-", dir=home))
        try:
            build_task_models(task_name, tmp, progress=progress)
            try:
                os.replace(tmp, target)
            except OSError:
                if not _complete(target, task):  # not another process winning the race: a real error
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target / "lm", (target / "rm" if task.learned_reward else None)


def task_build_metrics(task_name: str, home: str | Path | None = None) -> dict[str, Any]:
    """The numbers measured when the task's default models were built (``build.json``)."""
    lm_dir, _ = task_models(task_name, home)
    return json.loads((lm_dir.parent / BUILD_FILE).read_text())
