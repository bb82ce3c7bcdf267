"""The offline tasks: generators are seeded, text parses, the gold reward rewards what the docs say."""

from __future__ import annotations

import numpy as np
import pytest

from textenv.tasks import TASKS, ArithmeticTask, SentimentTask, get_task
from textenv.tasks.sentiment import VOCABULARY, gold_breakdown


def test_registry_and_unknown_name() -> None:
    assert set(TASKS) >= {"sentiment", "arithmetic"}
    assert isinstance(get_task("sentiment"), SentimentTask)
    with pytest.raises(ValueError, match="arithmetic.*sentiment"):
        get_task("nope")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_generators_are_seeded_and_tokenize_without_unk(name: str) -> None:
    task = get_task(name)
    assert task.corpus(np.random.default_rng(3), 50) == task.corpus(np.random.default_rng(3), 50)
    assert task.prompts(np.random.default_rng(3), 50) == task.prompts(np.random.default_rng(3), 50)
    tok = task.tokenizer()
    ids = tok(task.corpus(np.random.default_rng(0), 200), add_special_tokens=False)["input_ids"]
    assert all(tok.unk_token_id not in row for row in ids)
    prompts = task.prompts(np.random.default_rng(0), 200)
    assert max(len(tok(p)["input_ids"]) for p in prompts) <= task.max_prompt_tokens
    assert tok.eos_token == "<eos>" and tok.pad_token_id == 0


def test_sentiment_world_shape() -> None:
    task = SentimentTask()
    assert 200 <= len(VOCABULARY) <= 500
    docs = task.corpus(np.random.default_rng(0), 1000)
    parts = [gold_breakdown(d) for d in docs]
    assert all(p.ungrammatical_sentences == 0 for p in parts)  # the grammar generates what it parses
    gold = np.array([p.reward for p in parts])
    assert -0.3 < gold.mean() < 0.3 and (gold > 0.5).mean() > 0.25 and (gold < -0.5).mean() > 0.25  # mixed
    lengths = [len(d.split()) for d in docs]
    assert max(lengths) <= 2 + task.max_new_tokens + 4
    for prompt in task.prompts(np.random.default_rng(1), 100):
        assert prompt.startswith("review : ")
        assert gold_breakdown(prompt + " .").sentiment == 0.0  # prompts carry no sentiment


@pytest.mark.parametrize(
    ("better", "worse"),
    [
        ("the acting was great .", "the acting was dull ."),  # sentiment
        ("the acting was very great .", "the acting was great ."),  # intensifier
        ("the acting was great .", "the acting was slightly great ."),  # downtoner
        ("the acting was not bad .", "the acting was not great ."),  # negation flips
        ("the acting was great .", "the acting was great great great ."),  # repetition is degenerate
        ("the acting was great .", "the acting was great . i loved"),  # unfinished sentence
        ("the acting was good .", "the acting were good ."),  # agreement error
        ("i loved the music .", "i loved the the music ."),
        ("the acting was dull .", "great great great great great great"),  # hacking the RM does not pay
    ],
)
def test_sentiment_gold_reward_orders(better: str, worse: str) -> None:
    task = SentimentTask()
    prompt = "review :"
    g = task.gold_reward([prompt, prompt], [better, worse])
    assert g[0] > g[1], (better, worse, g)
    assert np.all(np.abs(g) <= 1.0)


def test_sentiment_join_and_gold_input_checks() -> None:
    task = SentimentTask()
    assert task.join("review : the plot", " was good . ") == "review : the plot was good ."
    assert task.join("review : the plot", "") == "review : the plot"
    with pytest.raises(ValueError, match="prompts"):
        task.gold_reward(["a"], [])


def test_arithmetic_gold_and_corpus() -> None:
    task = ArithmeticTask()
    assert task.gold_reward(["23+58=", "23+58=", "23+58=", "1+1="], ["81", "80", "811", "2"]).tolist() == [1, 0, 0, 1]
    assert task.join("23+58=", "81") == "23+58=81"
    docs = task.corpus(np.random.default_rng(0), 2000)
    right = [int(a) + int(b) == int(c) for a, b, c in (d.replace("=", "+").split("+") for d in docs)]
    assert 0.6 < np.mean(right) < 0.8  # a fraction of deliberately wrong sums
    tok = task.tokenizer()
    assert tok.decode(tok("23+58=81")["input_ids"]) == "23+58=81"
    with pytest.raises(ValueError, match="not an arithmetic prompt"):
        task.gold_reward(["hello"], ["1"])
    with pytest.raises(ValueError):
        ArithmeticTask(wrong_fraction=1.5)
