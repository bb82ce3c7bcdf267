"""Language models, reward models and tokenizers: loading real ones, building tiny offline ones.

Everything in textenv takes plain Hugging Face objects (`PreTrainedModel`, `PreTrainedTokenizerBase`), so a
user's own checkpoint drops in by path or hub name. The tiny builders exist because this project runs
offline: tests and the built-in tasks make GPT-2-shaped models from a config and word-level tokenizers
with the `tokenizers` library, never downloading anything.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from textenv.host_transfer import to_device

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, UNK)


class ModelLoadError(ValueError):
    """A model or tokenizer folder is missing, incomplete or corrupt."""


# --------------------------------------------------------------------------------------------- tokenizers
def build_word_tokenizer(words: Iterable[str], split: str = "whitespace") -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a closed vocabulary, built with the `tokenizers` library.

    :param words: the vocabulary (duplicates are dropped; order is kept so ids are reproducible).
    :param split: ``"whitespace"`` splits on spaces and punctuation (English-like text); ``"chars"`` makes
        every character a token (arithmetic, copy tasks).
    The special tokens ``<pad>`` (id 0), ``<eos>`` (id 1) and ``<unk>`` (id 2) come first.
    """
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in words:
        if word and word not in vocab:
            vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    if split == "whitespace":
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        from tokenizers import decoders

        tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins tokens with spaces
    elif split == "chars":
        tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
        from tokenizers import decoders

        tok.decoder = decoders.Fuse()
    else:
        raise ValueError(f"split must be 'whitespace' or 'chars', got {split!r}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="left"
    )


def load_tokenizer(
    name_or_path: str | Path, trust_remote_code: bool = False, **kwargs: Any
) -> PreTrainedTokenizerBase:
    """Load a tokenizer by local path or hub name; give it a pad token (EOS) if it has none."""
    try:
        tok = AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code, **kwargs)
    except Exception as exc:  # transformers raises OSError/ValueError/JSONDecodeError depending on the damage
        raise ModelLoadError(f"cannot load a tokenizer from {str(name_or_path)!r}: {exc}") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# --------------------------------------------------------------------------------------------- models
def tiny_gpt2_config(
    vocab_size: int,
    n_positions: int = 128,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    pad_token_id: int = 0,
    eos_token_id: int = 1,
    **kwargs: Any,
) -> GPT2Config:
    """A GPT-2-shaped config small enough to train on two CPU cores in a minute.

    Dropout defaults to 0: RL rollouts and PPO updates must see the same function (RL4LMs-style
    dropout during PPO makes the ratio noisy), and pretraining these tiny models does not need it.
    """
    defaults: dict[str, Any] = dict(
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0
    )
    defaults.update(kwargs)
    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        **defaults,
    )


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Torch's RNG seeded with ``seed`` for a block, and restored after it: on the CPU, and on ``device`` when
    that is a GPU (whose RNG draws a CUDA model's dropout and sampling). The block draws the same numbers each
    time, and the caller's random streams go on as if it had not run."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.random.default_generator.manual_seed(seed)  # torch.manual_seed would also reseed every GPU, for good
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)  # this GPU's alone: the one fork_rng restores
        yield


def build_tiny_causal_lm(config: GPT2Config, seed: int = 0) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 causal LM from `config`, deterministic in `seed`."""
    with seeded_rng(seed):
        model = GPT2LMHeadModel(config)
    return model.eval()


def build_tiny_reward_model(config: GPT2Config, seed: int = 0) -> GPT2ForSequenceClassification:
    """A randomly initialised GPT-2 sequence classifier with one output (the reward)."""
    config = GPT2Config.from_dict({**config.to_dict(), "num_labels": 1})
    with seeded_rng(seed):
        model = GPT2ForSequenceClassification(config)
    return model.eval()


def check_model_source(name_or_path: str | Path) -> None:
    """A local-looking path that does not exist is a mistake, not a hub name: say so before HF does."""
    text = str(name_or_path)
    path = Path(text)
    # "org/name" is a hub id unless "org" is a folder here ("models/lm" with models/ beside you: a local path)
    looks_local = (
        text.startswith((".", "/", "~")) or path.exists() or text.count("/") > 1
        or (text.count("/") == 1 and path.parent.is_dir())
    )  # fmt: skip
    if looks_local and not path.expanduser().exists():
        raise ModelLoadError(f"model folder {text!r} does not exist")


def load_causal_lm(
    name_or_path: str | Path,
    trust_remote_code: bool = False,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    **kwargs: Any,
) -> PreTrainedModel:
    """Load any Hugging Face causal LM by local path or hub name, in eval mode.

    :param trust_remote_code: off by default: a checkpoint's own Python code runs only if you opt in.
    :param kwargs: more ``from_pretrained`` arguments. Weights load from safetensors only (``use_safetensors=True``):
        a checkpoint with only pickled ``.bin`` weights is refused (convert it, or pass ``use_safetensors=None``
        if you trust it).
    """
    check_model_source(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(name_or_path), trust_remote_code=trust_remote_code, dtype=dtype, **{"use_safetensors": True, **kwargs}
        )
    except Exception as exc:
        raise ModelLoadError(f"cannot load a causal LM from {str(name_or_path)!r}: {exc}") from exc
    return model.to(device).eval() if device is not None else model.eval()


def load_reward_model(
    name_or_path: str | Path,
    trust_remote_code: bool = False,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    **kwargs: Any,
) -> PreTrainedModel:
    """Load any Hugging Face sequence-classification model (a reward model) by path or hub name; safetensors
    weights only, as `load_causal_lm`."""
    check_model_source(name_or_path)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(name_or_path), trust_remote_code=trust_remote_code, dtype=dtype, **{"use_safetensors": True, **kwargs}
        )
    except Exception as exc:
        raise ModelLoadError(f"cannot load a reward model from {str(name_or_path)!r}: {exc}") from exc
    return model.to(device).eval() if device is not None else model.eval()


def action_space_size(model: PreTrainedModel) -> int:
    """The number of actions: the LM head's output size, which may exceed ``len(tokenizer)``.

    GPT-2 pads its vocabulary to a multiple of 64 in some checkpoints; those extra ids are real actions the
    model can put probability on, so the action space must include them.
    """
    head = model.get_output_embeddings()
    if head is not None and hasattr(head, "out_features"):
        return int(head.out_features)
    return int(model.config.vocab_size)


def position_limit(model: PreTrainedModel) -> int | None:
    """The longest sequence the model has position embeddings for (GPT-2's ``n_positions``, else
    ``max_position_embeddings``), or None if its config names no limit."""
    config = model.config
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    return int(limit) if limit else None


def check_fits_positions(model: PreTrainedModel, length: int, role: str) -> None:
    """Raise a clear error if episodes of ``length`` tokens (prompt slots + generation budget) would run past
    the model's position embeddings: an index error deep in its forward, mid-episode, otherwise."""
    limit = position_limit(model)
    if limit is not None and length > limit:
        raise ValueError(
            f"max_prompt_tokens + max_new_tokens = {length} exceeds the {role} LM's {limit} positions; "
            "lower one of them (or use a model with more positions)"
        )


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter."""
    return next(model.parameters()).device


def cache_keyword(model: torch.nn.Module) -> str:
    """The forward() keyword for the KV cache: ``cache`` in transformers >= 5.x, ``past_key_values`` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wrappers pass kwargs on
    params = inspect.signature(base.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(output: Any) -> Any:
    """The KV cache of a model output, under either of transformers' names for it."""
    cache = output.get("cache") if hasattr(output, "get") else None
    return cache if cache is not None else output.get("past_key_values")


def same_vocabulary(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """Whether two tokenizers map every token to the same id (so token ids can be shared without decoding)."""
    return a is b or a.get_vocab() == b.get_vocab()


def padding_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that fills padding: the tokenizer's pad token, else its EOS (GPT-2-style tokenizers have no pad).
    Padding is always masked out, so any id works; these are the ones models were trained to see there."""
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)


def encode_truncating_left(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], **kwargs: Any) -> Any:
    """``tokenizer(texts, truncation=True, **kwargs)`` with texts too long cut on the left, keeping their end.

    A reward model reads its score at the last token, so an over-long ``prompt + completion`` must lose the start
    of the prompt, never the end of the completion. Passing ``truncation_side="left"`` in the call is silently
    ignored by transformers 5's fast tokenizers (only ``padding_side`` is a call argument), so the tokenizer's
    attribute is set for the call and restored after it.
    """
    before = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:
        return tokenizer(list(texts), truncation=True, **kwargs)
    finally:
        tokenizer.truncation_side = before


def pad_left(
    sequences: Sequence[torch.Tensor], pad_id: int, length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad 1-D id tensors into a batch; returns ``(ids, attention_mask)``, both ``(B, length)`` int64."""
    length = max((len(s) for s in sequences), default=0) if length is None else length
    device = sequences[0].device if sequences else torch.device("cpu")
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(sequences), length), dtype=torch.long, device=device)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids[row, length - len(seq) :] = seq
            mask[row, length - len(seq) :] = 1
    return ids, mask


def pad_left_to(sequences: Sequence[torch.Tensor], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`pad_left` onto ``device``: sequences on the host are padded there and copied in one transfer.

    Copying each row on its own would wait for the GPU's queue once per row (see `textenv.host_transfer`).
    """
    if all(s.device.type == "cpu" for s in sequences):
        ids, mask = pad_left(sequences, pad_id)
        return to_device(ids, device), to_device(mask, device)
    return pad_left([s.to(device) for s in sequences], pad_id)


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens, so a left-padded row sees the same positions as unpadded."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def save_model_folder(out_dir: str | Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                      metrics_file: str, result: Any) -> Path:  # fmt: skip
    """Save a trained model and its tokenizer with ``save_pretrained``, plus a JSON of the result's numbers.

    :param result: a dataclass of measured numbers (its ``model`` and ``out_dir`` fields are left out).
    """
    import json
    from dataclasses import fields

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    # Field by field: `asdict` of the whole result would deep-copy its model first (twice the model's memory).
    metrics = {f.name: getattr(result, f.name) for f in fields(result) if f.name not in ("model", "out_dir")}
    (out_dir / metrics_file).write_text(json.dumps(metrics, indent=2) + "\n")
    return out_dir
