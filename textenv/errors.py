"""The errors an env raises for misuse; both env classes and their shared engine raise them."""

from __future__ import annotations


class EpisodeEndedError(RuntimeError):
    """`step` was called on an episode that already ended (call `reset`)."""


class InvalidActionError(ValueError):
    """An action is not a token id of the action space."""


class UnsupportedRenderModeError(ValueError, TypeError):
    """A ``render_mode`` the env does not have (textenv renders text: ``"ansi"``).

    Also a `TypeError` because that is what tools catch to retry without a render mode: stable-baselines3's
    ``make_vec_env("textenv/...")`` and ``PPO(policy, "textenv/...")`` first ask for ``render_mode="rgb_array"``
    and fall back to none only on a `TypeError` (what an env without the argument raises).
    """
