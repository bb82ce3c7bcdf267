"""A toy world for tests and smoke runs: a small word vocabulary, a seeded random tiny LM, a keyword reward.

Nothing is trained, so it builds in milliseconds; it exists to exercise the env machinery (spaces, KL
arithmetic, checkers) cheaply. The real offline tasks, with pretrained LMs and learned reward models,
live in `textenv.tasks`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from textenv.models import build_tiny_causal_lm, build_word_tokenizer, tiny_gpt2_config
from textenv.rewards import KeywordReward

TOY_WORDS = [
    "the",
    "a",
    "this",
    "that",
    "movie",
    "film",
    "story",
    "plot",
    "acting",
    "music",
    "ending",
    "is",
    "was",
    "were",
    "felt",
    "seemed",
    "very",
    "quite",
    "really",
    "not",
    "good",
    "great",
    "fine",
    "bad",
    "awful",
    "dull",
    "boring",
    "fun",
    "and",
    "but",
    "so",
    ".",
    ",",
]
TOY_PROMPTS = [
    "the movie was",
    "this film is",
    "the acting was really",
    "the story",
    "a plot that was",
    "the ending",
]


def toy_prompts(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` prompts drawn from a fixed small list."""
    return [TOY_PROMPTS[int(i)] for i in rng.integers(len(TOY_PROMPTS), size=n)]


def toy_components(seed: int = 0, vocab_padding: int = 5) -> dict[str, Any]:
    """Tokenizer, reference LM and reward for the toy world.

    :param vocab_padding: extra LM-head rows beyond ``len(tokenizer)``, as real checkpoints often have, so
        that the action space is larger than the tokenizer.
    """
    tokenizer = build_word_tokenizer(TOY_WORDS)
    config = tiny_gpt2_config(len(tokenizer) + vocab_padding, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    model = build_tiny_causal_lm(config, seed=seed)
    return {"model": model, "tokenizer": tokenizer, "reward_fn": KeywordReward(["good", "great", "fun"])}


def make_toy_env(num_envs: int | None = None, seed: int = 0, **kwargs: Any):
    """The toy env (single) or vector env (``num_envs`` rows)."""
    from textenv.env import TextGenerationEnv
    from textenv.vector_env import TextGenerationVectorEnv

    params: dict[str, Any] = {
        "prompts": toy_prompts,
        "max_prompt_tokens": 6,
        "max_new_tokens": 8,
        **toy_components(seed),
    }
    params.update(kwargs)
    if num_envs is None:
        return TextGenerationEnv(**params)
    return TextGenerationVectorEnv(num_envs=num_envs, **params)
