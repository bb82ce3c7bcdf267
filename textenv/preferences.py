"""Stage 2, data: sample K completions per prompt and record which ones people (or simulated people) prefer.

InstructGPT asked labellers to *rank* K completions of a prompt rather than score them, because rankings
agree across people far better than absolute scores; every ranking of K is worth K(K-1)/2 pairwise
comparisons for a Bradley–Terry reward model. This module holds

* the one JSONL schema for pairwise and K-wise preference records (`PreferenceRecord`), with a strict
  loader that names the file and line of any malformed record;
* `sample_completions`: K samples per prompt from the LM (plain softmax sampling, so the completions
  follow the reference policy the RM will later be normalised on);
* `SimulatedAnnotators`: noisy people. Each annotator sees the hidden gold reward perturbed by its own
  fixed per-text opinion (``disagreement``) and chooses with Bradley–Terry / Plackett–Luce noise
  (``temperature``), so labels are realistic: mostly right, sometimes not, and annotators disagree;
* `expand_to_pairs` and `agreement_with_gold`, which turn records into (chosen, rejected) pairs and
  measure how often labels agree with the gold reward (the ceiling a perfect RM could reach on them).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from textenv.tasks.base import Task

SOURCES = ("simulated", "human")
_FIELDS = {"id", "prompt", "completions", "ranking", "tie", "skip", "annotator", "source", "meta"}


class PreferenceFormatError(ValueError):
    """A preference or sample file is empty, or one of its lines is malformed (the message says which)."""


@dataclass
class PreferenceRecord:
    """One judgement of K >= 2 completions of one prompt (one JSONL line).

    :ivar id: unique key of the comparison (labelling resumes by it); optional in files.
    :ivar prompt: the prompt text.
    :ivar completions: the K completion texts (prompt not included).
    :ivar ranking: indices into ``completions``, best first. A full ranking lists all K; a shorter list
        ranks the listed ones above all unlisted ones (``[2]`` = "the third is best"), unlisted ones being
        unordered. Pairwise (K=2) is ``[winner]`` or ``[winner, loser]``. Empty for ties, skips and
        unlabelled samples.
    :ivar tie: all K completions were judged equally good.
    :ivar skip: shown but not judged (kept so a resumed labelling session does not ask again).
    :ivar annotator: who labelled it (``"sim-0"``, a user name).
    :ivar source: ``"simulated"`` or ``"human"``.
    :ivar meta: free-form extra information (kept, never interpreted).
    """

    prompt: str
    completions: list[str]
    ranking: list[int] = field(default_factory=list)
    tie: bool = False
    skip: bool = False
    annotator: str = ""
    source: str = "human"
    id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def labelled(self) -> bool:
        return bool(self.ranking) or self.tie or self.skip

    def to_json(self) -> str:
        obj: dict[str, Any] = {"id": self.id, "prompt": self.prompt, "completions": self.completions}
        if self.labelled:
            obj.update(
                ranking=self.ranking,
                tie=self.tie,
                skip=self.skip,
                annotator=self.annotator,
                source=self.source,
            )
        if self.meta:
            obj["meta"] = self.meta
        if self.id is None:
            del obj["id"]
        return json.dumps(obj, ensure_ascii=False)

    @classmethod
    def from_dict(cls, obj: Any, require_label: bool = True) -> PreferenceRecord:
        """Validate and build a record; raises ``ValueError`` with a message saying what is wrong."""
        if not isinstance(obj, dict):
            raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
        unknown = set(obj) - _FIELDS
        if unknown:
            raise ValueError(f"unknown field(s) {sorted(unknown)}; allowed: {sorted(_FIELDS)}")
        for name in ("prompt", "completions"):
            if name not in obj:
                raise ValueError(f"missing field {name!r}")
        prompt, completions = obj["prompt"], obj["completions"]
        if not isinstance(prompt, str):
            raise ValueError("'prompt' must be a string")
        if (
            not isinstance(completions, list)
            or len(completions) < 2
            or not all(isinstance(c, str) for c in completions)
        ):
            raise ValueError("'completions' must be a list of at least 2 strings")
        ranking, tie, skip = obj.get("ranking", []), obj.get("tie", False), obj.get("skip", False)
        if not isinstance(tie, bool) or not isinstance(skip, bool):
            raise ValueError("'tie' and 'skip' must be true or false")
        if not isinstance(ranking, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in ranking
        ):
            raise ValueError("'ranking' must be a list of integer indices into 'completions'")
        for i in ranking:
            if not 0 <= i < len(completions):
                raise ValueError(f"unknown completion id {i} in 'ranking' (valid: 0..{len(completions) - 1})")
        if len(set(ranking)) != len(ranking):
            raise ValueError(f"'ranking' {ranking} lists a completion twice")
        if (tie or skip) and ranking:
            raise ValueError("a tie or skip record must have an empty 'ranking'")
        if tie and skip:
            raise ValueError("a record cannot be both a tie and a skip")
        if require_label and not (ranking or tie or skip):
            raise ValueError("missing field 'ranking' (or 'tie': true / 'skip': true)")
        source = obj.get("source", "human")
        if source not in SOURCES:
            raise ValueError(f"'source' must be one of {SOURCES}, got {source!r}")
        annotator, rid, meta = obj.get("annotator", ""), obj.get("id"), obj.get("meta", {})
        if (
            not isinstance(annotator, str)
            or not (rid is None or isinstance(rid, str))
            or not isinstance(meta, dict)
        ):
            raise ValueError("'annotator' and 'id' must be strings and 'meta' an object")
        return cls(prompt, list(completions), list(ranking), tie, skip, annotator, source, rid, dict(meta))


def _load(path: str | Path, require_label: bool) -> list[PreferenceRecord]:
    path = Path(path)
    if not path.is_file():
        raise PreferenceFormatError(f"{path}: file does not exist")
    records: list[PreferenceRecord] = []
    seen: set[str] = set()
    with path.open("rb") as fh:  # decoded line by line, so that bytes that are not UTF-8 name their line
        for line_no, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise PreferenceFormatError(f"{path}:{line_no}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
            if not line.strip():
                continue
            try:
                record = PreferenceRecord.from_dict(json.loads(line), require_label=require_label)
            except json.JSONDecodeError as exc:
                raise PreferenceFormatError(f"{path}:{line_no}: invalid JSON ({exc.msg})") from None
            except ValueError as exc:
                raise PreferenceFormatError(f"{path}:{line_no}: {exc}") from None
            if record.id is not None:
                if record.id in seen:
                    raise PreferenceFormatError(f"{path}:{line_no}: duplicate id {record.id!r}")
                seen.add(record.id)
            records.append(record)
    if not records:
        raise PreferenceFormatError(f"{path}: file has no records")
    return records


def load_preferences(path: str | Path) -> list[PreferenceRecord]:
    """Read a labelled preference JSONL file (see docs/stages.md for the schema).

    :raises PreferenceFormatError: missing file, empty file, or a bad line (``"{path}:{line}: ..."``).
    """
    return _load(path, require_label=True)


def load_samples(path: str | Path) -> list[PreferenceRecord]:
    """Read a sample file: records with ``prompt`` and ``completions``; labels, if present, are kept."""
    return _load(path, require_label=False)


def write_records(records: Iterable[PreferenceRecord], path: str | Path) -> Path:
    """Write records as JSONL (overwrites ``path``); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(record.to_json() + "\n")
    return path


# ------------------------------------------------------------------------------------------------ pairs
@dataclass(frozen=True)
class PreferencePair:
    """One pairwise comparison from a record: ``chosen`` beat ``rejected`` (or tied with it)."""

    prompt: str
    chosen: str
    rejected: str
    tie: bool = False
    annotator: str = ""
    record_index: int = -1


def ranking_pairs(ranking: Sequence[int], k: int) -> list[tuple[int, int]]:
    """All (better, worse) index pairs implied by a (possibly partial) ranking of ``k`` items."""
    listed = list(ranking)
    unlisted = [i for i in range(k) if i not in set(listed)]
    pairs = [(listed[a], listed[b]) for a in range(len(listed)) for b in range(a + 1, len(listed))]
    return pairs + [(i, j) for i in listed for j in unlisted]


def expand_to_pairs(records: Sequence[PreferenceRecord], include_ties: bool = False) -> list[PreferencePair]:
    """Expand K-wise records into their pairwise comparisons (InstructGPT-style: a ranking of K gives
    K(K-1)/2 pairs). Skipped records give none; ties give all pairs with ``tie=True`` if ``include_ties``.

    :param records: labelled records.
    :param include_ties: keep tie pairs (a Bradley–Terry loss would give them target 1/2).
    """
    pairs: list[PreferencePair] = []
    for index, r in enumerate(records):
        if r.skip:
            continue
        k = len(r.completions)
        if r.tie:
            if include_ties:
                pairs += [
                    PreferencePair(r.prompt, r.completions[i], r.completions[j], True, r.annotator, index)
                    for i in range(k) for j in range(i + 1, k)
                ]  # fmt: skip
            continue
        for i, j in ranking_pairs(r.ranking, k):
            pairs.append(
                PreferencePair(r.prompt, r.completions[i], r.completions[j], False, r.annotator, index)
            )
    return pairs


def agreement_with_gold(
    pairs: Sequence[PreferencePair],
    task: Task,
    scores: Callable[[list[str], list[str]], np.ndarray] | None = None,
) -> float:
    """How often a judge prefers the completion with the higher gold reward, on pairs whose gold differs.

    :param pairs: comparisons (ties are ignored).
    :param task: gives the gold reward.
    :param scores: if given, a function ``(prompts, completions) -> scores`` (an RM) is the judge;
        otherwise the pairs' own labels are (the annotators' agreement with the gold reward).
    :returns: the agreement in [0, 1], or ``nan`` when no pair has distinct gold rewards.
    """
    pairs = [p for p in pairs if not p.tie]
    prompts = [p.prompt for p in pairs]
    g_chosen = task.gold_reward(prompts, [p.chosen for p in pairs])
    g_rejected = task.gold_reward(prompts, [p.rejected for p in pairs])
    informative = np.abs(g_chosen - g_rejected) > 1e-9
    if not informative.any():
        return float("nan")
    if scores is None:
        judged = np.ones(len(pairs), dtype=bool)
    else:
        judged = np.asarray(scores(prompts, [p.chosen for p in pairs])) > np.asarray(
            scores(prompts, [p.rejected for p in pairs])
        )
    gold = g_chosen > g_rejected
    return float((judged == gold)[informative].mean())


# ------------------------------------------------------------------------------------------------ sampling
def sample_completions(
    lm: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    k: int,
    max_new_tokens: int,
    seed: int = 0,
    temperature: float = 1.0,
    batch_size: int = 256,
    progress: bool = False,
) -> list[list[str]]:
    """``k`` sampled completions (text after the prompt, up to ``<eos>``, special tokens dropped) per prompt.

    Plain softmax sampling (no top-k/top-p) so the completions follow the LM itself: the reference policy.

    :param lm: a causal LM (Hugging Face).
    :param tokenizer: its tokenizer (left padding is used for the batch).
    :param seed: seeds the sampling; the same seed gives the same completions on CPU.
    """
    import torch

    from textenv.models import padding_id, seeded_rng

    if k < 1:
        raise ValueError("k must be >= 1")
    flat = [p for p in prompts for _ in range(k)]
    pad_id = padding_id(tokenizer)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    texts: list[str] = []
    try:
        with seeded_rng(seed, lm.device), torch.no_grad():
            for start in tqdm(
                range(0, len(flat), batch_size), desc="sample", disable=not progress, leave=False
            ):
                enc = tokenizer(
                    flat[start : start + batch_size],
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=False,
                )
                enc = {key: v.to(lm.device) for key, v in enc.items()}
                out = lm.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                    pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id,
                )  # fmt: skip
                texts += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    texts = [t.strip() for t in texts]
    return [texts[i * k : (i + 1) * k] for i in range(len(prompts))]


def make_samples(
    prompts: Sequence[str], completions: Sequence[Sequence[str]], id_prefix: str = "s"
) -> list[PreferenceRecord]:
    """Unlabelled records (one per prompt, with ids ``{prefix}-000000``...) for labelling."""
    return [
        PreferenceRecord(prompt=p, completions=list(c), id=f"{id_prefix}-{i:06d}")
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True))
    ]


# ------------------------------------------------------------------------------------------------ annotators
class SimulatedAnnotators:
    """A pool of noisy annotators who rank completions by a task's gold reward.

    Annotator ``a`` values text ``x`` at ``u_a(x) = gold(x) + disagreement * z_a(x)``, where ``z_a(x)`` is a
    standard normal fixed per (annotator, text): its own stable opinion, so annotators disagree with each
    other and with the gold in a consistent way. It then ranks by Plackett–Luce: sort by
    ``u_a(x) / temperature + Gumbel noise``; for two completions this is exactly Bradley–Terry,
    ``P(x beats y) = sigmoid((u_a(x) - u_a(y)) / temperature)``.

    :param task: supplies the gold reward and ``join``.
    :param n_annotators: size of the pool; each record goes to one annotator chosen at random.
    :param temperature: choice noise (0 = always pick the higher utility).
    :param disagreement: scale of each annotator's own opinion (0 = everyone shares the gold reward).
    :param tie_margin: for K=2, call it a tie when the utilities differ by less than this (default: never).
    :param seed: seeds opinions and choices.
    """

    def __init__(
        self,
        task: Task,
        n_annotators: int = 5,
        temperature: float = 0.3,
        disagreement: float = 0.15,
        tie_margin: float = 0.0,
        seed: int = 0,
    ) -> None:
        if n_annotators < 1 or temperature < 0 or disagreement < 0 or tie_margin < 0:
            raise ValueError("need n_annotators >= 1 and non-negative temperature, disagreement, tie_margin")
        self.task = task
        self.n_annotators = n_annotators
        self.temperature = temperature
        self.disagreement = disagreement
        self.tie_margin = tie_margin
        self.seed = seed
        self._rng = np.random.default_rng([seed, 7])

    def utilities(self, annotator: int, prompt: str, completions: Sequence[str]) -> np.ndarray:
        """Annotator ``annotator``'s values of each completion of ``prompt``."""
        gold = self.task.gold_reward([prompt] * len(completions), list(completions))
        opinion = [
            np.random.default_rng(
                [self.seed, annotator, zlib.crc32(self.task.join(prompt, c).encode())]
            ).standard_normal()
            for c in completions
        ]
        return gold + self.disagreement * np.asarray(opinion)

    def judge(self, record: PreferenceRecord) -> PreferenceRecord:
        """A labelled copy of ``record`` (a full ranking, or a tie), by a randomly chosen annotator."""
        annotator = int(self._rng.integers(self.n_annotators))
        u = self.utilities(annotator, record.prompt, record.completions)
        common = dict(annotator=f"sim-{annotator}", source="simulated", id=record.id, meta=dict(record.meta))
        if len(u) == 2 and abs(u[0] - u[1]) < self.tie_margin:
            return PreferenceRecord(record.prompt, list(record.completions), tie=True, **common)
        noisy = u / self.temperature + self._rng.gumbel(size=len(u)) if self.temperature > 0 else u
        ranking = [int(i) for i in np.argsort(-noisy, kind="stable")]
        return PreferenceRecord(record.prompt, list(record.completions), ranking=ranking, **common)

    def label(self, samples: Sequence[PreferenceRecord], progress: bool = False) -> list[PreferenceRecord]:
        """Label every sample record."""
        return [self.judge(r) for r in tqdm(samples, desc="annotate", disable=not progress, leave=False)]
