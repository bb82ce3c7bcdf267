"""textenv: RLHF packaged as a Gymnasium environment.

``import textenv`` registers the ``textenv/...`` env ids with Gymnasium.
"""

from textenv.env import EpisodeEndedError, InvalidActionError, TextGenerationEnv
from textenv.errors import UnsupportedRenderModeError
from textenv.kl import AdaptiveKLController, FixedKLController, kl_penalty
from textenv.policy_link import PolicyLink
from textenv.prompts import Prompt, PromptError, PromptSource
from textenv.registration import ENV_IDS
from textenv.rewards import (
    CallableReward,
    KeywordReward,
    LengthReward,
    RegexReward,
    RepetitionPenalty,
    RewardError,
    RewardFunction,
    RewardModelScorer,
    WeightedSum,
)
from textenv.sampling import SamplingConfig
from textenv.vector_env import TextGenerationVectorEnv

__version__ = "0.1.0"
__all__ = [
    "ENV_IDS",
    "AdaptiveKLController",
    "CallableReward",
    "EpisodeEndedError",
    "FixedKLController",
    "InvalidActionError",
    "KeywordReward",
    "LengthReward",
    "PolicyLink",
    "Prompt",
    "PromptError",
    "PromptSource",
    "RegexReward",
    "RepetitionPenalty",
    "RewardError",
    "RewardFunction",
    "RewardModelScorer",
    "SamplingConfig",
    "TextGenerationEnv",
    "TextGenerationVectorEnv",
    "UnsupportedRenderModeError",
    "WeightedSum",
    "kl_penalty",
]
