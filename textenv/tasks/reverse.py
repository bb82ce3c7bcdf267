"""The reverse world: write a short string of letters backwards, with partial credit per position.

Sequence transduction with a *programmatic* reward, the classic algorithmic RL-for-text benchmark (copy
and reverse tasks go back to Zaremba & Sutskever 2015, "Reinforcement Learning Neural Turing Machines").
Unlike arithmetic's all-or-nothing answer, every position counts, so the reward is dense enough that
credit assignment over a whole sequence is visible: a policy that gets the first letters right already
earns something.

The pretraining corpus contains a fraction of wrong answers (the string copied instead of reversed, or one
or two letters replaced), so the pretrained LM is right only part of the time and RL has something to fix.
The reward is checkable by code, so no reward model is learned: the env rewards with the gold reward.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from transformers import PreTrainedTokenizerBase

from textenv.models import build_word_tokenizer
from textenv.tasks.base import Task

LETTERS = "abcdefgh"
SEPARATOR = "="
_PROMPT = re.compile(rf"^([{LETTERS}]+){SEPARATOR}$")


@lru_cache(maxsize=1)
def _tokenizer() -> PreTrainedTokenizerBase:
    return build_word_tokenizer([*LETTERS, SEPARATOR], split="chars")


def reverse_reward(source: str, completion: str) -> float:
    """Positions of ``completion`` that match ``source`` reversed, over the longer of the two lengths.

    So the exact answer scores 1.0, a missing or an extra letter costs like a wrong one, and the empty
    completion scores 0.0.

    :param source: the letters to reverse (``abcd``).
    :param completion: the generated text (surrounding whitespace ignored).
    """
    target, completion = source[::-1], completion.strip()
    correct = sum(a == b for a, b in zip(target, completion, strict=False))
    return correct / max(len(target), len(completion))


class ReverseTask(Task):
    """Reverse a string of 3 to 6 letters: prompt ``abcd=``, completion ``dcba`` then ``<eos>``.

    ## Description

    One token per character: the letters ``a``–``h`` and ``=``; ``<pad>`` = 0, ``<eos>`` = 1, ``<unk>`` = 2.
    The prompt is the source string followed by ``=``; the completion is the source reversed.

    ## Action Space

    ``Discrete(V)``: one token id per step, ``V`` the LM head's output size (12 tokenizer ids plus the
    model's padding rows, if any).

    ## Observation Space

    ``Dict(input_ids=Box(int64, (L,)), attention_mask=Box(int64, (L,)))`` with
    ``L = max_prompt_tokens + max_new_tokens = 7 + 8``: the left-padded prompt and the generated tokens.

    ## Rewards

    The gold reward is programmatic, in [0, 1]: the number of positions where the completion matches the
    reversed source, divided by the longer of the two lengths (``dcb`` for ``abcd=`` scores 0.75,
    ``dcbaa`` 0.8, the exact ``dcba`` 1.0). In the env the score arrives at the last step, and every step
    carries ``-β·KL`` against the pretrained LM.

    ## Starting State

    A prompt from `prompts`: the length is uniform in ``min_length..max_length`` and the letters are
    uniform (repeats allowed).

    ## Episode End

    ``<eos>`` or ``max_new_tokens`` (8) generated tokens: both terminal.

    ## Arguments

    ``min_length`` (3), ``max_length`` (6) and ``wrong_fraction`` (0.4): the fraction of corpus documents
    with a wrong answer (half of them the source copied unreversed, half with one or two letters replaced).
    ``gym.make("textenv/Reverse-v0")`` takes any ``TextGenerationEnv`` keyword argument.

    ## Version History

    * v0: initial version.
    """

    name = "reverse"
    max_prompt_tokens = 7
    max_new_tokens = 8
    learned_reward = False

    def __init__(self, min_length: int = 3, max_length: int = 6, wrong_fraction: float = 0.4) -> None:
        """:param min_length: shortest source string.
        :param max_length: longest source string (at most 6, so prompts fit ``max_prompt_tokens``).
        :param wrong_fraction: fraction of corpus documents with a wrong answer."""
        if not 1 <= min_length <= max_length <= self.max_prompt_tokens - 1 or not 0.0 <= wrong_fraction < 1.0:
            raise ValueError(
                f"need 1 <= min_length <= max_length <= {self.max_prompt_tokens - 1} and 0 <= wrong_fraction < 1"
            )
        self.min_length = min_length
        self.max_length = max_length
        self.wrong_fraction = wrong_fraction

    def tokenizer(self) -> PreTrainedTokenizerBase:
        return _tokenizer()

    def join(self, prompt: str, completion: str) -> str:
        return prompt + completion

    def _source(self, rng: np.random.Generator) -> str:
        length = int(rng.integers(self.min_length, self.max_length + 1))
        return "".join(LETTERS[int(i)] for i in rng.integers(len(LETTERS), size=length))

    def _answer(self, rng: np.random.Generator, source: str) -> str:
        if rng.random() >= self.wrong_fraction:
            return source[::-1]
        if rng.random() < 0.5:
            return source  # the classic mistake: copied, not reversed
        answer = list(source[::-1])
        for pos in rng.choice(len(answer), size=min(len(answer), int(rng.integers(1, 3))), replace=False):
            answer[int(pos)] = LETTERS[int(rng.integers(len(LETTERS)))]
        return "".join(answer)

    def corpus(self, rng: np.random.Generator, n: int) -> list[str]:
        docs = []
        for _ in range(n):
            source = self._source(rng)
            docs.append(f"{source}{SEPARATOR}{self._answer(rng, source)}")
        return docs

    def prompts(self, rng: np.random.Generator, n: int) -> list[str]:
        return [f"{self._source(rng)}{SEPARATOR}" for _ in range(n)]

    def gold_reward(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
        out = np.zeros(len(prompts), dtype=np.float64)
        for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            match = _PROMPT.match(prompt.strip())
            if match is None:
                raise ValueError(f"not a reverse prompt: {prompt!r} (expected letters {LETTERS!r} then '=')")
            out[i] = reverse_reward(match[1], completion)
        return out
