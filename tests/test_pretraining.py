"""Stage 1: the LM learns (perplexity far below uniform), is reproducible, saves and reloads, reads user files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from textenv.cli import main
from textenv.models import ModelLoadError, load_causal_lm, load_tokenizer
from textenv.pretraining import CorpusFormatError, heldout_perplexity, pretrain_task_lm, read_corpus_file
from textenv.tasks import SentimentTask


def test_default_lm_perplexity_is_far_below_uniform(sentiment_models: tuple[Path, Path]) -> None:
    lm_dir, _ = sentiment_models
    build = json.loads((lm_dir.parent / "build.json").read_text())
    print(f"\nsentiment LM: held-out perplexity {build['lm_perplexity']:.2f} vs uniform {build['uniform_perplexity']:.0f};"
          f" built in {build['seconds_total']:.0f}s (LM {build['seconds_lm']:.0f}s)")  # fmt: skip
    assert build["lm_perplexity"] < 0.05 * build["uniform_perplexity"]


def test_tiny_budget_learns_and_round_trips(tmp_path: Path) -> None:
    task = SentimentTask()
    result = pretrain_task_lm(task, steps=120, n_docs=2000, n_heldout=100, out_dir=tmp_path / "lm", progress=False)
    assert result.perplexity < 0.2 * result.uniform_perplexity
    again = load_causal_lm(tmp_path / "lm")
    tok = load_tokenizer(tmp_path / "lm")
    ids = tok(["review : the acting was great ."], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(result.model(ids).logits, again(ids).logits)
    texts = task.corpus(__import__("numpy").random.default_rng([0, 2]), 100)
    assert heldout_perplexity(again, tok, texts) == pytest.approx(result.perplexity, rel=1e-5)
    assert json.loads((tmp_path / "lm" / "textenv_pretrain.json").read_text())["steps"] == 120


def test_heldout_perplexity_truncates_to_a_max_position_embeddings_limit() -> None:
    """Models that name their limit ``max_position_embeddings`` (OPT, Llama, ...) rather than GPT-2's
    ``n_positions``: a long document keeps its first tokens, as in training, instead of an index error."""
    from transformers import OPTConfig, OPTForCausalLM

    from textenv.toy import make_toy_env

    tok = make_toy_env().tokenizer
    torch.manual_seed(0)
    config = OPTConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                       max_position_embeddings=8, word_embed_proj_dim=16)  # fmt: skip
    model = OPTForCausalLM(config).eval()
    long_text = "the movie was " + "good " * 20
    first = torch.tensor([tok(long_text, add_special_tokens=False)["input_ids"][:8]])
    assert len(tok(long_text)["input_ids"]) > 8
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(model(first).logits[0, :-1], first[0, 1:])
    assert heldout_perplexity(model, tok, [long_text]) == pytest.approx(math.exp(float(nll)), rel=1e-5)


def test_seeded_runs_are_identical() -> None:
    a = pretrain_task_lm(SentimentTask(), steps=15, n_docs=300, n_heldout=20, progress=False)
    b = pretrain_task_lm(SentimentTask(), steps=15, n_docs=300, n_heldout=20, progress=False)
    assert a.perplexity == b.perplexity
    assert all(torch.equal(x, y) for x, y in zip(a.model.parameters(), b.model.parameters(), strict=True))


def test_user_corpus_files_and_cli(tmp_path: Path) -> None:
    text = tmp_path / "corpus.txt"
    text.write_text("the cat sat on the mat\n\nthe dog sat on the log\n" * 20)
    assert len(read_corpus_file(text)) == 40
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text('{"text": "a b c"}\n{"text": "c b a"}\n' * 10)
    assert read_corpus_file(jsonl)[:2] == ["a b c", "c b a"]
    assert main(["pretrain", "--corpus", str(text), "--steps", "30", "--out", str(tmp_path / "lm")]) == 0
    assert load_causal_lm(tmp_path / "lm").config.vocab_size == len(load_tokenizer(tmp_path / "lm"))
    # fine-tune the saved model on the JSONL corpus? its vocabulary differs, so only the text file again
    # Saved in bf16 (as most hub checkpoints are; transformers loads such a folder as bf16), it is still
    # fine-tuned, and saved, in float32: AdamW's small updates would round away in bf16 weights.
    load_causal_lm(tmp_path / "lm").to(torch.bfloat16).save_pretrained(tmp_path / "lm")
    assert load_causal_lm(tmp_path / "lm").dtype == torch.bfloat16
    assert main(["pretrain", "--corpus", str(text), "--init", str(tmp_path / "lm"), "--steps", "5", "--out", str(tmp_path / "ft")]) == 0
    assert load_causal_lm(tmp_path / "ft").dtype == torch.float32


@pytest.mark.parametrize(
    ("content", "message"),
    [("", "no documents"), ('{"text": "ok"}\n{"txt": "x"}\n', r"corpus.jsonl:2: .*'text'"), ("{not json\n", r"corpus.jsonl:1: invalid JSON")],
)
def test_bad_corpus_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_text(content)
    with pytest.raises(CorpusFormatError, match=message):
        read_corpus_file(path)
    with pytest.raises(CorpusFormatError, match="does not exist"):
        read_corpus_file(tmp_path / "missing.txt")


def test_missing_and_corrupt_model_folders(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_causal_lm(tmp_path / "nope")
    # A relative "models/lm" whose first folder is here is a missing folder, not a hub id "org/name".
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(ModelLoadError, match="model folder 'models/lm' does not exist"):
        load_causal_lm("models/lm")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{broken")
    with pytest.raises(ModelLoadError, match="cannot load a causal LM"):
        load_causal_lm(corrupt)
    text = tmp_path / "c.txt"
    text.write_text("a b\n")
    assert main(["pretrain", "--corpus", str(text), "--init", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_pickled_weights_are_not_loaded(tmp_path: Path) -> None:
    """A folder with only pickled ``pytorch_model.bin`` weights is refused (safetensors only, never pickle), by the LM
    and reward-model loaders and when a reward model is initialised from an LM folder."""
    from textenv.models import (
        build_tiny_causal_lm,
        build_tiny_reward_model,
        load_reward_model,
        tiny_gpt2_config,
    )
    from textenv.reward_model_training import _init_model

    config = tiny_gpt2_config(20, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    for name, model in (("lm", build_tiny_causal_lm(config)), ("rm", build_tiny_reward_model(config))):
        model.config.save_pretrained(tmp_path / name)  # transformers 5 saves safetensors only, but still loads .bin
        torch.save(model.state_dict(), tmp_path / name / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_causal_lm(tmp_path / "lm")
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_reward_model(tmp_path / "rm")
    with pytest.raises(ModelLoadError, match="safetensors"):
        _init_model(tmp_path / "lm", None, {}, seed=0)
    assert type(load_causal_lm(tmp_path / "lm", use_safetensors=None)).__name__ == "GPT2LMHeadModel"  # opted in
