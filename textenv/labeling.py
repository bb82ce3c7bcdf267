"""Stage 2 by people: label LM completions in the terminal.

``textenv label samples.jsonl labels.jsonl`` shows a prompt with its K completions and asks which is best
(K = 2) or for a ranking (K > 2); ``t`` records a tie, ``s`` a skip, ``q`` quits. Human labels are
expensive, so every answer is appended to the output file, flushed and fsync'ed before the next question
is asked: Ctrl-C, a closed terminal or a crash lose nothing that was answered, and the next run skips
every sample already in the output file and carries on where the last one stopped.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from textenv.preferences import PreferenceFormatError, PreferenceRecord


@dataclass
class LabelSession:
    """What one labelling run did: ``written`` new records, ``remaining`` unlabelled samples, whether it
    ended by interrupt (Ctrl-C) rather than by ``q``, end of input or running out of samples."""

    written: int
    remaining: int
    interrupted: bool


def sample_key(record: PreferenceRecord) -> str:
    """What identifies a sample across runs: its id, else its prompt and completions."""
    return record.id if record.id is not None else json.dumps([record.prompt, record.completions])


def mend_torn_last_line(path: Path) -> None:
    """A labels file whose last line has no newline was cut mid-write (power loss, full disk): each label is
    appended with its newline and flushed. If that line is a whole record, end it with its newline (the next
    label would be glued to it); else move its bytes to ``<file>.torn`` and cut it off, with a warning, so
    labelling resumes (that one label is asked again) and nothing is deleted."""
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    try:
        json.loads(data[cut:])
    except ValueError:
        torn = path.with_name(path.name + ".torn")
        with torn.open("ab") as fh:  # appended: an earlier session's torn line stays there too
            fh.write(data[cut:] + b"\n")
        with path.open("r+b") as fh:
            fh.truncate(cut)
        warnings.warn(f"{path}: its last line was cut mid-write; moved to {torn}, that sample will be asked again", stacklevel=3)
        return
    with path.open("ab") as fh:
        fh.write(b"\n")


def labelled_keys(path: str | Path) -> set[str]:
    """Keys of the samples already in an output file (missing file: none); mends a torn last line first
    (`mend_torn_last_line`).

    :raises PreferenceFormatError: a line of the file is malformed (names file and line).
    """
    path = Path(path)
    keys: set[str] = set()
    if not path.exists():
        return keys
    mend_torn_last_line(path)
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                keys.add(sample_key(PreferenceRecord.from_dict(json.loads(line), require_label=True)))
            except (json.JSONDecodeError, ValueError) as exc:
                raise PreferenceFormatError(f"{path}:{line_no}: {exc}") from None
    return keys


def parse_answer(answer: str, k: int) -> list[int] | str | None:
    """Turn a typed answer into a ranking (0-based, best first), ``"tie"``, ``"skip"``, ``"quit"``, or None.

    For K = 2, ``1`` or ``2`` names the better one. For K > 2, ``2 1 3`` (or ``2,1,3``, or ``213`` while K < 10)
    is a ranking, best first; a single number names the best only (it is ranked above the others, which stay
    unordered). From K = 10 on, ``12`` is the twelfth completion, not a ranking of the first two.
    """
    text = answer.strip().lower()
    if text in ("t", "tie"):
        return "tie"
    if text in ("s", "skip"):
        return "skip"
    if text in ("q", "quit"):
        return "quit"
    text = text.replace(",", " ")
    tokens = text.split() if " " in text or k >= 10 else list(text)
    if not tokens or not all(t.isdigit() for t in tokens):
        return None
    ranking = [int(t) - 1 for t in tokens]
    if any(not 0 <= i < k for i in ranking) or len(set(ranking)) != len(ranking):
        return None
    if k == 2 and len(ranking) == 1:
        ranking.append(1 - ranking[0])
    return ranking


def _append(path: Path, record: PreferenceRecord) -> None:
    with path.open("a", encoding="utf-8") as fh:
        fh.write(record.to_json() + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def label_interactively(
    samples: Sequence[PreferenceRecord],
    out_path: str | Path,
    annotator: str = "human",
    input: TextIO | None = None,
    output: TextIO | None = None,
) -> LabelSession:
    """Ask for a label for each sample not yet in ``out_path``, appending each answer at once.

    :param samples: unlabelled records (prompt and K completions), e.g. from ``textenv sample``.
    :param out_path: the JSONL file to append labelled records to (created if missing).
    :param annotator: stored in each record's ``annotator`` field.
    :param input: where answers are read from (default standard input).
    :param output: where prompts are written (default standard output).
    """
    input = input or sys.stdin
    output = output or sys.stdout
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = labelled_keys(out_path)
    todo = [s for s in samples if sample_key(s) not in done]
    written = 0
    output.write(f"{len(samples) - len(todo)} of {len(samples)} samples already labelled in {out_path}\n")
    try:
        for number, sample in enumerate(todo, start=1):
            k = len(sample.completions)
            output.write(f"\n[{number}/{len(todo)}] {sample.prompt}\n")
            for i, completion in enumerate(sample.completions, start=1):
                output.write(f"  {i}) {completion}\n")
            ask = "Which is better? 1/2" if k == 2 else f"Rank best first (e.g. {' '.join(map(str, range(1, k + 1)))}) or name the best"
            while True:
                output.write(f"{ask}, t=tie, s=skip, q=quit > ")
                output.flush()
                line = input.readline()
                if not line:  # end of input: stop like q
                    return LabelSession(written, len(todo) - number + 1, False)
                answer = parse_answer(line, k)
                if answer is not None:
                    break
                output.write(f"  not understood: {line.strip()!r}\n")
            if answer == "quit":
                return LabelSession(written, len(todo) - number + 1, False)
            record = PreferenceRecord(
                prompt=sample.prompt, completions=list(sample.completions), ranking=answer if isinstance(answer, list) else [],
                tie=answer == "tie", skip=answer == "skip", annotator=annotator, source="human", id=sample.id,
                meta=dict(sample.meta),
            )  # fmt: skip
            _append(out_path, record)
            written += 1
    except KeyboardInterrupt:
        output.write(f"\ninterrupted: {written} new labels are saved in {out_path}; run again to resume\n")
        output.flush()
        return LabelSession(written, len(todo) - written, True)
    output.write(f"\nall samples labelled; {written} new labels in {out_path}\n")
    return LabelSession(written, 0, False)
