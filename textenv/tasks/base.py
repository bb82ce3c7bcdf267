"""What a task is: a world of text with a hidden gold reward.

A task bundles everything the three RLHF stages need, generated offline and seeded: a tokenizer, a corpus
to pretrain the LM on, a prompt distribution, and the *gold* reward: the "true human preference" that the
simulated annotators label with and that experiments measure, but that the agent never sees (it sees the
learned RM). Measuring gold reward next to the RM score is how you see reward hacking.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
from transformers import PreTrainedTokenizerBase


class Task(ABC):
    """A text world with a gold reward. Subclasses set the class attributes and implement the methods.

    :cvar name: short id used in env ids and folder names (``"sentiment"``).
    :cvar max_prompt_tokens: longest prompt the task produces, in tokens.
    :cvar max_new_tokens: default completion budget for the env.
    :cvar learned_reward: whether the task's default env scores with a reward model learned from
        (simulated) preferences. Tasks whose reward is programmatic (checkable by code, such as "are the
        keywords there") set it to ``False``: their default artefacts are the pretrained LM only, and
        their env ids reward with `gold_reward` directly.
    """

    name: str = "task"
    max_prompt_tokens: int = 16
    max_new_tokens: int = 16
    learned_reward: bool = True

    @abstractmethod
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The task's tokenizer (deterministic: the same ids every call)."""

    @abstractmethod
    def corpus(self, rng: np.random.Generator, n: int) -> list[str]:
        """``n`` pretraining documents (prompt and continuation as one text), drawn with ``rng``."""

    @abstractmethod
    def prompts(self, rng: np.random.Generator, n: int) -> list[str]:
        """``n`` prompts drawn with ``rng``."""

    @abstractmethod
    def gold_reward(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        """The hidden true reward of each (prompt, completion) pair, float64 of shape ``(len(prompts),)``."""

    def join(self, prompt: str, completion: str) -> str:
        """The full text a reward model scores: prompt and completion joined the way the task's text is.

        Word-level tasks separate them with one space (doubled spaces collapse); character-level tasks
        override this to plain concatenation.
        """
        return re.sub(r" {2,}", " ", f"{prompt} {completion}").strip()

    def describe(self) -> str:
        """One paragraph for docs and ``--help``: what the text looks like and what the gold reward rewards."""
        return (self.__doc__ or self.name).strip()
