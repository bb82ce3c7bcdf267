"""Envs for the built-in tasks: the task's pretrained LM as reference, its learned RM (or gold) as reward.

The models come from `textenv.tasks.artifacts.task_models`, which builds them offline on first use and
caches them under ``$TEXTENV_HOME``. The registered ids (``textenv/Sentiment-v0``, …) call these factories.
Tasks with a programmatic reward (``Task.learned_reward`` is ``False``: keywords, reverse) have no reward
model; their envs reward with the gold reward, which is then the task's own reward, not a hidden one.
"""

from __future__ import annotations

from typing import Any

from textenv.env import TextGenerationEnv
from textenv.models import load_causal_lm, load_reward_model, load_tokenizer
from textenv.rewards import CallableReward, RewardFunction, RewardModelScorer
from textenv.tasks import get_task
from textenv.vector_env import TextGenerationVectorEnv

REWARD_SOURCES = ("rm", "gold")


def default_reward_source(task_name: str) -> str:
    """``"rm"`` for a task with a learned reward model, ``"gold"`` for one with a programmatic reward."""
    return "rm" if get_task(task_name).learned_reward else "gold"


def task_reward(task_name: str, reward: str | None = "rm", home: str | None = None) -> RewardFunction:
    """The task's learned reward model (``"rm"``) or its hidden gold reward (``"gold"``, an oracle).

    :param reward: ``"rm"``, ``"gold"``, or ``None`` for the task's default (`default_reward_source`).
    :raises ValueError: an unknown source, or ``"rm"`` for a task with a programmatic reward (it has no RM).
    """
    from textenv.tasks.artifacts import task_models

    if reward is None:
        reward = default_reward_source(task_name)
    if reward not in REWARD_SOURCES:
        raise ValueError(f"reward must be one of {REWARD_SOURCES}, got {reward!r}")
    task = get_task(task_name)
    if reward == "rm" and not task.learned_reward:
        raise ValueError(f"task {task_name!r} has a programmatic reward and no reward model; use reward='gold'")
    if reward == "gold":
        return CallableReward(task.gold_reward, name=f"{task_name}_gold")
    _, rm_dir = task_models(task_name, home)
    assert rm_dir is not None  # learned_reward tasks always build an RM
    return RewardModelScorer(load_reward_model(rm_dir), load_tokenizer(rm_dir), join=task.join)


def make_task_env(
    task_name: str, num_envs: int | None = None, reward: str | None = None, home: str | None = None, **kwargs: Any
) -> TextGenerationEnv | TextGenerationVectorEnv:
    """A single env (``num_envs=None``) or vector env for a built-in task.

    :param task_name: a name in ``textenv.tasks.TASKS``.
    :param reward: ``"rm"`` (the learned reward model, the RLHF setting) or ``"gold"`` (the true reward);
        default: ``"rm"`` for tasks with a learned reward, ``"gold"`` for tasks with a programmatic one.
    :param home: artefact cache folder (default ``$TEXTENV_HOME`` or ``~/.cache/textenv``).
    :param kwargs: any `TextGenerationEnv` argument (``kl_coef``, ``max_new_tokens``, ``render_mode``, …).
    """
    from textenv.tasks.artifacts import task_models

    task = get_task(task_name)
    lm_dir, _ = task_models(task_name, home)
    params: dict[str, Any] = dict(
        model=load_causal_lm(lm_dir),
        tokenizer=load_tokenizer(lm_dir),
        reward_fn=task_reward(task_name, reward, home),
        prompts=task.prompts,
        max_prompt_tokens=task.max_prompt_tokens,
        max_new_tokens=task.max_new_tokens,
        join=task.join,
    )
    params.update(kwargs)
    if num_envs is None:
        return TextGenerationEnv(**params)
    return TextGenerationVectorEnv(num_envs=num_envs, **params)
