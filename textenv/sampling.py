"""The distribution an agent actually samples tokens from: temperature, top-k and top-p.

PPO's ratio and the KL penalty must use the log-probs of the distribution that produced the token. If the
agent samples with top-k but scores with the plain softmax, the estimated KL can go negative and the PPO
ratio is biased (a known TRL failure). Every sampler in textenv goes through `SamplingConfig.logprobs`, so
the log-probs used downstream are always those of the sampling distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from textenv.host_transfer import to_device


@dataclass(frozen=True)
class SamplingConfig:
    """How the policy's logits become a sampling distribution.

    :param temperature: logits are divided by it (> 0).
    :param top_k: keep only the k most likely tokens (0 = all).
    :param top_p: keep the smallest set of most likely tokens whose mass reaches top_p (1.0 = all).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def is_plain(self) -> bool:
        """True when the sampling distribution is the model's softmax itself."""
        return self.temperature == 1.0 and self.top_k == 0 and self.top_p == 1.0

    def truncates(self, vocab: int) -> bool:
        """Whether `logprobs` masks any token out of a vocabulary of this size (top-k below it, or top-p)."""
        return 0 < self.top_k < vocab or self.top_p < 1.0

    def logprobs(self, logits: torch.Tensor, kept: torch.Tensor | None = None) -> torch.Tensor:
        """Log-probs ``(..., V)`` of the sampling distribution; tokens filtered out get ``-inf``.

        :param kept: the truncated set, if already known (bool, like ``logits``): a backward that recomputes
            a forward's distribution masks with it instead of sorting again for top-k / top-p.
        """
        logits = logits.float() if self.temperature == 1.0 else logits.float() / self.temperature
        if kept is not None:
            return torch.log_softmax(logits.masked_fill(~kept, float("-inf")), dim=-1)
        if self.top_k and self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            probs = sorted_logits.softmax(-1)
            # Drop a token when the mass strictly before it already reaches top_p (keeps at least one).
            drop_sorted = probs.cumsum(-1) - probs >= self.top_p
            drop = drop_sorted.scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        return torch.log_softmax(logits, dim=-1)


def first_above_with_mass(cdf: torch.Tensor, mass: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row, the first index ``(B, 1)`` whose ``cdf`` exceeds ``target`` and whose ``mass`` is > 0.

    What a binary search for ``target`` finds when the cumulative sum is exact: a sum that adds a zero
    unchanged rises only at entries with mass. A GPU's cumulative sum is a parallel scan that may sum two
    neighbouring prefixes in different orders, so it can rise (or dip) by one ulp at an entry of mass 0,
    and a target in that gap would pick it. Requiring mass makes the pick depend only on where the sum
    crosses the target. If no entry qualifies (the target at or past the last rise, after rounding), the
    last entry with mass; in a row with no mass at all (all 0 or NaN), the last entry.
    """
    n = cdf.shape[-1]
    index = torch.arange(n, device=cdf.device)
    has_mass = mass > 0
    first = torch.where((cdf > target) & has_mass, index, n).amin(-1, keepdim=True)
    last_with_mass = torch.where(has_mass, index, -1).amax(-1, keepdim=True)
    return torch.where(first < n, first, torch.where(last_with_mass >= 0, last_with_mass, n - 1))


def flat_where_no_mass(cdf: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """``cdf`` with each entry of ``mass`` 0 set to the largest value before it (0 before any).

    The result never decreases and rises only at entries with mass, so a binary search for a target below its
    last value never lands on an entry of mass 0, whatever one-ulp rises or dips a GPU's parallel scan left
    there. On an exact cumulative sum it changes nothing. The eager sampler's form of `first_above_with_mass`:
    two passes over the vocabulary (a ``where`` and an exact running maximum) where that takes about five;
    compiled (fused sampling), those five fuse into the search's reductions.
    """
    return torch.where(mass > 0, cdf, 0.0).cummax(-1).values


def sample_tokens(logprobs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row from log-probs ``(B, V)`` by inverse-CDF sampling.

    One uniform number per row and a search in the cumulative distribution: exact (a token of probability 0
    is never drawn), deterministic for a seeded generator, and on the CPU about ten times faster than
    ``torch.multinomial``, which draws a random number per vocabulary entry. The cumulative sum runs in
    float64 so a 50k-token vocabulary adds no visible rounding bias. On the CPU the sum is sequential, so it
    rises only at tokens with mass and the search is exact as it is; elsewhere (a GPU's parallel scan) it is
    searched with its zero-mass entries flattened first (`flat_where_no_mass`).
    """
    probs = logprobs.exp().double()
    cdf = probs.cumsum(-1)
    if cdf.device.type != "cpu":
        cdf = flat_where_no_mass(cdf, probs)
    u = uniform_draws(cdf.shape[0], generator, cdf.device)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp(max=cdf.shape[-1] - 1).squeeze(-1)


def uniform_draws(rows: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """``(rows, 1)`` float64 uniform numbers in [0, 1) from ``generator``, on ``device``: one per row and token.

    Drawn on the generator's own device and copied over, so a CPU generator gives the same draws for
    logits on any device (and `textenv.fused_sampling` the same draws as `sample_tokens`).
    """
    source = generator.device if generator is not None else device
    u = torch.rand(rows, 1, generator=generator, dtype=torch.float64, device=source)
    return to_device(u, device)


def entropy(logprobs: torch.Tensor) -> torch.Tensor:
    """Entropy of each row of a log-prob tensor (``-inf`` entries contribute 0)."""
    p = logprobs.exp()
    return -(p * logprobs.masked_fill(p == 0, 0.0)).sum(-1)
