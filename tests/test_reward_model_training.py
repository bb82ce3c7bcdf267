"""Stage 2 model: the RM learns the preferences, is normalised, scores at the last real token, round-trips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from textenv.cli import main
from textenv.models import (
    ModelLoadError,
    build_tiny_reward_model,
    load_reward_model,
    load_tokenizer,
    tiny_gpt2_config,
)
from textenv.preferences import PreferenceRecord, SimulatedAnnotators, load_preferences
from textenv.reward_model_training import _right_pad, score_texts, train_reward_model
from textenv.tasks import SentimentTask


def test_default_rm_is_close_to_annotator_agreement(sentiment_models: tuple[Path, Path]) -> None:
    lm_dir, _ = sentiment_models
    build = json.loads((lm_dir.parent / "build.json").read_text())
    acc, ceiling = build["rm_heldout_accuracy"], build["annotator_gold_agreement"]
    print(f"\nsentiment RM held-out pairwise accuracy {acc:.3f}; simulated annotators' agreement with gold {ceiling:.3f};"
          f" RM agreement with gold {build['rm_gold_agreement']:.3f}; build {build['seconds_total']:.0f}s")  # fmt: skip
    assert acc > 0.6  # well above chance
    assert acc >= ceiling - 0.05


def test_rm_round_trips_and_is_normalised(sentiment_models: tuple[Path, Path]) -> None:
    lm_dir, rm_dir = sentiment_models
    task = SentimentTask()
    a = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    b = load_reward_model(rm_dir)
    tok = load_tokenizer(rm_dir)
    records = load_preferences(lm_dir.parent / "preferences.jsonl")[:200]
    texts = [task.join(r.prompt, c) for r in records for c in r.completions]
    raw = score_texts(a, tok, texts)
    assert np.array_equal(raw, score_texts(b, tok, texts))
    mean, std = a.config.textenv_reward_mean, a.config.textenv_reward_std
    normalised = (raw - mean) / std
    assert abs(normalised.mean()) < 0.2 and 0.8 < normalised.std() < 1.2  # reference samples: mean 0, std 1
    assert task.join("review : the plot was", "great .") == "review : the plot was great ."
    good, bad = score_texts(a, tok, ["review : the plot was great . i loved the music .", "review : the plot was dull . i hated the music ."])
    assert good > bad


def test_scores_are_read_at_the_last_real_token(sentiment_models: tuple[Path, Path]) -> None:
    _, rm_dir = sentiment_models
    model, tok = load_reward_model(rm_dir), load_tokenizer(rm_dir)
    texts = ["review : it was good .", "review : the acting was not very good . i hated the songs ."]
    batched = score_texts(model, tok, texts)
    single = [float(model(torch.tensor([tok(t)["input_ids"]])).logits[0, 0]) for t in texts]
    assert batched == pytest.approx(single, abs=1e-5)
    ids, mask = _right_pad([[5, 6], [5, 6, 7]], 0)
    assert ids.tolist() == [[5, 6, 0], [5, 6, 7]] and mask.tolist() == [[1, 1, 0], [1, 1, 1]]


def test_small_rm_from_scratch_beats_chance(tmp_path: Path) -> None:
    task = SentimentTask()
    docs = task.corpus(np.random.default_rng(0), 1200)
    samples = [PreferenceRecord("review :", [d[9:] for d in docs[4 * i : 4 * i + 4]], id=str(i)) for i in range(300)]
    records = SimulatedAnnotators(task, temperature=0.1, disagreement=0.0, seed=0).label(samples)
    result = train_reward_model(records, task.tokenizer(), task=task, steps=150, seed=0, out_dir=tmp_path / "rm",
                                config_overrides=dict(n_embd=32, n_layer=1), progress=False)  # fmt: skip
    print(f"\nfrom scratch: {result.summary()}")
    assert result.heldout_accuracy > 0.6 and result.rm_gold_agreement > 0.6
    assert json.loads((tmp_path / "rm" / "textenv_reward_model.json").read_text())["n_train_pairs"] == result.n_train_pairs


def test_bad_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    task = SentimentTask()
    ties = [PreferenceRecord("review :", ["a", "b"], tie=True, id=str(i)) for i in range(10)]
    with pytest.raises(ValueError, match="no training pairs"):
        train_reward_model(ties, task.tokenizer(), task=task, steps=1, progress=False)
    ok = [PreferenceRecord(f"review : {i}", ["it was good .", "it was bad ."], ranking=[0, 1]) for i in range(10)]
    with pytest.raises(ModelLoadError, match="does not exist"):
        train_reward_model(ok, task.tokenizer(), init_from=tmp_path / "missing", steps=1, progress=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["train-rm", "--preferences", str(empty), "--lm", str(tmp_path), "--out", str(tmp_path / "rm")]) == 2
    assert "empty.jsonl: file has no records" in capsys.readouterr().err


def test_rm_from_a_hub_name_loads_its_trunk_in_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub name (not a local folder) goes to ``from_pretrained``, asked for float32 weights whatever the
    checkpoint's dtype: transformers would load a bf16 checkpoint as bf16, whose weights round AdamW's updates
    away. (The hub itself is offline here, so ``from_pretrained`` is replaced by a recorder.)"""
    task = SentimentTask()
    tokenizer = task.tokenizer()
    calls = []

    def from_pretrained(name, **kwargs):
        calls.append((name, kwargs.get("dtype")))
        config = tiny_gpt2_config(len(tokenizer), pad_token_id=tokenizer.pad_token_id, n_positions=64)
        return build_tiny_reward_model(config, seed=0).to(kwargs.get("dtype") or torch.bfloat16)

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", from_pretrained)
    ok = [PreferenceRecord(f"review : {i}", ["it was good .", "it was bad ."], ranking=[0, 1]) for i in range(10)]
    result = train_reward_model(ok, tokenizer, task=task, init_from="some-org/some-lm", steps=2, progress=False)
    assert calls == [("some-org/some-lm", torch.float32)]
    assert {p.dtype for p in result.model.parameters()} == {torch.float32}


def test_training_reads_the_tokens_the_scorer_reads_with_a_bos_tokenizer() -> None:
    """A tokenizer that adds special tokens (a BOS, as Llama's does): the RM is trained (`score_texts`, the
    training path's encoding) on the same sequences `RewardModelScorer` scores it on."""
    from tokenizers.processors import TemplateProcessing

    from textenv.models import build_tiny_reward_model, tiny_gpt2_config
    from textenv.rewards import RewardModelScorer

    tokenizer = SentimentTask().tokenizer()
    tokenizer.add_special_tokens({"bos_token": "<bos>"})
    bos = tokenizer.convert_tokens_to_ids("<bos>")
    tokenizer._tokenizer.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    long = "review : " + " ".join(["the acting was not very good ."] * 12)  # past the RM's 64 positions
    texts = ["review : it was good .", "review : the acting was not very good . i hated the songs .", long]
    assert tokenizer(texts[0])["input_ids"][0] == bos and len(tokenizer(long)["input_ids"]) > 64
    config = tiny_gpt2_config(len(tokenizer), n_positions=64, n_embd=32, n_layer=1, n_head=2)
    config.pad_token_id = tokenizer.pad_token_id
    model = build_tiny_reward_model(config, seed=0).eval()
    trained_on = score_texts(model, tokenizer, texts)
    scored = RewardModelScorer(model, tokenizer, normalize=False).raw_scores(texts).numpy()
    np.testing.assert_allclose(trained_on, scored, rtol=1e-5, atol=1e-6)


def test_identical_completions_count_as_half_right_not_as_errors() -> None:
    """A held-out pair of identical completions always gets equal scores; counted as wrong, it pushed
    ``heldout_accuracy_all`` below chance (0.461 on the arithmetic build, where 16% of pairs are identical)."""
    task = SentimentTask()
    same = [PreferenceRecord(f"review : {i}", ["it was good .", "it was good ."], ranking=[0, 1], id=str(i))
            for i in range(20)]  # fmt: skip
    result = train_reward_model(same, task.tokenizer(), steps=2, seed=0, config_overrides=dict(n_embd=16, n_layer=1),
                                progress=False)  # fmt: skip
    assert result.n_heldout_pairs > 0 and result.heldout_accuracy_all == 0.5
