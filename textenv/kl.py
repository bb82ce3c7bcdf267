"""The KL penalty: per-token estimators and the controllers that set its coefficient β.

RLHF keeps the policy near the reference LM by rewarding ``-β·KL_t`` at every token (Ziegler et al. 2019;
InstructGPT). Only the sampled token's log-probs are needed for the single-sample estimators; the exact
full-distribution KL needs both whole distributions, which textenv has anyway (one forward each per token).

Estimators (Schulman, "Approximating KL Divergence", 2020), with ``r = π_ref(a) / π(a)``, a ~ π:
- ``k1 = log π(a) - log π_ref(a)``: unbiased, can be negative per token, high variance;
- ``k2 = ½ (log r)²``: low variance, biased;
- ``k3 = (r - 1) - log r``: unbiased and always >= 0;
- ``full = Σ_x π(x) (log π(x) - log π_ref(x))``: the exact KL of this step's distributions (no sampling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

KL_ESTIMATORS = ("k1", "k2", "k3", "full")


def kl_penalty(
    logprob: torch.Tensor,
    ref_logprob: torch.Tensor,
    estimator: str = "k1",
    policy_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token KL estimate.

    :param logprob: ``(B,)`` log π(a) of the sampled tokens under the sampling distribution (or any shape,
        e.g. ``(B, T)`` for a deferred batch, with the single-sample estimators).
    :param ref_logprob: log π_ref(a), the same shape.
    :param estimator: one of ``k1``, ``k2``, ``k3``, ``full``.
    :param policy_logprobs: ``(B, V)`` the policy's whole sampling distribution (``full`` only).
    :param ref_logprobs: ``(B, V)`` the reference's whole distribution (``full`` only).
    """
    if estimator == "k1":
        return logprob - ref_logprob
    log_ratio = ref_logprob - logprob
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    if estimator == "full":
        if policy_logprobs is None or ref_logprobs is None:
            raise ValueError("the 'full' KL estimator needs both whole distributions")
        p = policy_logprobs.exp()
        diff = (policy_logprobs - ref_logprobs).masked_fill(p == 0, 0.0)
        return (p * diff).sum(-1)
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {KL_ESTIMATORS}")


@dataclass
class FixedKLController:
    """A constant KL coefficient β."""

    value: float = 0.1

    def __post_init__(self) -> None:
        self._check(self.value)

    @staticmethod
    def _check(value: float) -> None:
        """A negative β would reward drifting away from the reference; NaN or inf would make every reward NaN."""
        if not 0 <= value < math.inf:
            raise ValueError(f"the KL coefficient must be finite and >= 0, got {value}")

    def update(self, kl: float, n_episodes: int) -> None:
        """Nothing to adapt; present so both controllers share one interface."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self._check(float(state["value"]))
        self.value = float(state["value"])


@dataclass
class AdaptiveKLController:
    """Ziegler et al. (2019)'s proportional controller: steer the measured KL toward a target.

    ``β ← β · (1 + clip(KL / target - 1, -0.2, 0.2) · n / horizon)``, where KL is the mean per-episode KL
    of the latest ``n`` finished episodes.

    :param value: initial β.
    :param target: the per-episode KL (nats) to aim for.
    :param horizon: how many episodes a full correction takes; larger is slower and smoother.
    """

    value: float = 0.1
    target: float = 6.0
    horizon: int = 10_000
    history: list[float] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self._check(self.value, self.target, self.horizon)

    @staticmethod
    def _check(value: float, target: float, horizon: float) -> None:
        """Refuse settings that would make β negative, NaN or infinite: written as ``not (0 < x < inf)`` so that
        NaN, which compares false with everything, is refused too (``x <= 0`` would let it through)."""
        if not (0 <= value < math.inf and 0 < target < math.inf and 0 < horizon < math.inf):
            raise ValueError(
                f"need finite value >= 0, target > 0 and horizon > 0; got value={value}, target={target}, "
                f"horizon={horizon}"
            )

    def update(self, kl: float, n_episodes: int) -> None:
        """Move β after ``n_episodes`` finished episodes whose mean KL was ``kl``.

        A NaN or infinite ``kl`` is refused with β unchanged: it would turn β, and every later reward, into NaN.
        """
        if not math.isfinite(kl):
            raise ValueError(f"the measured KL must be finite to adapt β, got {kl}")
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_episodes / self.horizon
        self.history.append(self.value)

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self._check(float(state["value"]), float(state["target"]), float(state["horizon"]))
        self.value, self.target, self.horizon = (
            float(state["value"]),
            float(state["target"]),
            int(state["horizon"]),
        )


KLController = FixedKLController | AdaptiveKLController
