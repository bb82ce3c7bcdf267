"""Where prompts come from: a list of strings, a text/JSONL file, or a task's generator; seeded sampling.

Prompts are tokenised once, checked (an empty prompt is an error; a prompt longer than the env's limit is
truncated from the left, keeping its end, which is what the model continues, or rejected, as configured)
and sampled with the env's own `np.random.Generator`, so the same seed gives the same prompts.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

OVERFLOW_MODES = ("truncate_left", "error")


class PromptError(ValueError):
    """A prompt is empty, too long (with ``overflow="error"``), or a prompt file is malformed."""


@dataclass(frozen=True)
class Prompt:
    """A prompt as text and as the token ids the env feeds the models (after any truncation)."""

    text: str
    ids: torch.Tensor


def read_prompt_file(path: str | Path) -> list[str]:
    """Read prompts from a ``.txt`` file (one per non-empty line) or ``.jsonl`` (``{"prompt": ...}`` a line)."""
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"prompt file {str(path)!r} does not exist")
    prompts: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise PromptError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from exc
                if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                    raise PromptError(f'{path}:{line_no}: expected an object with a string field "prompt"')
                prompts.append(record["prompt"])
            else:
                prompts.append(line.rstrip("\n"))
    if not prompts:
        raise PromptError(f"prompt file {str(path)!r} holds no prompts")
    return prompts


class PromptSource:
    """Seeded prompts for an env.

    :param prompts: a list of strings, a path to a ``.txt``/``.jsonl`` file, or a generator
        ``fn(rng, n) -> list[str]`` (a task's ``prompts`` method).
    :param tokenizer: tokenises prompts into the policy's ids.
    :param max_prompt_tokens: the longest prompt the env accepts, in tokens.
    :param overflow: ``"truncate_left"`` keeps the last ``max_prompt_tokens`` tokens; ``"error"`` rejects.
    """

    def __init__(
        self,
        prompts: Sequence[str] | str | Path | Callable[[np.random.Generator, int], list[str]],
        tokenizer: PreTrainedTokenizerBase,
        max_prompt_tokens: int,
        overflow: str = "truncate_left",
    ) -> None:
        if overflow not in OVERFLOW_MODES:
            raise ValueError(f"overflow must be one of {OVERFLOW_MODES}, got {overflow!r}")
        if max_prompt_tokens <= 0:
            raise ValueError(f"max_prompt_tokens must be > 0, got {max_prompt_tokens}")
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.overflow = overflow
        self.generator: Callable[[np.random.Generator, int], list[str]] | None = None
        self.fixed: list[Prompt] = []
        if callable(prompts):
            self.generator = prompts
        else:
            texts = read_prompt_file(prompts) if isinstance(prompts, (str, Path)) else list(prompts)
            if not texts:
                raise PromptError("the prompt list is empty")
            self.fixed = [self.encode(t) for t in texts]

    def encode(self, text: str) -> Prompt:
        """Tokenise and check one prompt."""
        if not isinstance(text, str):
            raise PromptError(f"a prompt must be a string, got {type(text).__name__}")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not text.strip() or not ids:
            raise PromptError(f"empty prompt {text!r}: a prompt needs at least one token")
        if len(ids) > self.max_prompt_tokens:
            if self.overflow == "error":
                raise PromptError(
                    f"prompt of {len(ids)} tokens is longer than max_prompt_tokens={self.max_prompt_tokens}: {text!r}"
                )
            ids = ids[-self.max_prompt_tokens :]
            text = self.tokenizer.decode(ids)
        return Prompt(text, torch.tensor(ids, dtype=torch.long))

    def sample(self, rng: np.random.Generator, n: int = 1) -> list[Prompt]:
        """Draw ``n`` prompts with ``rng`` (uniformly from a fixed list, or from the generator)."""
        if self.generator is not None:
            return [self.encode(t) for t in self.generator(rng, n)]
        return [self.fixed[int(i)] for i in rng.integers(len(self.fixed), size=n)]
