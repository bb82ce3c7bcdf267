"""PPO-ptx's pretraining text: random batches of documents from a seeded generator a run can checkpoint.

InstructGPT's PPO-ptx adds the LM's next-token loss on pretraining text to each PPO update, so that RLHF does not
unlearn the pretraining distribution. `agents.ppo.PPOAgent` takes any ``ptx_batches() -> (input_ids,
attention_mask)`` callable; this one draws ``batch_size`` documents at random (with replacement, as a
pretraining loader over a large corpus would) from its own ``torch.Generator``. It has ``state_dict`` /
``load_state_dict``, so `agents.run.TrainingRun` saves that generator in each checkpoint and a resumed PPO-ptx
run sees the same pretraining batches as one that never stopped. (A plain callable with its own randomness
resumes from wherever it happens to be.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from textenv.models import pad_left, padding_id
from textenv.pretraining import encode_documents


class PretrainingBatches:
    """Random batches of pretraining documents for PPO-ptx, reproducible across a checkpoint and resume.

    :param documents: each document's token ids (EOS included if the LM should learn to stop).
    :param batch_size: documents per call.
    :param pad_id: the id that fills the left padding (masked out of the loss).
    :param seed: seeds the generator that picks the documents.
    """

    def __init__(self, documents: Sequence[Sequence[int]], batch_size: int, pad_id: int, seed: int = 0) -> None:
        self.documents = [torch.tensor(list(doc), dtype=torch.long) for doc in documents if len(doc)]
        if not self.documents:
            raise ValueError("PPO-ptx needs at least one non-empty pretraining document")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.generator = torch.Generator().manual_seed(seed)

    @classmethod
    def from_texts(
        cls, texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, batch_size: int, max_length: int, seed: int = 0
    ) -> PretrainingBatches:
        """Encode ``texts`` as pretraining does (`textenv.pretraining.encode_documents`: EOS appended, at most
        ``max_length`` tokens each) and pad with the tokenizer's pad id (its EOS if it has none)."""
        return cls(encode_documents(texts, tokenizer, max_length), batch_size, padding_id(tokenizer), seed)

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` of ``batch_size`` documents, left-padded as the policy's inputs are."""
        picks = torch.randint(len(self.documents), (self.batch_size,), generator=self.generator)
        return pad_left([self.documents[int(i)] for i in picks], self.pad_id)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The generator's state: what a checkpoint needs to draw the same batches after a resume."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
