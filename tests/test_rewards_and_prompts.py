"""Reward functions (learned, callable, rules, sums) and prompt sources."""

import json

import numpy as np
import pytest
import torch

from textenv import (
    CallableReward,
    KeywordReward,
    LengthReward,
    PromptError,
    PromptSource,
    RegexReward,
    RepetitionPenalty,
    RewardError,
    RewardModelScorer,
)
from textenv.models import build_tiny_reward_model, build_word_tokenizer, tiny_gpt2_config
from textenv.toy import TOY_WORDS


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(TOY_WORDS)


def test_reward_model_scores_last_real_token_whatever_the_padding(tokenizer):
    rm = build_tiny_reward_model(
        tiny_gpt2_config(len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2), seed=1
    )
    scorer = RewardModelScorer(rm, tokenizer, normalize=False, batch_size=8)
    prompts = ["the movie was", "this film"]
    completions = ["very good .", "was really really awful and boring ."]
    batched = scorer(prompts, completions)
    for p, c, s in zip(prompts, completions, batched, strict=True):
        ids = tokenizer(f"{p} {c}", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            alone = rm(torch.tensor([ids])).logits[0, 0]
        assert s == pytest.approx(float(alone), abs=1e-5)


def test_an_overlong_text_loses_its_start_not_the_completion_the_score_is_read_from(tokenizer):
    """The RM reads its score at the last token: a text longer than ``max_length`` must keep its end. (The
    ``truncation_side="left"`` call argument is ignored by transformers 5's fast tokenizers: it kept the
    start, so two texts differing only in their last words scored the same.)"""
    from textenv.models import encode_truncating_left
    from textenv.reward_model_training import _encode

    rm = build_tiny_reward_model(
        tiny_gpt2_config(len(tokenizer), n_positions=64, n_embd=32, n_layer=1, n_head=2), seed=1
    ).eval()
    scorer = RewardModelScorer(rm, tokenizer, normalize=False, max_length=6)
    prompt = "the movie was really really really good and the plot was"
    good, bad = scorer([prompt, prompt], ["very good .", "very awful ."])
    assert good != pytest.approx(float(bad), abs=1e-6)
    tail = tokenizer(f"{prompt} very good .", add_special_tokens=False)["input_ids"][-6:]
    with torch.no_grad():
        assert float(good) == pytest.approx(float(rm(torch.tensor([tail])).logits[0, 0]), abs=1e-5)
    assert _encode(tokenizer, [f"{prompt} very good ."], 6) == [tail]  # RM training cuts the same way
    assert tokenizer.truncation_side == "right"  # restored after the call
    short = tokenizer("the movie", add_special_tokens=False)["input_ids"]
    assert encode_truncating_left(tokenizer, ["the movie"], max_length=6)["input_ids"] == [short]


def test_compiled_reward_model_scores_like_the_eager_one_at_every_shape(tokenizer):
    """``compile=True`` (dynamic shapes) must give the eager scores for batches of other sizes and lengths."""
    rm = build_tiny_reward_model(
        tiny_gpt2_config(len(tokenizer), n_positions=64, n_embd=32, n_layer=1, n_head=2), seed=3
    )
    eager = RewardModelScorer(rm, tokenizer, normalize=False, batch_size=3)
    compiled = RewardModelScorer(rm, tokenizer, normalize=False, batch_size=3, compile=True)
    prompts = ["the movie was", "this film", "a", "the plot"]  # chunks of 3 and 1 rows, lengths differ
    completions = ["very good .", "was really really awful and boring .", "good", "was"]
    for n in (4, 2):
        expected = eager(prompts[:n], completions[:n])
        assert compiled(prompts[:n], completions[:n]) == pytest.approx(expected.tolist(), abs=1e-5)
    with torch.no_grad():
        rm.score.weight.add_(1.0)  # the compiled forward reads the live weights (a trained RM), not a copy
    assert compiled(prompts, completions) == pytest.approx(eager(prompts, completions).tolist(), abs=1e-5)


def test_reward_model_normalisation_from_config(tokenizer):
    rm = build_tiny_reward_model(
        tiny_gpt2_config(len(tokenizer), n_positions=64, n_embd=32, n_layer=1, n_head=2)
    )
    raw = RewardModelScorer(rm, tokenizer, normalize=False)(["the movie"], ["was good"])
    rm.config.textenv_reward_mean, rm.config.textenv_reward_std = 0.5, 2.0
    normed = RewardModelScorer(rm, tokenizer)(["the movie"], ["was good"])
    assert normed[0] == pytest.approx((raw[0] - 0.5) / 2.0, abs=1e-6)
    with pytest.raises(ValueError, match="std must be > 0"):
        RewardModelScorer(rm, tokenizer, normalize=(0.0, 0.0))
    with pytest.raises(ValueError, match="label_index 3"):
        RewardModelScorer(rm, tokenizer, label_index=3)


def test_rule_rewards_and_weighted_sum():
    p, c = ["x", "x"], ["good and great", "bad bad bad bad"]
    assert KeywordReward(["good", "great"])(p, c).tolist() == [1.0, 0.0]
    assert LengthReward(3)(p, c).tolist() == [0.0, pytest.approx(-1 / 3)]
    assert RepetitionPenalty()(p, c).tolist() == [0.0, -0.75]
    assert RegexReward(r"\bgood\b")(p, c).tolist() == [1.0, 0.0]
    total = KeywordReward(["good"]) + 0.5 * RepetitionPenalty()
    assert total(p, c).tolist() == [1.0, -0.375]
    assert total.name == "1*keywords(good) + 0.5*repetition"  # sums flatten into one list of terms
    per_example = CallableReward(lambda prompt, completion: len(completion), per_example=True)
    assert per_example(p, c).tolist() == [14.0, 15.0]


def test_non_finite_reward_names_the_function_and_row():
    inf_reward = CallableReward(lambda ps, cs: np.array([0.0, np.inf]), name="broken")
    with pytest.raises(RewardError, match=r"'broken' returned inf.*'bad'"):
        inf_reward(["a", "b"], ["good", "bad"])


def test_prompt_sources(tmp_path, tokenizer):
    txt = tmp_path / "prompts.txt"
    txt.write_text("the movie was\n\nthis film is\n")
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text(json.dumps({"prompt": "the story"}) + "\n")
    assert [p.text for p in PromptSource(txt, tokenizer, 8).fixed] == ["the movie was", "this film is"]
    assert [p.text for p in PromptSource(jsonl, tokenizer, 8).fixed] == ["the story"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "missing"}\n')
    with pytest.raises(PromptError, match=r"bad.jsonl:2"):
        PromptSource(bad, tokenizer, 8)
    with pytest.raises(PromptError, match="does not exist"):
        PromptSource(tmp_path / "missing.txt", tokenizer, 8)
    with pytest.raises(PromptError, match="empty"):
        PromptSource([], tokenizer, 8)
    source = PromptSource(["a", "the movie", "this film"], tokenizer, 8)
    draw = lambda seed: [p.text for p in source.sample(np.random.default_rng(seed), 5)]  # noqa: E731
    assert draw(3) == draw(3)


def test_reward_model_with_its_own_tokenizer_rescores_the_text():
    """An RM with a different vocabulary (here character-level) re-tokenises the completion text itself."""
    from textenv.toy import make_toy_env

    chars = build_word_tokenizer(list("abcdefghijklmnopqrstuvwxyz .,"), split="chars")
    rm = build_tiny_reward_model(tiny_gpt2_config(len(chars), n_positions=128, n_embd=32, n_layer=1, n_head=2), seed=3)
    scorer = RewardModelScorer(rm, chars, normalize=False)
    env = make_toy_env(reward_fn=scorer, max_new_tokens=3)
    env.reset(seed=0)
    done = False
    while not done:
        _, _, done, _, info = env.step(5)
    text = f"{info['prompt']} {info['text']}"
    with torch.no_grad():
        expected = rm(torch.tensor([chars(text)["input_ids"]])).logits[0, 0]
    assert info["score"] == pytest.approx(float(expected), abs=1e-5)
