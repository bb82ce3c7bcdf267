"""Stage 1 of RLHF: train (or fine-tune) a causal language model on a corpus.

The seed's pipeline starts from a pretrained LM. Offline, we make one: a tiny GPT-2 trained with a plain
AdamW loop on a task's generated corpus (or on a user's own text or JSONL file) to predict the next token,
with ``<eos>`` appended to every document so the LM learns to stop. The loop is short on purpose (CPU,
two cores, about a minute for the sentiment task); what matters for the later stages is that it is
reproducible (seeded) and that it reports held-out perplexity next to the uniform baseline (the
vocabulary size), which says how much it has learned.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from textenv.models import (
    build_tiny_causal_lm,
    padding_id,
    position_limit,
    save_model_folder,
    seeded_rng,
    tiny_gpt2_config,
)
from textenv.tasks.base import Task

METRICS_FILE = "textenv_pretrain.json"


class CorpusFormatError(ValueError):
    """A corpus file is empty or a line of it is malformed."""


@dataclass
class PretrainResult:
    """What stage 1 produced and how good it is.

    :ivar perplexity: held-out perplexity per predicted token (``<eos>`` included).
    :ivar uniform_perplexity: the perplexity of guessing uniformly over the vocabulary (its size).
    :ivar train_loss: mean cross-entropy of the last 10% of steps.
    :ivar out_dir: where model and tokenizer were saved (None if not saved).
    """

    perplexity: float
    uniform_perplexity: float
    train_loss: float
    steps: int
    seconds: float
    n_train_docs: int
    n_heldout_docs: int
    out_dir: Path | None = None
    model: PreTrainedModel | None = field(default=None, repr=False)

    def summary(self) -> str:
        return (
            f"held-out perplexity {self.perplexity:.2f} (uniform {self.uniform_perplexity:.0f}), "
            f"{self.steps} steps in {self.seconds:.1f}s"
        )


# ------------------------------------------------------------------------------------------------ corpus
def read_corpus_file(path: str | Path) -> list[str]:
    """Read a user's corpus: JSONL with a ``"text"`` field per line (``.jsonl``), else one document per line.

    :param path: the file; blank lines are ignored.
    :raises CorpusFormatError: the file has no documents or a JSONL line is malformed (names file and line).
    """
    path = Path(path)
    if not path.is_file():
        raise CorpusFormatError(f"{path}: corpus file does not exist")
    docs: list[str] = []
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise CorpusFormatError(f"{path}:{line_no}: invalid JSON ({exc.msg})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise CorpusFormatError(
                        f"{path}:{line_no}: expected an object with a string field 'text'"
                    )
                docs.append(obj["text"])
            else:
                docs.append(line.rstrip("\n"))
    if not docs:
        raise CorpusFormatError(f"{path}: corpus file has no documents")
    return docs


def encode_documents(
    texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> list[list[int]]:
    """Token ids of each document with the EOS id appended, truncated to ``max_length`` tokens.

    :param max_length: the model's context size; longer documents keep their first tokens (and lose EOS).
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; the LM could not learn to stop")
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [(ids + [tokenizer.eos_token_id])[:max_length] for ids in encoded if ids]


def _batch(docs: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and labels (-100 on padding) for a list of documents."""
    length = max(len(d) for d in docs)
    ids = torch.full((len(docs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(docs), length), dtype=torch.long)
    for row, doc in enumerate(docs):
        ids[row, : len(doc)] = torch.tensor(doc)
        mask[row, : len(doc)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


@torch.no_grad()
def heldout_perplexity(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], batch_size: int = 128
) -> float:
    """Perplexity per predicted token (every token after the first, EOS included) on ``texts``.

    :param model: a causal LM; it is put in eval mode. Documents longer than its positions (`position_limit`:
        ``n_positions`` or ``max_position_embeddings``) keep their first tokens, as in training.
    """
    model.eval()
    docs = encode_documents(texts, tokenizer, position_limit(model) or 10**9)
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(docs), batch_size):
        ids, mask, labels = _batch(docs[start : start + batch_size], tokenizer.pad_token_id or 0)
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits[:, :-1]
        target = labels[:, 1:].to(model.device)
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), reduction="sum"
        )
        total_nll += float(nll)
        total_tokens += int((target != -100).sum())
    if total_tokens == 0:
        raise ValueError("no held-out tokens to measure perplexity on")
    return math.exp(total_nll / total_tokens)


# ------------------------------------------------------------------------------------------------ training
def pretrain_lm(
    texts: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    heldout_texts: Sequence[str] | None = None,
    model: PreTrainedModel | None = None,
    config_overrides: dict[str, Any] | None = None,
    steps: int = 1000,
    batch_size: int = 64,
    lr: float = 3e-3,
    warmup_steps: int = 50,
    seed: int = 0,
    out_dir: str | Path | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> PretrainResult:
    """Train a causal LM on ``texts`` by next-token prediction, report held-out perplexity, optionally save.

    :param texts: training documents; each gets ``<eos>`` appended.
    :param tokenizer: the tokenizer (saved next to the model).
    :param heldout_texts: documents for perplexity; default: the last 5% of ``texts`` (held out of training).
    :param model: a causal LM to fine-tune; default: a new tiny GPT-2 sized to the tokenizer.
    :param config_overrides: keyword arguments for `tiny_gpt2_config` (``n_embd``, ``n_layer``, ...).
    :param steps: optimiser steps; each draws ``batch_size`` documents at random.
    :param lr: peak AdamW learning rate (linear warm-up, then cosine decay to 10%).
    :param seed: seeds the model initialisation and batch order (same seed, same model on CPU).
    :param out_dir: if given, ``save_pretrained`` writes model, tokenizer and ``textenv_pretrain.json`` there.
    :param progress: show a tqdm progress bar.
    :param device: train there (default: where ``model`` is; a new model starts on the CPU). The model is built
        and seeded on the CPU either way, so a seed gives the same initial weights on any device.
    """
    texts = list(texts)
    if heldout_texts is None:
        n_held = max(1, len(texts) // 20)
        texts, heldout_texts = texts[:-n_held], texts[-n_held:]
    if not texts or not heldout_texts:
        raise ValueError("pretraining needs at least one training and one held-out document")
    started = time.perf_counter()
    if model is None:
        overrides = {"n_positions": 64, **(config_overrides or {})}
        config = tiny_gpt2_config(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **overrides,
        )
        model = build_tiny_causal_lm(config, seed=seed)
    if device is not None:
        model = model.to(device)
    max_length = position_limit(model) or 1024
    docs = encode_documents(texts, tokenizer, max_length)
    if not docs:
        raise ValueError("all training documents are empty after tokenisation")
    pad_id = padding_id(tokenizer)
    device = model.device
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        frac = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    order = np.random.default_rng(seed)
    losses: list[float] = []
    model.train()
    with seeded_rng(seed, device):
        for _ in tqdm(range(steps), desc="pretrain LM", disable=not progress, leave=False):
            picked = order.integers(0, len(docs), size=batch_size)
            ids, mask, labels = _batch([docs[i] for i in picked], pad_id)
            loss = model(
                input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)
            ).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
    model.eval()
    result = PretrainResult(
        perplexity=heldout_perplexity(model, tokenizer, heldout_texts),
        uniform_perplexity=float(len(tokenizer)),
        train_loss=float(np.mean(losses[-max(1, steps // 10) :])) if losses else float("nan"),
        steps=steps,
        seconds=time.perf_counter() - started,
        n_train_docs=len(docs),
        n_heldout_docs=len(heldout_texts),
        model=model,
    )
    if out_dir is not None:
        result.out_dir = save_model_folder(out_dir, model, tokenizer, METRICS_FILE, result)
    return result


@dataclass(frozen=True)
class PretrainBudget:
    """The default stage-1 budget for a task: corpus size, model size and optimiser steps."""

    n_docs: int = 20000
    n_heldout: int = 500
    steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-3
    config: dict[str, Any] = field(default_factory=dict)


#: default budgets: sentiment trains in well under a minute on two CPU cores, arithmetic in less
DEFAULT_BUDGETS: dict[str, PretrainBudget] = {
    "sentiment": PretrainBudget(
        n_docs=20000, steps=800, batch_size=64, config=dict(n_embd=64, n_layer=2, n_head=4)
    ),
    "arithmetic": PretrainBudget(
        n_docs=20000, steps=800, batch_size=64, config=dict(n_embd=64, n_layer=2, n_head=4, n_positions=16)
    ),
    "keywords": PretrainBudget(
        n_docs=20000, steps=800, batch_size=64, config=dict(n_embd=64, n_layer=2, n_head=4, n_positions=32)
    ),
    "reverse": PretrainBudget(
        n_docs=20000, steps=800, batch_size=64, config=dict(n_embd=64, n_layer=2, n_head=4, n_positions=16)
    ),
}


def pretrain_task_lm(
    task: Task,
    budget: PretrainBudget | None = None,
    seed: int = 0,
    out_dir: str | Path | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    **overrides: Any,
) -> PretrainResult:
    """Stage 1 on a task's own generated corpus (held-out documents come from a separate seed).

    :param task: the task whose ``corpus`` and ``tokenizer`` to use.
    :param budget: corpus/model/steps; default ``DEFAULT_BUDGETS[task.name]`` (or ``PretrainBudget()``).
    :param device: where to train (default: the CPU).
    :param overrides: override fields of the budget (``steps=100``, ``n_docs=1000``, ...).
    """
    budget = budget or DEFAULT_BUDGETS.get(task.name, PretrainBudget())
    fields = {**asdict(budget), **overrides}
    budget = PretrainBudget(**fields)
    texts = task.corpus(np.random.default_rng([seed, 1]), budget.n_docs)
    heldout = task.corpus(np.random.default_rng([seed, 2]), budget.n_heldout)
    return pretrain_lm(
        texts,
        task.tokenizer(),
        heldout_texts=heldout,
        config_overrides=budget.config,
        steps=budget.steps,
        batch_size=budget.batch_size,
        lr=budget.lr,
        seed=seed,
        out_dir=out_dir,
        progress=progress,
        device=device,
    )
