"""Stage 2 data: the JSONL schema and its errors, pair expansion, simulated annotators, sampling."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from textenv.models import load_causal_lm, load_tokenizer
from textenv.preferences import (
    PreferenceFormatError,
    PreferenceRecord,
    SimulatedAnnotators,
    agreement_with_gold,
    expand_to_pairs,
    load_preferences,
    load_samples,
    make_samples,
    ranking_pairs,
    sample_completions,
    write_records,
)
from textenv.tasks import SentimentTask, Task


class LengthTask(Task):
    """Gold reward = completion length / 10 (a toy for checking annotator maths)."""

    name = "length"

    def tokenizer(self):  # pragma: no cover - unused
        raise NotImplementedError

    def corpus(self, rng, n):  # pragma: no cover - unused
        return []

    def prompts(self, rng, n):  # pragma: no cover - unused
        return []

    def gold_reward(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        return np.array([len(c) / 10 for c in completions])


def test_records_round_trip(tmp_path: Path) -> None:
    records = [
        PreferenceRecord("p", ["a", "b"], ranking=[1, 0], annotator="ann", source="human", id="x1"),
        PreferenceRecord("p", ["a", "b", "c"], ranking=[2], source="simulated", annotator="sim-1", meta={"k": 1}),
        PreferenceRecord("q", ["a", "b"], tie=True, id="x3"),
        PreferenceRecord("q", ["a", "b"], skip=True, id="x4"),
    ]
    path = write_records(records, tmp_path / "prefs.jsonl")
    assert load_preferences(path) == records


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"completions": ["a", "b"], "ranking": [0]}', "missing field 'prompt'"),
        ('{"prompt": "p", "completions": ["a", "b"]}', "missing field 'ranking'"),
        ('{"prompt": "p", "completions": ["a", "b"], "ranking": [0, 2]}', "unknown completion id 2"),
        ('{"prompt": "p", "completions": ["a"], "ranking": [0]}', "at least 2"),
        ('{"prompt": "p", "completions": ["a", "b"], "ranking": [0, 0]}', "twice"),
        ('{"prompt": "p", "completions": ["a", "b"], "ranking": [0], "rank": [1]}', "unknown field"),
        ('{"prompt": "p", "completions": ["a", "b"], "ranking": [0], "source": "robot"}', "source"),
        ('{"prompt": "p", "completions": ["a", "b"], "ranking": [0], "tie": true}', "tie or skip"),
        ('["p"]', "JSON object"),
        ("{oops", "invalid JSON"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "prefs.jsonl"
    path.write_text('{"prompt": "p", "completions": ["a", "b"], "ranking": [1]}\n\n' + line + "\n")
    with pytest.raises(PreferenceFormatError, match=rf"prefs.jsonl:3: .*{message}"):
        load_preferences(path)


def test_text_that_is_not_utf8_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "prefs.jsonl"
    good = b'{"prompt": "p", "completions": ["a", "b"], "ranking": [1]}\r\n'
    path.write_bytes(good + good.replace(b'"a"', '"caf\u00e9"'.encode("latin-1")))
    with pytest.raises(PreferenceFormatError, match=r"prefs.jsonl:2: not UTF-8 text"):
        load_preferences(path)
    path.write_bytes(good + good.replace(b'"a"', '"caf\u00e9"'.encode("utf-8")))  # CRLF line ends are fine
    assert [r.completions[0] for r in load_preferences(path)] == ["a", "caf\u00e9"]


def test_empty_missing_and_duplicate(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(PreferenceFormatError, match="empty.jsonl: file has no records"):
        load_preferences(empty)
    with pytest.raises(PreferenceFormatError, match="does not exist"):
        load_preferences(tmp_path / "missing.jsonl")
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": "a", "prompt": "p", "completions": ["a", "b"]}\n' * 2)
    with pytest.raises(PreferenceFormatError, match="dup.jsonl:2: duplicate id 'a'"):
        load_samples(dup)


def test_expand_to_pairs() -> None:
    full = PreferenceRecord("p", ["a", "b", "c", "d"], ranking=[2, 0, 3, 1])
    pairs = expand_to_pairs([full])
    assert len(pairs) == 6 and {(p.chosen, p.rejected) for p in pairs} >= {("c", "a"), ("c", "b"), ("a", "d"), ("d", "b")}
    assert ranking_pairs([1], 3) == [(1, 0), (1, 2)]  # best-of-K: the best beats each other one
    tie, skip = PreferenceRecord("p", ["a", "b", "c"], tie=True), PreferenceRecord("p", ["a", "b"], skip=True)
    assert expand_to_pairs([tie, skip]) == []
    assert len(expand_to_pairs([tie, skip], include_ties=True)) == 3


def test_simulated_annotators_follow_bradley_terry() -> None:
    task = LengthTask()
    samples = [PreferenceRecord("p", ["aaa", "a"], id=str(i)) for i in range(4000)]  # gold gap 0.2
    records = SimulatedAnnotators(task, n_annotators=3, temperature=0.2, disagreement=0.0, seed=1).label(samples)
    win = np.mean([r.ranking[0] == 0 for r in records])
    assert win == pytest.approx(1 / (1 + np.exp(-0.2 / 0.2)), abs=0.03)
    assert {r.annotator for r in records} == {"sim-0", "sim-1", "sim-2"} and records[0].source == "simulated"
    exact = SimulatedAnnotators(task, temperature=0.0, disagreement=0.0).label(samples[:50])
    assert agreement_with_gold(expand_to_pairs(exact), task) == 1.0
    again = SimulatedAnnotators(task, n_annotators=3, temperature=0.2, disagreement=0.0, seed=1).label(samples)
    assert [r.ranking for r in again] == [r.ranking for r in records]
    # An RM as the judge (``scores``) instead of the labels: the gold reward itself agrees on every pair whatever
    # the labels say, its negation on none.
    pairs = expand_to_pairs(records)
    assert agreement_with_gold(pairs, task, scores=task.gold_reward) == 1.0
    assert agreement_with_gold(pairs, task, scores=lambda p, c: -task.gold_reward(p, c)) == 0.0


def test_noise_and_disagreement_lower_agreement() -> None:
    task = SentimentTask()
    rng = np.random.default_rng(0)
    docs = task.corpus(rng, 800)
    samples = [PreferenceRecord("review :", [docs[2 * i][9:], docs[2 * i + 1][9:]]) for i in range(400)]

    def agreement(temperature: float, disagreement: float) -> float:
        ann = SimulatedAnnotators(task, temperature=temperature, disagreement=disagreement, seed=0)
        return agreement_with_gold(expand_to_pairs(ann.label(samples)), task)

    clean, noisy, opinionated = agreement(0.01, 0.0), agreement(0.5, 0.0), agreement(0.01, 0.5)
    assert clean > 0.97 and noisy < clean - 0.05 and opinionated < clean - 0.05
    ties = SimulatedAnnotators(task, temperature=0.1, tie_margin=0.2).label(samples)
    assert any(r.tie for r in ties)
    with pytest.raises(ValueError):
        SimulatedAnnotators(task, temperature=-1)


def test_sampling_is_seeded_and_stops_at_eos(sentiment_models: tuple[Path, Path]) -> None:
    lm_dir, _ = sentiment_models
    lm, tok = load_causal_lm(lm_dir), load_tokenizer(lm_dir)
    prompts = ["review : the acting was", "review : i"]
    a = sample_completions(lm, tok, prompts, k=3, max_new_tokens=24, seed=5)
    assert a == sample_completions(lm, tok, prompts, k=3, max_new_tokens=24, seed=5)
    assert len(a) == 2 and all(len(c) == 3 for c in a)
    flat = [c for cs in a for c in cs]
    assert all("<eos>" not in c and "<pad>" not in c for c in flat)
    assert sum(c.endswith(".") for c in flat) >= 4  # the LM learned to finish reviews and stop
    assert tok.padding_side == "left"
    records = make_samples(prompts, a, id_prefix="t")
    assert [r.id for r in records] == ["t-000000", "t-000001"] and not records[0].labelled
    json.loads(records[0].to_json())
