"""The errors an env raises for misuse; both env classes and their shared engine raise them."""

from __future__ import annotations


class EpisodeEndedError(RuntimeError):
    """`step` was called on an episode that already ended (call `reset`)."""


class InvalidActionError(ValueError):
    """An action is not a token id of the action space."""
