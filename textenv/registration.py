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

from functools import partial
from typing import Any

import gymnasium as gym
import torch


def _gpu_possible() -> bool:
    return torch.cuda.is_available()


def _toy_single(**kwargs: Any):
    from textenv.toy import make_toy_env

    return make_toy_env(None, **kwargs)


def _toy_vector(num_envs: int = 8, **kwargs: Any):
    from textenv.toy import make_toy_env

    return make_toy_env(num_envs, **kwargs)


def _task_single(task_name: str, default_reward: str, **kwargs: Any):
    from textenv.task_env import make_task_env

    return make_task_env(task_name, None, reward=kwargs.pop("reward", default_reward), **kwargs)


def _task_vector(task_name: str, default_reward: str, num_envs: int = 8, **kwargs: Any):
    from textenv.task_env import make_task_env

    return make_task_env(task_name, num_envs, reward=kwargs.pop("reward", default_reward), **kwargs)


#: env id -> (task name, default reward source)
TASK_IDS: dict[str, tuple[str, str]] = {
    "textenv/Sentiment-v0": ("sentiment", "rm"),
    "textenv/Arithmetic-v0": ("arithmetic", "rm"),
    "textenv/Keywords-v0": ("keywords", "gold"),
    "textenv/Reverse-v0": ("reverse", "gold"),
}


def register_envs() -> list[str]:
    """Register every textenv id (idempotent); returns the ids."""
    specs = {
        "textenv/Toy-v0": dict(
            entry_point=_toy_single, vector_entry_point=_toy_vector, nondeterministic=False
        ),
    }
    for env_id, (task_name, reward) in TASK_IDS.items():
        specs[env_id] = dict(
            entry_point=partial(_task_single, task_name, reward),
            vector_entry_point=partial(_task_vector, task_name, reward),
            nondeterministic=_gpu_possible(),
        )
    for env_id, spec in specs.items():
        if env_id not in gym.registry:
            gym.register(env_id, **spec)
    return list(specs)


ENV_IDS = register_envs()

# Ids whose env needs trained artefacts (an LM and an RM built on first use); tests build them once.
TRAINED_IDS: list[str] = list(TASK_IDS)
