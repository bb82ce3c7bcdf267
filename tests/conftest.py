"""Shared fixtures: one artefact cache per test session, so each task's default LM and RM are built once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def task_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A temporary ``TEXTENV_HOME`` shared by the whole session (default models are built there on first use)."""
    home = tmp_path_factory.mktemp("textenv_home")
    patch = pytest.MonkeyPatch()
    patch.setenv("TEXTENV_HOME", str(home))
    yield home
    patch.undo()


@pytest.fixture(scope="session")
def sentiment_models(task_home: Path) -> tuple[Path, Path]:
    """``(lm_dir, rm_dir)`` of the sentiment task's default models (built once per session, about two minutes)."""
    from textenv.tasks.artifacts import task_models

    return task_models("sentiment", task_home)


@pytest.fixture(scope="session")
def arithmetic_models(task_home: Path) -> tuple[Path, Path]:
    """``(lm_dir, rm_dir)`` of the arithmetic task's default models."""
    from textenv.tasks.artifacts import task_models

    return task_models("arithmetic", task_home)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread() -> Iterator[None]:
    """Tiny models: one CPU thread is faster than several (and a shared 2-core machine is not oversubscribed)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
