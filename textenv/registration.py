"""Gymnasium registration of textenv's environments (``import textenv`` runs it).

Each id has a single-env ``entry_point`` and a ``vector_entry_point``, so both
``gym.make("textenv/Toy-v0")`` and ``gym.make_vec("textenv/Toy-v0", num_envs=8,
vectorization_mode="vector_entry_point")`` work. Envs whose reward model may run on a GPU declare
``nondeterministic`` when CUDA is present: GPU kernels do not promise bit-identical results across runs.

The task ids build their task's default models on first use (`textenv.tasks.artifacts.task_models`).
Sentiment and Arithmetic reward with the learned RM (the RLHF setting); Keywords and Reverse, whose
reward is programmatic, reward with it directly (``reward="gold"``). ``gym.make(id, reward="gold")``
overrides the source on any task id.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import torch


def _gpu_possible() -> bool:
    return torch.cuda.is_available()


def _check_time_limit(env: Any, max_episode_steps: int | None) -> Any:
    """A ``max_episode_steps`` that gymnasium's ``make_vec`` hands the vector entry point (as its own vector
    envs take it): accepted when the token budget already ends every episode by then, else refused. The vector
    env ends an episode at ``max_new_tokens`` as a scored termination; truncating earlier would leave episodes
    unscored, which only a TimeLimit over single envs (``vectorization_mode="sync"``) means to do."""
    budget = env.engine.max_new_tokens
    if max_episode_steps is not None and max_episode_steps < budget:
        env.close()
        raise ValueError(
            f"max_episode_steps={max_episode_steps} is shorter than the episodes' token budget max_new_tokens="
            f"{budget}: pass max_new_tokens={max_episode_steps} (episodes end there and are scored), or "
            "vectorization_mode='sync' for gymnasium's TimeLimit truncation (unscored)"
        )
    return env


def make_toy_single(**kwargs: Any):
    """``gym.make("textenv/Toy-v0")``: `textenv.toy.make_toy_env` as a single env."""
    from textenv.toy import make_toy_env

    return make_toy_env(None, **kwargs)


def make_toy_vector(num_envs: int = 8, max_episode_steps: int | None = None, **kwargs: Any):
    """``gym.make_vec("textenv/Toy-v0", num_envs)`` in ``vector_entry_point`` mode."""
    from textenv.toy import make_toy_env

    return _check_time_limit(make_toy_env(num_envs, **kwargs), max_episode_steps)


def make_task_single(task: str, reward: str, **kwargs: Any):
    """``gym.make("textenv/<Task>-v0")``: the task's env with its default models (built on first use)."""
    from textenv.task_env import make_task_env

    return make_task_env(task, None, reward=reward, **kwargs)


def make_task_vector(task: str, reward: str, num_envs: int = 8, max_episode_steps: int | None = None, **kwargs: Any):
    """``gym.make_vec("textenv/<Task>-v0", num_envs)`` in ``vector_entry_point`` mode."""
    from textenv.task_env import make_task_env

    return _check_time_limit(make_task_env(task, num_envs, reward=reward, **kwargs), max_episode_steps)


#: env id -> (task name, default reward source)
TASK_IDS: dict[str, tuple[str, str]] = {
    "textenv/Sentiment-v0": ("sentiment", "rm"),
    "textenv/Arithmetic-v0": ("arithmetic", "rm"),
    "textenv/Keywords-v0": ("keywords", "gold"),
    "textenv/Reverse-v0": ("reverse", "gold"),
}


def register_envs() -> list[str]:
    """Register every textenv id (idempotent); returns the ids.

    Entry points are ``"module:function"`` strings and the task and reward source are the spec's kwargs, so a
    spec serialises (``env.spec.to_json()``, as dataset tools such as Minari store it) and ``gym.make(id,
    reward="gold")`` overrides the reward source like any other kwarg.
    """
    here = __name__
    specs: dict[str, dict[str, Any]] = {
        "textenv/Toy-v0": dict(
            entry_point=f"{here}:make_toy_single", vector_entry_point=f"{here}:make_toy_vector", nondeterministic=False
        ),
    }
    for env_id, (task, reward) in TASK_IDS.items():
        specs[env_id] = dict(
            entry_point=f"{here}:make_task_single",
            vector_entry_point=f"{here}:make_task_vector",
            kwargs={"task": task, "reward": reward},
            nondeterministic=_gpu_possible(),
        )
    for env_id, spec in specs.items():
        if env_id not in gym.registry:
            gym.register(env_id, **spec)
    return list(specs)


ENV_IDS = register_envs()

# Ids whose env needs trained artefacts (an LM and an RM built on first use); tests build them once.
TRAINED_IDS: list[str] = list(TASK_IDS)
