"""The programmatic-reward tasks (keywords, reverse): hand-checked rewards, seeded text, LM-only builds, env ids.

The generic checks (seeded generators, no ``<unk>``, prompt lengths) run over every task in
``tests/test_tasks.py``, and the env checkers over every id in ``tests/test_env_checkers.py``; this file
checks what is specific to these two tasks.
"""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

import textenv  # noqa: F401  (registers the ids)
from agents.random_agent import evaluate
from textenv.task_env import make_task_env, task_reward
from textenv.tasks import TASKS, KeywordsTask, ReverseTask, get_task
from textenv.tasks.artifacts import BUILD_FILE, build_task_models, task_models
from textenv.tasks.keywords import NOUNS, parse_prompt
from textenv.vector_env import TextGenerationVectorEnv

PROGRAMMATIC = {"keywords": "textenv/Keywords-v0", "reverse": "textenv/Reverse-v0"}


# ------------------------------------------------------------------------------------------- gold rewards
@pytest.mark.parametrize(
    ("prompt", "completion", "expected"),
    [
        ("keywords : plot music =", "the plot was good . the music was loud .", 1.0),
        ("keywords : plot music =", "the plot was good .", 0.5),
        ("keywords : plot music =", "the cast was good .", 0.0),
        ("keywords : plot music =", "", 0.0),
        (
            "keywords : plot =",
            "the plot was good . the cast was bad .",
            1.0 - 0.05 * 5,
        ),  # 5 words over budget
        ("keywords : plot =", "the plot was good good", 1.0 - 0.25),  # one repeated adjective
        ("keywords : plot music =", "plot plot plot plot plot plot plot plot plot", -1.0),  # clipped
        ("keywords : plot music =", "music the plot was", 1.0),  # no grammar check: only words count
    ],
)
def test_keywords_gold_reward_hand_checked(prompt: str, completion: str, expected: float) -> None:
    reward = KeywordsTask().gold_reward([prompt], [completion])
    assert reward.dtype == np.float64 and reward.shape == (1,)
    assert reward[0] == pytest.approx(expected)


@pytest.mark.parametrize(
    ("prompt", "completion", "expected"),
    [
        ("abcd=", "dcba", 1.0),
        ("abcd=", " dcba ", 1.0),  # surrounding whitespace ignored
        ("abcd=", "dcb", 0.75),  # a missing letter costs like a wrong one
        ("abcd=", "dcbaa", 0.8),  # so does an extra one
        ("abcd=", "dcha", 0.75),
        ("abcd=", "abcd", 0.0),  # copied, not reversed
        ("abc=", "abc", 1 / 3),  # ... the middle letter of an odd string is right either way
        ("abcd=", "", 0.0),
    ],
)
def test_reverse_gold_reward_hand_checked(prompt: str, completion: str, expected: float) -> None:
    reward = ReverseTask().gold_reward([prompt], [completion])
    assert reward.dtype == np.float64
    assert reward[0] == pytest.approx(expected)


def test_gold_reward_input_checks() -> None:
    with pytest.raises(ValueError, match="not a keywords prompt"):
        KeywordsTask().gold_reward(["review : the"], ["x"])
    with pytest.raises(ValueError, match="not nouns"):
        parse_prompt("keywords : good =")
    with pytest.raises(ValueError, match="not a reverse prompt"):
        ReverseTask().gold_reward(["23+58="], ["85"])
    for task in (KeywordsTask(), ReverseTask()):
        with pytest.raises(ValueError, match="prompts"):
            task.gold_reward(["a"], [])
    with pytest.raises(ValueError):
        KeywordsTask(max_keywords=4)
    with pytest.raises(ValueError):
        ReverseTask(max_length=7)  # would not fit max_prompt_tokens
    with pytest.raises(ValueError):
        ReverseTask(wrong_fraction=1.0)


# --------------------------------------------------------------------------------------------- generators
def test_registry_has_the_programmatic_tasks() -> None:
    assert {"keywords", "reverse"} <= set(TASKS)
    assert not get_task("keywords").learned_reward and not get_task("reverse").learned_reward
    assert get_task("sentiment").learned_reward and get_task("arithmetic").learned_reward


def test_keywords_text_and_corpus_mix() -> None:
    task = KeywordsTask()
    prompts = task.prompts(np.random.default_rng(0), 500)
    counts = [len(parse_prompt(p)) for p in prompts]
    assert set(counts) == {1, 2, 3}
    assert all(len(set(parse_prompt(p))) == len(parse_prompt(p)) for p in prompts)  # distinct keywords
    docs = task.corpus(np.random.default_rng(0), 2000)
    split = [d.split(" = ") for d in docs]
    gold = task.gold_reward([p + " =" for p, _ in split], [c for _, c in split])
    assert 0.5 < gold.mean() < 0.85  # the corpus follows the instruction only part of the time
    assert (gold == 1.0).mean() > 0.3 and (gold < 0.7).mean() > 0.2
    lengths = [len(task.tokenizer()(c)["input_ids"]) for _, c in split]
    assert max(lengths) + 1 <= task.max_new_tokens + 1  # completion and <eos> fit the budget
    assert set(" ".join(NOUNS).split()) <= {w for d in docs for w in d.split()}


def test_reverse_text_and_corpus_mix() -> None:
    task = ReverseTask()
    docs = task.corpus(np.random.default_rng(0), 2000)
    sources, answers = zip(*(d.split("=") for d in docs), strict=True)
    right = np.mean([a == s[::-1] for s, a in zip(sources, answers, strict=True)])
    assert 0.55 < right < 0.7  # wrong_fraction 0.4 (a few corruptions are harmless, e.g. "aba")
    assert {len(s) for s in sources} == {3, 4, 5, 6}
    tok = task.tokenizer()
    assert tok.decode(tok("abcd=dcba")["input_ids"]) == "abcd=dcba"
    assert task.join("abcd=", "dcba") == "abcd=dcba"
    assert max(len(a) for a in answers) + 1 <= task.max_new_tokens  # answer and <eos> fit


# ------------------------------------------------------------------------------------- builds and env ids
@pytest.fixture(scope="module")
def programmatic_models(task_home: Path) -> dict[str, tuple[Path, Path | None]]:
    """The default LMs of the two tasks (built once per session, ~20-30 s each on one thread)."""
    return {name: task_models(name, task_home) for name in PROGRAMMATIC}


@pytest.mark.parametrize("name", sorted(PROGRAMMATIC))
def test_build_is_lm_only_and_pretrained_lm_is_middling(
    name: str, programmatic_models, task_home: Path
) -> None:
    lm_dir, rm_dir = programmatic_models[name]
    assert rm_dir is None and (lm_dir / "config.json").is_file() and not (lm_dir.parent / "rm").exists()
    metrics = json.loads((lm_dir.parent / BUILD_FILE).read_text())
    assert metrics["lm_perplexity"] < metrics["uniform_perplexity"] / 3
    # the pretrained LM is clearly below the maximum (1) and clearly above a random agent
    env = gym.make(PROGRAMMATIC[name])
    random_score = evaluate(env, n_episodes=40, seed=0)["score"]
    lm_score = metrics["lm_mean_gold_reward"]
    assert random_score + 0.3 < lm_score < 0.9, (random_score, metrics)
    assert 0.1 < metrics["lm_fraction_max_gold_reward"] < 0.8


def test_lm_only_task_refuses_rm(programmatic_models, task_home: Path) -> None:
    with pytest.raises(ValueError, match="no reward model"):
        task_reward("reverse", "rm", str(task_home))
    with pytest.raises(ValueError, match="programmatic"):
        build_task_models("reverse", task_home / "unused", records=[])
    assert task_reward("reverse", None, str(task_home)).name == "reverse_gold"


@pytest.mark.parametrize("name", sorted(PROGRAMMATIC))
def test_env_ids_make_and_step(name: str, programmatic_models) -> None:
    env = gym.make(PROGRAMMATIC[name])
    env.reset(seed=0)
    done, steps = False, 0
    while not done:
        _, _, terminated, truncated, info = env.step(env.action_space.sample())
        done, steps = terminated or truncated, steps + 1
    assert steps <= get_task(name).max_new_tokens
    assert info["score"] == pytest.approx(get_task(name).gold_reward([info["prompt"]], [info["text"]])[0])
    venv = gym.make_vec(PROGRAMMATIC[name], num_envs=3, vectorization_mode="vector_entry_point")
    assert isinstance(venv, TextGenerationVectorEnv)
    venv.reset(seed=0)
    _, rewards, _, _, _ = venv.step(np.array([1, 1, 1]))  # <eos> ends every episode
    assert rewards.shape == (3,) and np.isfinite(rewards).all()


def test_make_task_env_default_reward_is_gold_for_programmatic_tasks(programmatic_models) -> None:
    env = make_task_env("keywords")
    assert env.engine.reward_fn.name == "keywords_gold"
    obs, _ = env.reset(seed=0)
    _, _, terminated, _, info = env.step(1)  # <eos> at once: the empty completion covers no keyword
    assert terminated and info["score"] == 0.0
