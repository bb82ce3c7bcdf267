"""Stage 2, model: a reward model trained with the Bradley–Terry loss on preference pairs.

Following InstructGPT (Ouyang et al. 2022), each ranking of K completions is expanded to its K(K-1)/2
pairs and the RM ``r`` is trained to make ``P(chosen beats rejected) = sigmoid(r(chosen) - r(rejected))``
likely. The RM is a sequence classifier with one output that reads ``prompt + completion`` (joined the way
the task joins them) and is read at the last real token; it starts from the pretrained LM's trunk (the
usual choice: the RM then already "knows the language") or from scratch.

A Bradley–Terry RM is only defined up to a constant, so after training we measure its scores on samples
from the reference LM and store their mean and standard deviation in the saved config as
``textenv_reward_mean`` / ``textenv_reward_std``. The weights are left untouched, so any library can load
the folder as a plain ``AutoModelForSequenceClassification``; textenv's scorer applies the normalisation so
the reference policy's rewards have mean 0 and std 1 (what PPO's reward scale assumes).

We report the held-out pairwise accuracy next to the simulated annotators' own agreement with the gold
reward on the same pairs: noisy labels cap what any RM can reach, so that agreement is the yardstick.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase

from textenv.models import (
    ModelLoadError,
    build_tiny_reward_model,
    check_model_source,
    encode_truncating_left,
    position_limit,
    save_model_folder,
    seeded_rng,
    tiny_gpt2_config,
)
from textenv.preferences import PreferenceRecord, expand_to_pairs, ranking_pairs
from textenv.tasks.base import Task

METRICS_FILE = "textenv_reward_model.json"


@dataclass
class RMResult:
    """What stage 2 produced and how good it is (accuracies in [0, 1]).

    :ivar heldout_accuracy: how often the RM prefers the labelled winner on held-out pairs; with a task,
        on the pairs whose gold rewards differ (the same pairs as the two agreements below).
    :ivar heldout_accuracy_all: the same on all held-out pairs. Equal scores count as half right (identical
        completions always tie).
    :ivar annotator_gold_agreement: how often the held-out *labels* agree with the gold reward (the yardstick).
    :ivar rm_gold_agreement: how often the RM agrees with the gold reward on those pairs.
    :ivar mean: mean raw RM score on reference samples (stored as ``textenv_reward_mean``).
    :ivar std: their standard deviation (stored as ``textenv_reward_std``).
    """

    heldout_accuracy: float
    heldout_accuracy_all: float
    annotator_gold_agreement: float | None
    rm_gold_agreement: float | None
    mean: float
    std: float
    n_train_pairs: int
    n_heldout_pairs: int
    steps: int
    seconds: float
    out_dir: Path | None = None
    model: PreTrainedModel | None = field(default=None, repr=False)

    def summary(self) -> str:
        text = f"RM held-out pairwise accuracy {self.heldout_accuracy:.3f}"
        if self.annotator_gold_agreement is not None:
            text += f" (annotators' agreement with gold {self.annotator_gold_agreement:.3f}, RM's {self.rm_gold_agreement:.3f})"
        return text + f", {self.n_train_pairs} train pairs, {self.steps} steps in {self.seconds:.1f}s"


# ------------------------------------------------------------------------------------------------ scoring
def _right_pad(seqs: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[row, : len(s)] = 1
    return ids, mask


def _scores(model: PreTrainedModel, seqs: Sequence[list[int]], pad_id: int) -> torch.Tensor:
    """Raw scores at each sequence's last real token. Right padding keeps positions those of the unpadded
    text; GPT-2's classifier pools at the last non-pad token (``config.pad_token_id`` must be set)."""
    ids, mask = _right_pad(seqs, pad_id)
    return model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits[:, 0].float()


def _encode(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids as `textenv.rewards.RewardModelScorer` scores them: with the tokenizer's special tokens (a BOS,
    say), and a text too long for the RM cut on the left by the tokenizer, which keeps those tokens (the score is
    read at the last token)."""
    encoded = encode_truncating_left(tokenizer, texts, max_length=max_length)["input_ids"]
    for text, ids in zip(texts, encoded, strict=True):
        if not ids:
            raise ValueError(f"text {text!r} has no tokens")
    return [list(ids) for ids in encoded]


@torch.no_grad()
def score_texts(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], batch_size: int = 256
) -> np.ndarray:
    """Raw (unnormalised) RM scores of full texts, read at the last real token.

    :param model: a sequence classifier with one output.
    :param texts: prompt and completion already joined.
    """
    model.eval()
    max_length = position_limit(model) or 1024
    seqs = _encode(tokenizer, texts, max_length)
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    out = [_scores(model, seqs[i : i + batch_size], pad_id).cpu() for i in range(0, len(seqs), batch_size)]
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


def _init_model(
    init_from: str | Path | PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase,
    config_overrides: dict[str, Any],
    seed: int,
) -> PreTrainedModel:
    if isinstance(init_from, PreTrainedModel):
        return init_from
    if init_from is None:
        overrides = {"n_positions": 64, **config_overrides}
        config = tiny_gpt2_config(
            len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **overrides,
        )
        return build_tiny_reward_model(config, seed=seed)
    check_model_source(init_from)  # a missing local folder is named as such; a hub name goes to from_pretrained
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "score.weight newly initialised" is expected here
    try:
        with seeded_rng(seed):  # the new score head, on the CPU
            # float32 whatever the folder's dtype (transformers loads a bf16 checkpoint as bf16): AdamW's updates
            # would round away in bf16 weights.
            model = AutoModelForSequenceClassification.from_pretrained(
                str(init_from), num_labels=1, use_safetensors=True, dtype=torch.float32
            )
    except Exception as exc:
        raise ModelLoadError(f"cannot initialise a reward model from {str(init_from)!r}: {exc}") from exc
    finally:
        transformers.logging.set_verbosity(verbosity)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _split_records(
    records: Sequence[PreferenceRecord], heldout_fraction: float, seed: int
) -> tuple[list, list]:
    """Split by prompt, so held-out pairs never share a prompt with training pairs.

    With a single prompt (e.g. every record is an unconditional ``"review :"``) there is nothing to split
    by, so whole records are split instead.
    """
    prompts = sorted({r.prompt for r in records})
    rng = np.random.default_rng([seed, 3])
    if len(prompts) < 2:
        held_idx = set(rng.permutation(len(records))[: int(round(heldout_fraction * len(records)))].tolist())
        return [r for i, r in enumerate(records) if i not in held_idx], [r for i, r in enumerate(records) if i in held_idx]
    held = set(rng.permutation(prompts)[: int(round(heldout_fraction * len(prompts)))].tolist())
    return [r for r in records if r.prompt not in held], [r for r in records if r.prompt in held]


# ------------------------------------------------------------------------------------------------ training
def train_reward_model(
    records: Sequence[PreferenceRecord],
    tokenizer: PreTrainedTokenizerBase,
    task: Task | None = None,
    join: Callable[[str, str], str] | None = None,
    init_from: str | Path | PreTrainedModel | None = None,
    config_overrides: dict[str, Any] | None = None,
    heldout_fraction: float = 0.2,
    steps: int = 600,
    batch_size: int = 16,
    lr: float = 2e-3,
    seed: int = 0,
    normalize_texts: Sequence[str] | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> RMResult:
    """Train a Bradley–Terry reward model on preference records, normalise it, measure it, save it.

    :param records: labelled records (pairwise or K-wise; ties and skips are left out of the loss).
    :param tokenizer: tokenizer for the RM's text (saved with it).
    :param task: if given, its ``join`` builds the text and its gold reward is used to report agreements.
    :param join: how to join prompt and completion when there is no task (default: one space).
    :param init_from: an LM folder or hub name (its trunk, with a new score head, in float32 whatever the
        checkpoint's dtype), a model, or None (a new tiny GPT-2).
    :param config_overrides: `tiny_gpt2_config` arguments when starting from scratch.
    :param heldout_fraction: fraction of prompts whose pairs are held out for the accuracy report.
    :param steps: optimiser steps of ``batch_size`` records each (all pairs of a record in one step).
    :param lr: AdamW learning rate (linear decay to 10%).
    :param seed: seeds the score head, batch order and split.
    :param normalize_texts: full texts sampled from the reference LM for the mean/std; default: all
        training completions (which are reference samples when they come from ``textenv preferences``).
    :param out_dir: if given, the RM folder (``save_pretrained``, tokenizer, ``textenv_reward_model.json``).
    :param progress: show a tqdm progress bar.
    :param device: train there (default: where ``init_from`` is, or the CPU). A new model or score head is
        initialised on the CPU either way, so a seed gives the same initial weights on any device.
    :raises ValueError: no usable training pairs.
    """
    started = time.perf_counter()
    join = task.join if task is not None else (join or (lambda p, c: f"{p} {c}".strip()))
    train_records, held_records = _split_records(records, heldout_fraction, seed)
    train_pairs, held_pairs = expand_to_pairs(train_records), expand_to_pairs(held_records)
    if not train_pairs:
        raise ValueError("no training pairs: the records are all ties or skips, or there are too few prompts")
    model = _init_model(init_from, tokenizer, config_overrides or {}, seed)
    if device is not None:
        model = model.to(device)
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    max_length = position_limit(model) or 1024

    # Every record becomes (text ids of its K completions, its (better, worse) pairs); a batch is a set of
    # records, so each completion is scored once however many pairs it is in (InstructGPT's trick).
    texts: dict[str, int] = {}
    groups: list[tuple[list[int], list[tuple[int, int]]]] = []
    for r in train_records:
        if r.skip or r.tie:
            continue
        ids = [texts.setdefault(join(r.prompt, c), len(texts)) for c in r.completions]
        groups.append((ids, ranking_pairs(r.ranking, len(ids))))
    seqs = _encode(tokenizer, list(texts), max_length)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - 0.9 * s / max(1, steps))
    rng = np.random.default_rng([seed, 4])
    model.train()
    with seeded_rng(seed, model.device):
        for _ in tqdm(range(steps), desc="train RM", disable=not progress, leave=False):
            picked = [groups[i] for i in rng.integers(0, len(groups), size=batch_size)]
            flat = [t for ids, _ in picked for t in ids]
            scores = _scores(model, [seqs[t] for t in flat], pad_id)
            better, worse, offset = [], [], 0
            for ids, pairs in picked:
                better += [offset + i for i, _ in pairs]
                worse += [offset + j for _, j in pairs]
                offset += len(ids)
            loss = -torch.nn.functional.logsigmoid(scores[better] - scores[worse]).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
    model.eval()

    # --- normalisation on reference samples
    ref_texts = list(normalize_texts) if normalize_texts is not None else list(texts)
    ref_scores = score_texts(model, tokenizer, ref_texts)
    mean, std = float(ref_scores.mean()), float(ref_scores.std()) or 1.0
    model.config.textenv_reward_mean = mean
    model.config.textenv_reward_std = std

    # --- held-out evaluation
    held_pairs = [p for p in held_pairs if not p.tie]
    acc = acc_all = float("nan")
    annotator_agree = rm_agree = None
    if held_pairs:
        chosen = score_texts(model, tokenizer, [join(p.prompt, p.chosen) for p in held_pairs])
        rejected = score_texts(model, tokenizer, [join(p.prompt, p.rejected) for p in held_pairs])
        # A tie counts as half right, as a coin flip would score: identical completions (common in small text
        # worlds) always score the same, and counting those as wrong pushed the accuracy below chance.
        rm_right = (chosen > rejected) + 0.5 * (chosen == rejected)
        acc = acc_all = float(rm_right.mean())
        if task is not None:
            prompts = [p.prompt for p in held_pairs]
            g_c = task.gold_reward(prompts, [p.chosen for p in held_pairs])
            g_r = task.gold_reward(prompts, [p.rejected for p in held_pairs])
            informative = np.abs(g_c - g_r) > 1e-9
            if informative.any():
                acc = float(rm_right[informative].mean())
                annotator_agree = float((g_c > g_r)[informative].mean())
                rm_agree = float(((chosen > rejected) == (g_c > g_r))[informative].mean())
    result = RMResult(
        heldout_accuracy=acc,
        heldout_accuracy_all=acc_all,
        annotator_gold_agreement=annotator_agree,
        rm_gold_agreement=rm_agree,
        mean=mean,
        std=std,
        n_train_pairs=len(train_pairs),
        n_heldout_pairs=len(held_pairs),
        steps=steps,
        seconds=time.perf_counter() - started,
        model=model,
    )
    if out_dir is not None:
        result.out_dir = save_model_folder(out_dir, model, tokenizer, METRICS_FILE, result)
    return result
