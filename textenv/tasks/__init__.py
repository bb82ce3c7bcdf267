"""Offline tasks: seeded text worlds with a hidden gold reward (see `base.Task`)."""

from textenv.tasks.base import Task

__all__ = ["Task"]
