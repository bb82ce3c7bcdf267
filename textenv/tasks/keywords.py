"""The keywords world: write a short text that uses every requested word, concisely and without repeats.

Instruction following with a *programmatic* reward, the offline stand-in for "include these words" or
"mention each of these points" prompts (constrained generation, e.g. CommonGen, Lin et al. 2020). The
prompt lists one to three nouns; the completion is a few simple sentences (``the plot was good .``). The
reward is checkable by code (are the words there, is the text short, does it repeat itself), so no reward
model is learned: the env rewards with the gold reward directly and the benchmark is about the RL
algorithm, not about reward-model error.

The pretraining corpus follows the instruction only sometimes: each sentence is about its keyword with
probability ``hit_probability`` (default 0.8), otherwise about some other noun, and now and then a review
rambles on with one sentence too many. So the pretrained LM leaves out about a quarter of the keywords,
rambles now and then, and RL has room to improve. (Below about 0.7 the tiny default LM does not learn to
copy words from the prompt at all within its budget: copying is learned in a sudden phase, as induction
heads are, and it needs enough examples of it.)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from transformers import PreTrainedTokenizerBase

from textenv.models import build_word_tokenizer
from textenv.tasks.base import Task


def _words(text: str) -> list[str]:
    return text.split()


NOUNS: list[str] = _words(
    "plot music acting story ending cast script score humor pacing dialogue camera villain hero setting tone "
    "twist finale lighting editing sequel romance premise climax"
)
ADJECTIVES: list[str] = _words("good great bad dull fresh slow loud clever funny dark weak strong")
HEADER: list[str] = ["keywords", ":"]
SEPARATOR = "="
VOCABULARY: list[str] = HEADER + [SEPARATOR, "the", "was", "."] + NOUNS + ADJECTIVES
CONTENT_WORDS = frozenset(NOUNS) | frozenset(ADJECTIVES)  # a repeat of one of these is degenerate

WORDS_PER_KEYWORD = 5  # one sentence "the plot was good ." per keyword is the length budget
REPETITION_PENALTY = 0.25  # per extra occurrence of a noun or adjective
LENGTH_PENALTY = 0.05  # per word beyond WORDS_PER_KEYWORD * number of keywords


@lru_cache(maxsize=1)
def _tokenizer() -> PreTrainedTokenizerBase:
    return build_word_tokenizer(VOCABULARY, split="whitespace")


def parse_prompt(prompt: str) -> list[str]:
    """The keywords a prompt asks for.

    :param prompt: ``keywords : plot music =``.
    :raises ValueError: the prompt is not a keywords prompt, or names no keyword or a word outside ``NOUNS``.
    """
    words = prompt.split()
    if words[:2] != HEADER or words[-1:] != [SEPARATOR] or len(words) < 4:
        raise ValueError(f"not a keywords prompt: {prompt!r} (expected 'keywords : <noun> ... =')")
    keywords = words[2:-1]
    unknown = [w for w in keywords if w not in NOUNS]
    if unknown:
        raise ValueError(f"keywords prompt {prompt!r} names words that are not nouns of the task: {unknown}")
    return keywords


def keywords_reward(keywords: Sequence[str], completion: str) -> float:
    """The gold reward of one completion, in [-1, 1] (see `KeywordsTask`).

    :param keywords: the requested words.
    :param completion: the generated text (whitespace-separated words, without the prompt).
    """
    words = completion.split()
    present = set(words)
    coverage = sum(k in present for k in keywords) / len(keywords)
    counts = Counter(w for w in words if w in CONTENT_WORDS)
    repeats = sum(c - 1 for c in counts.values())
    excess = max(0, len(words) - WORDS_PER_KEYWORD * len(keywords))
    reward = coverage - REPETITION_PENALTY * repeats - LENGTH_PENALTY * excess
    return float(min(1.0, max(-1.0, reward)))


class KeywordsTask(Task):
    """Write one short sentence per requested keyword: the reward counts the keywords used, minus rambling.

    ## Description

    A prompt names one to three nouns, ``keywords : plot music =``; a good completion uses each of them in a
    short text from a closed vocabulary of 42 words, ``the plot was good . the music was loud .``, then
    ``<eos>``. Word-level tokenizer (whitespace split), ``<pad>`` = 0, ``<eos>`` = 1, ``<unk>`` = 2.

    ## Action Space

    ``Discrete(V)``: one token id per step, ``V`` the LM head's output size (45 tokenizer ids plus the
    model's padding rows, if any).

    ## Observation Space

    ``Dict(input_ids=Box(int64, (L,)), attention_mask=Box(int64, (L,)))`` with
    ``L = max_prompt_tokens + max_new_tokens = 6 + 20``: the left-padded prompt and the generated tokens.

    ## Rewards

    The gold reward is programmatic, in [-1, 1], on the completion alone:
    ``coverage - 0.25 * repeats - 0.05 * excess``, clipped, where *coverage* is the fraction of the
    requested keywords that occur in the completion, *repeats* counts extra occurrences of any noun or
    adjective, and *excess* counts words beyond 5 per keyword (one sentence each). The maximum 1 is reached
    by exactly one non-repeating sentence per keyword. In the env the score arrives at the last step, and
    every step carries ``-β·KL`` against the pretrained LM.

    ## Starting State

    A prompt from `prompts`: the number of keywords is uniform in ``1..max_keywords`` and the keywords are
    distinct nouns drawn uniformly from 24.

    ## Episode End

    ``<eos>`` or ``max_new_tokens`` (20) generated tokens: both terminal.

    ## Arguments

    ``max_keywords`` (3) and ``hit_probability`` (0.8): the chance that a corpus sentence is about its
    keyword rather than another noun (the pretrained LM's habit). ``gym.make("textenv/Keywords-v0")``
    takes any ``TextGenerationEnv`` keyword argument (``kl_coef``, ``render_mode``, …).

    ## Version History

    * v0: initial version.
    """

    name = "keywords"
    max_prompt_tokens = 6
    max_new_tokens = 20
    learned_reward = False

    #: probability that a corpus document rambles on with one extra sentence (over the length budget)
    extra_sentence_probability: float = 0.2

    def __init__(self, max_keywords: int = 3, hit_probability: float = 0.8) -> None:
        """:param max_keywords: prompts ask for 1 to ``max_keywords`` keywords (at most 3 fit the budgets).
        :param hit_probability: probability that a corpus sentence uses its keyword."""
        if not 1 <= max_keywords <= 3 or not 0.0 <= hit_probability <= 1.0:
            raise ValueError("need 1 <= max_keywords <= 3 and 0 <= hit_probability <= 1")
        self.max_keywords = max_keywords
        self.hit_probability = hit_probability

    def tokenizer(self) -> PreTrainedTokenizerBase:
        return _tokenizer()

    def _keywords(self, rng: np.random.Generator) -> list[str]:
        n = int(rng.integers(1, self.max_keywords + 1))
        return [NOUNS[int(i)] for i in rng.choice(len(NOUNS), size=n, replace=False)]

    @staticmethod
    def _prompt(keywords: Sequence[str]) -> str:
        return " ".join([*HEADER, *keywords, SEPARATOR])

    def _completion(self, rng: np.random.Generator, keywords: Sequence[str]) -> str:
        n_sentences = len(keywords) + int(rng.random() < self.extra_sentence_probability)
        others = [w for w in NOUNS if w not in keywords]
        fillers = [others[int(i)] for i in rng.choice(len(others), size=n_sentences, replace=False)]
        adjectives = [
            ADJECTIVES[int(i)] for i in rng.choice(len(ADJECTIVES), size=n_sentences, replace=False)
        ]
        sentences = []
        for i in range(n_sentences):
            on_topic = i < len(keywords) and rng.random() < self.hit_probability
            noun = keywords[i] if on_topic else fillers[i]
            sentences.append(f"the {noun} was {adjectives[i]} .")
        return " ".join(sentences)

    def corpus(self, rng: np.random.Generator, n: int) -> list[str]:
        docs = []
        for _ in range(n):
            keywords = self._keywords(rng)
            docs.append(f"{self._prompt(keywords)} {self._completion(rng, keywords)}")
        return docs

    def prompts(self, rng: np.random.Generator, n: int) -> list[str]:
        return [self._prompt(self._keywords(rng)) for _ in range(n)]

    def gold_reward(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
        return np.array(
            [keywords_reward(parse_prompt(p), c) for p, c in zip(prompts, completions, strict=True)],
            dtype=np.float64,
        )
