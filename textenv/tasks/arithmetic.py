"""The arithmetic world: two-number addition with a verifiable reward.

RLHF with a *verifiable* reward (the answer is right or it is not) is the cleanest setting to test an RL
algorithm: the gold reward is exact, so any gap between the learned RM and the gold is the RM's fault, not
the annotators'. The pretraining corpus contains a fraction of deliberately wrong sums, so the pretrained
LM is right only part of the time and RL has something to fix.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from transformers import PreTrainedTokenizerBase

from textenv.models import build_word_tokenizer
from textenv.tasks.base import Task

_PROMPT = re.compile(r"^(\d+)\+(\d+)=$")


@lru_cache(maxsize=1)
def _tokenizer() -> PreTrainedTokenizerBase:
    return build_word_tokenizer(list("0123456789+="), split="chars")


class ArithmeticTask(Task):
    """Addition of two numbers below 100: prompt ``23+58=``, completion ``81`` then ``<eos>``.

    One token per character (digits, ``+``, ``=``). The gold reward is 1.0 when the completion is exactly
    the sum (no extra characters) and 0.0 otherwise. A fraction ``wrong_fraction`` (default 0.3) of the
    pretraining documents have a wrong answer (the sum plus or minus 1 to 10), so the pretrained LM is right
    only part of the time.
    """

    name = "arithmetic"
    max_prompt_tokens = 6
    max_new_tokens = 4

    def __init__(self, max_operand: int = 99, wrong_fraction: float = 0.3) -> None:
        """:param max_operand: operands are drawn uniformly from ``0..max_operand``.
        :param wrong_fraction: fraction of corpus documents with a wrong sum."""
        if max_operand < 1 or not 0.0 <= wrong_fraction < 1.0:
            raise ValueError("need max_operand >= 1 and 0 <= wrong_fraction < 1")
        self.max_operand = max_operand
        self.wrong_fraction = wrong_fraction

    def tokenizer(self) -> PreTrainedTokenizerBase:
        return _tokenizer()

    def join(self, prompt: str, completion: str) -> str:
        return prompt + completion

    def _operands(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.integers(0, self.max_operand + 1, size=(n, 2))

    def corpus(self, rng: np.random.Generator, n: int) -> list[str]:
        ops = self._operands(rng, n)
        sums = ops.sum(axis=1)
        wrong = rng.random(n) < self.wrong_fraction
        offsets = rng.integers(1, 11, size=n) * rng.choice([-1, 1], size=n)
        answers = np.where(wrong, np.abs(sums + offsets), sums)
        return [f"{a}+{b}={c}" for (a, b), c in zip(ops, answers, strict=True)]

    def prompts(self, rng: np.random.Generator, n: int) -> list[str]:
        return [f"{a}+{b}=" for a, b in self._operands(rng, n)]

    def gold_reward(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
        out = np.zeros(len(prompts))
        for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            match = _PROMPT.match(prompt.strip())
            if match is None:
                raise ValueError(f"not an arithmetic prompt: {prompt!r}")
            out[i] = float(completion.strip() == str(int(match[1]) + int(match[2])))
        return out
