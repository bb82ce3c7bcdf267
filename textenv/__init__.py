"""textenv: RLHF packaged as a Gymnasium environment."""

__version__ = "0.1.0"
