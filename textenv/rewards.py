"""Reward functions: one interface for learned reward models, Python callables, rules and their sums.

The env calls a reward function once per step with every episode that finished in that step, so a neural
reward model runs one batched forward, not one per episode. Every reward function returns one finite
float per (prompt, completion); NaN or inf is a `RewardError` naming the function and the offending
row, never a silent reward.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from textenv.models import encode_truncating_left, position_limit


class RewardError(ValueError):
    """A reward function returned something that is not one finite float per episode."""


def join_text(prompt: str, completion: str) -> str:
    """How prompt and completion become one text for scoring: separated by a space (word-level tasks)."""
    if not completion:
        return prompt
    if not prompt:
        return completion
    return f"{prompt} {completion}"


class RewardFunction(ABC):
    """Scores finished episodes. Subclasses implement `score`; call the object to get validated scores."""

    name: str = "reward"

    @abstractmethod
    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray | Sequence[float]:
        """One score per (prompt, completion)."""

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        if len(prompts) != len(completions):
            raise RewardError(f"{self.name}: {len(prompts)} prompts but {len(completions)} completions")
        if not prompts:
            return np.zeros(0)
        raw = self.score(prompts, completions)
        if isinstance(raw, torch.Tensor):
            raw = raw.detach().float().cpu().numpy()
        scores = np.asarray(raw, dtype=np.float64).reshape(-1)
        if scores.shape != (len(prompts),):
            raise RewardError(
                f"reward function {self.name!r} returned {scores.size} scores for {len(prompts)} episodes"
            )
        bad = np.flatnonzero(~np.isfinite(scores))
        if len(bad):
            i = int(bad[0])
            raise RewardError(
                f"reward function {self.name!r} returned {scores[i]} (not finite) for completion "
                f"{completions[i]!r} of prompt {prompts[i]!r}"
            )
        return scores

    def __add__(self, other: RewardFunction) -> WeightedSum:
        return WeightedSum([(1.0, self)] + (other.terms if isinstance(other, WeightedSum) else [(1.0, other)]))

    def __rmul__(self, weight: float) -> WeightedSum:
        return WeightedSum([(float(weight), self)])


class CallableReward(RewardFunction):
    """A plain Python function over texts: ``fn(prompts, completions) -> scores``.

    :param per_example: if true, ``fn(prompt, completion) -> float`` is called once per episode instead.
    """

    def __init__(self, fn: Callable, name: str | None = None, per_example: bool = False) -> None:
        self.fn = fn
        self.per_example = per_example
        self.name = name or getattr(fn, "__name__", "callable")

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray | Sequence[float]:
        if self.per_example:
            return [float(self.fn(p, c)) for p, c in zip(prompts, completions, strict=True)]
        return self.fn(list(prompts), list(completions))


class WeightedSum(RewardFunction):
    """``Σ w_i · f_i``: combine a learned RM with rules (a length bonus, a format check, …)."""

    def __init__(self, terms: Sequence[tuple[float, RewardFunction]]) -> None:
        if not terms:
            raise ValueError("WeightedSum needs at least one (weight, reward) term")
        self.terms = list(terms)
        self.name = " + ".join(f"{w:g}*{f.name}" for w, f in self.terms)

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        return sum(w * f(prompts, completions) for w, f in self.terms)

    def __add__(self, other: RewardFunction) -> WeightedSum:
        extra = other.terms if isinstance(other, WeightedSum) else [(1.0, other)]
        return WeightedSum(self.terms + extra)

    def __rmul__(self, weight: float) -> WeightedSum:
        return WeightedSum([(weight * w, f) for w, f in self.terms])


# ---------------------------------------------------------------------------------------- rule-based
class KeywordReward(RewardFunction):
    """Fraction of the given keywords that appear as words in the completion (0 … 1)."""

    def __init__(self, keywords: Sequence[str]) -> None:
        if not keywords:
            raise ValueError("KeywordReward needs at least one keyword")
        self.keywords = [k.lower() for k in keywords]
        self.name = f"keywords({','.join(self.keywords)})"

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        words = [set(c.lower().split()) for c in completions]
        return [sum(k in w for k in self.keywords) / len(self.keywords) for w in words]


class LengthReward(RewardFunction):
    """``-|words - target| / target``: 0 at the target length in words, negative either side."""

    def __init__(self, target_words: int) -> None:
        if target_words <= 0:
            raise ValueError(f"target_words must be > 0, got {target_words}")
        self.target = target_words
        self.name = f"length({target_words})"

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        return [-abs(len(c.split()) - self.target) / self.target for c in completions]


class RepetitionPenalty(RewardFunction):
    """``-(fraction of repeated words)``: the classic reward-hacking signature, penalised."""

    name = "repetition"

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        out = []
        for c in completions:
            words = c.split()
            out.append(-(1 - len(set(words)) / len(words)) if words else 0.0)
        return out


class RegexReward(RewardFunction):
    """1 if the completion matches the pattern (``re.fullmatch`` when ``full``), else 0."""

    def __init__(self, pattern: str, full: bool = False) -> None:
        self.pattern = re.compile(pattern)
        self.full = full
        self.name = f"regex({pattern})"

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        match = self.pattern.fullmatch if self.full else self.pattern.search
        return [float(match(c) is not None) for c in completions]


# ---------------------------------------------------------------------------------------- learned
class RewardModelScorer(RewardFunction):
    """A Hugging Face sequence-classification reward model, scored at the last real token.

    The RM re-tokenises ``join(prompt, completion)`` with its own tokenizer, so it may use a different
    vocabulary from the policy. Padding is on the left and the score is read from the last position,
    which is the last real token whatever the padding.

    :param model: an ``AutoModelForSequenceClassification`` (e.g. from `load_reward_model`).
    :param tokenizer: the RM's tokenizer.
    :param label_index: which output logit is the reward (0 for a single-output RM; for a 2-class
        classifier, the "good" class).
    :param normalize: standardise with the mean/std stored on the RM's config (``textenv_reward_mean`` and
        ``textenv_reward_std``, written by textenv's RM training from reference samples), or with an
        explicit ``(mean, std)``; ``False`` returns raw logits.
    :param join: how prompt and completion become one text.
    :param batch_size: episodes per RM forward.
    :param max_length: longest input in RM tokens (truncated from the left, keeping the completion).
    :param compile: run the RM's forward through ``torch.compile`` with dynamic shapes (one compile, of
        about 10 s for a small model on a CPU, serves every batch size and length). Scoring the batch is
        then ~1.5x faster on a CPU; it pays in long runs and benchmarks, not in a short episode.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        label_index: int = 0,
        normalize: bool | tuple[float, float] = True,
        join: Callable[[str, str], str] = join_text,
        batch_size: int = 64,
        max_length: int | None = None,
        compile: bool = False,
    ) -> None:
        self.model = model.eval()
        # Shares the model's parameters; compiled on the first call. Dynamic shapes: the batches' lengths vary.
        self._forward = torch.compile(self.model, dynamic=True) if compile else self.model
        self.tokenizer = tokenizer
        self.label_index = label_index
        self.join = join
        self.batch_size = batch_size
        self.max_length = max_length or position_limit(model) or tokenizer.model_max_length
        self.name = f"reward_model({getattr(model.config, 'name_or_path', '') or type(model).__name__})"
        n_labels = int(getattr(model.config, "num_labels", 1))
        if not 0 <= label_index < n_labels:
            raise ValueError(
                f"label_index {label_index} out of range for a reward model with {n_labels} outputs"
            )
        if tokenizer.pad_token_id is None:
            raise ValueError("the reward model's tokenizer has no pad token; set tokenizer.pad_token first")
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        self.mean, self.std = 0.0, 1.0
        if normalize is True:
            self.mean = float(getattr(model.config, "textenv_reward_mean", 0.0))
            self.std = float(getattr(model.config, "textenv_reward_std", 1.0))
        elif isinstance(normalize, tuple):
            self.mean, self.std = map(float, normalize)
        if not self.std > 0:
            raise ValueError(f"reward normalisation std must be > 0, got {self.std}")

    @torch.no_grad()
    def raw_scores(self, texts: Sequence[str]) -> torch.Tensor:
        """Unnormalised RM outputs for whole texts, ``(N,)`` float32 on the CPU."""
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(texts), self.batch_size):
            chunk = list(texts[start : start + self.batch_size])
            enc = encode_truncating_left(
                self.tokenizer, chunk, return_tensors="pt", padding=True, max_length=self.max_length,
                padding_side="left",
            ).to(device)  # fmt: skip
            positions = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            logits = self._forward(**enc, position_ids=positions).logits
            out.append(logits[:, self.label_index].float().cpu())
        return torch.cat(out)

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        texts = [self.join(p, c) for p, c in zip(prompts, completions, strict=True)]
        return (self.raw_scores(texts) - self.mean) / self.std
