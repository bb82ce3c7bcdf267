"""Offline tasks: seeded text worlds with a hidden gold reward (see `base.Task`).

``TASKS`` maps each task's name to its class so the CLI and the artefact builder can find a task by name;
env ids are registered with Gymnasium in ``textenv.registration``.
"""

from textenv.tasks.arithmetic import ArithmeticTask
from textenv.tasks.base import Task
from textenv.tasks.keywords import KeywordsTask
from textenv.tasks.reverse import ReverseTask
from textenv.tasks.sentiment import SentimentTask

TASKS: dict[str, type[Task]] = {
    SentimentTask.name: SentimentTask,
    ArithmeticTask.name: ArithmeticTask,
    KeywordsTask.name: KeywordsTask,
    ReverseTask.name: ReverseTask,
}


def get_task(name: str) -> Task:
    """A default-constructed task by name.

    :param name: a key of ``TASKS`` (``"sentiment"``, ``"arithmetic"``, ``"keywords"``, ``"reverse"``).
    :raises ValueError: the name is unknown; the message lists the valid names.
    """
    try:
        return TASKS[name]()
    except KeyError:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}") from None


__all__ = ["TASKS", "ArithmeticTask", "KeywordsTask", "ReverseTask", "SentimentTask", "Task", "get_task"]
