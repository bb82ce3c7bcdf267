"""Labelling by people: answers from standard input are appended at once, survive Ctrl-C, and resume."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from textenv.labeling import label_interactively, parse_answer
from textenv.preferences import PreferenceFormatError, PreferenceRecord, load_preferences, write_records


def _samples(n: int = 4, k: int = 2) -> list[PreferenceRecord]:
    return [PreferenceRecord(f"review : prompt {i}", [f"c{i}-{j} ." for j in range(k)], id=f"s-{i}") for i in range(n)]


class InterruptAfter(io.StringIO):
    """Standard input that answers from ``text`` and then behaves as if the user pressed Ctrl-C."""

    def readline(self, *args: object) -> str:
        line = super().readline(*args)
        if not line:
            raise KeyboardInterrupt
        return line


def test_parse_answer() -> None:
    assert parse_answer("2", 2) == [1, 0]
    assert parse_answer(" 1 ", 2) == [0, 1]
    assert parse_answer("3 1 2", 3) == [2, 0, 1] and parse_answer("312", 3) == [2, 0, 1]
    assert parse_answer("2", 4) == [1]
    assert parse_answer("t", 2) == "tie" and parse_answer("S", 2) == "skip" and parse_answer("q", 2) == "quit"
    assert parse_answer("5", 2) is None and parse_answer("1 1", 3) is None and parse_answer("x", 2) is None
    assert parse_answer("2,1,3", 3) == [1, 0, 2] == parse_answer("2, 1, 3", 3)
    # From ten completions on, digits are not split: "12" is the twelfth, "10" the tenth.
    assert parse_answer("12", 12) == [11] and parse_answer("10", 12) == [9] and parse_answer("1 12", 12) == [0, 11]


def test_the_command_line_refuses_what_it_could_not_label() -> None:
    """One completion per prompt (or no prompt) makes records that `train-rm` and `label` reject afterwards."""
    from textenv.cli import main

    assert main(["sample", "--task", "arithmetic", "--k", "1", "--out", "unused.jsonl"]) == 2
    assert main(["sample", "--task", "arithmetic", "--n", "0", "--out", "unused.jsonl"]) == 2


def test_labels_are_written_and_resumed(tmp_path: Path) -> None:
    out = tmp_path / "labels.jsonl"
    shown = io.StringIO()
    session = label_interactively(_samples(), out, annotator="ana", input=io.StringIO("zzz\n2\nt\nq\n"), output=shown)
    assert (session.written, session.remaining, session.interrupted) == (2, 2, False)
    assert "not understood" in shown.getvalue() and "review : prompt 0" in shown.getvalue()
    records = load_preferences(out)
    assert [r.ranking for r in records] == [[1, 0], []] and records[1].tie
    assert records[0].annotator == "ana" and records[0].source == "human" and records[0].id == "s-0"
    shown = io.StringIO()
    session = label_interactively(_samples(), out, input=io.StringIO("s\n1\n"), output=shown)
    assert session.written == 2 and session.remaining == 0
    assert "2 of 4 samples already labelled" in shown.getvalue() and "prompt 0" not in shown.getvalue()
    records = load_preferences(out)
    assert [r.id for r in records] == ["s-0", "s-1", "s-2", "s-3"] and records[2].skip


def test_a_label_cut_mid_write_does_not_block_resuming(tmp_path: Path) -> None:
    """Power loss or a full disk can cut the last line: resuming mends it instead of refusing the file."""
    out = tmp_path / "labels.jsonl"
    label_interactively(_samples(), out, input=io.StringIO("2\n1\nq\n"), output=io.StringIO())
    whole = out.read_bytes()
    out.write_bytes(whole + b'{"prompt": "review : pro')  # the third label, cut
    with pytest.warns(UserWarning, match="cut mid-write"):
        session = label_interactively(_samples(), out, input=io.StringIO("1\nq\n"), output=io.StringIO())
    assert session.written == 1 and (tmp_path / "labels.jsonl.torn").read_bytes() == b'{"prompt": "review : pro\n'
    assert [r.id for r in load_preferences(out)] == ["s-0", "s-1", "s-2"]
    out.write_bytes(out.read_bytes() + b'{"prompt": "rev')  # a second torn line: kept beside the first
    with pytest.warns(UserWarning, match="cut mid-write"):
        label_interactively(_samples(), out, input=io.StringIO("q\n"), output=io.StringIO())
    assert (tmp_path / "labels.jsonl.torn").read_bytes() == b'{"prompt": "review : pro\n{"prompt": "rev\n'
    out.write_bytes(out.read_bytes()[:-1])  # a whole record whose newline was lost
    label_interactively(_samples(), out, input=io.StringIO("2\n"), output=io.StringIO())
    assert [r.id for r in load_preferences(out)] == ["s-0", "s-1", "s-2", "s-3"]


def test_kwise_ranking_and_interrupt(tmp_path: Path) -> None:
    out = tmp_path / "labels.jsonl"
    session = label_interactively(_samples(3, k=3), out, input=InterruptAfter("3 1 2\n2\n"), output=io.StringIO())
    assert session.interrupted and session.written == 2 and session.remaining == 1
    assert [r.ranking for r in load_preferences(out)] == [[2, 0, 1], [1]]
    session = label_interactively(_samples(3, k=3), out, input=io.StringIO("1\n"), output=io.StringIO())
    assert session.written == 1 and len(load_preferences(out)) == 3


def test_corrupt_output_file_is_a_clear_error(tmp_path: Path) -> None:
    out = tmp_path / "labels.jsonl"
    out.write_text('{"prompt": "p", "completions": ["a", "b"], "ranking": [1]}\n{"prompt": "p"}\n')
    with pytest.raises(PreferenceFormatError, match="labels.jsonl:2"):
        label_interactively(_samples(), out, input=io.StringIO("1\n"), output=io.StringIO())


def test_cli_with_stdin_survives_sigint_and_resumes(tmp_path: Path) -> None:
    samples = write_records(_samples(4), tmp_path / "samples.jsonl")
    out = tmp_path / "labels.jsonl"
    cmd = [sys.executable, "-m", "textenv.cli", "label", str(samples), str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Ctrl-C as in a terminal: a shell's background jobs (`pytest &`) ignore SIGINT, and a child inherits
    # that, so the child starts with the default disposition whatever the test runner's was.
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    assert proc.stdin is not None
    proc.stdin.write("1\n2\n")
    proc.stdin.flush()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # Ctrl-C while it waits for the third answer
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in stdout
    assert [r.ranking for r in load_preferences(out)] == [[0, 1], [1, 0]]
    done = subprocess.run(cmd, input="t\n2\n", capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert "2 of 4 samples already labelled" in done.stdout
    records = load_preferences(out)
    assert len(records) == 4 and records[2].tie and records[3].ranking == [1, 0]
