"""Every example runs (with a tiny budget) and prints what it promises."""

import json
import re
import runpy
import sys


def test_quickstart(capsys):
    runpy.run_path("examples/quickstart.py", run_name="__main__")
    out = capsys.readouterr().out
    assert "prompt:" in out and "completion:" in out and "score:" in out
    assert "ref logp" in out  # the ansi render's table header


def run_example(monkeypatch, name, *args):
    """Run ``examples/<name>.py`` as a script with these command-line arguments."""
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *map(str, args)])
    runpy.run_path(f"examples/{name}.py", run_name="__main__")


def test_hand_written_policy_beats_random(monkeypatch, capsys):
    run_example(monkeypatch, "hand_written_policy", "--tiny")
    lines = {line.split(" policy:")[0].strip(): line for line in capsys.readouterr().out.splitlines()}
    score = {name: float(re.search(r"score ([\d.]+)", line).group(1)) for name, line in lines.items()}
    assert set(score) == {"random", "hand-written"}
    assert score["hand-written"] > score["random"]  # it writes the keywords the reward counts


def test_custom_reward_trains_ppo_on_it(monkeypatch, capsys, tmp_path):
    run_example(monkeypatch, "custom_reward", "--tiny", "--run-dir", tmp_path / "run")
    out = capsys.readouterr().out
    assert "sentiment_words" in out and "0.5*ends_a_sentence" in out and "iteration  2:" in out
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2


def test_plot_run_reads_a_run_folder(monkeypatch, capsys, tmp_path):
    run_example(monkeypatch, "custom_reward", "--tiny", "--run-dir", tmp_path / "run")
    run_example(monkeypatch, "plot_run", tmp_path / "run", "--out", tmp_path / "curves.png")
    assert "2 iterations" in capsys.readouterr().out
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_full_rlhf_pipeline(monkeypatch, capsys, tmp_path, arithmetic_models):
    run_example(monkeypatch, "full_rlhf", "--tiny", "--prebuilt", "--run-dir", tmp_path / "rlhf")
    out = capsys.readouterr().out
    assert "gold reward before PPO:" in out and "Stage 3" in out
    summary = json.loads((tmp_path / "rlhf" / "summary.json").read_text())
    assert summary["task"] == "arithmetic" and summary["after"]["gold"] is not None
