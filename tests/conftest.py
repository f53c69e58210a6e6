"""Shared fixtures: a tiny LLaMA with its own SentencePiece tokenizer, saved in Meta's layout."""

import io
import os
from pathlib import Path

import pytest
import torch

from llama import ModelArgs, Transformer, save

TEXT = """The quick brown fox jumps over the lazy dog.
Below is an instruction that describes a task. Write a response that appropriately completes the request.
### Instruction:
### Input:
### Response:
Question: What is two plus three? Answer: five.
A robin is a bird. A salmon is a fish. The capital of France is Paris.
Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.
The following are multiple choice questions (with answers) about abstract algebra.
""".splitlines()


def train_tokenizer(path, lines=TEXT, vocab_size=384):
    """A small SentencePiece BPE model with Meta's special ids (unk 0, bos 1, eos 2, no pad)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines * 20), model_writer=model,
                                   vocab_size=vocab_size, model_type="bpe", byte_fallback=True,
                                   character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   minloglevel=2)
    Path(path).write_bytes(model.getvalue())


TINY = dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=32, norm_eps=1e-5)


def make_checkpoint(folder, n_shards=1, seed=0, **overrides):
    """A random tiny model written as Meta ships one; the tokenizer goes beside the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok_path = folder.parent / "tokenizer.model"
    if not tok_path.exists():
        train_tokenizer(tok_path)
    torch.manual_seed(seed)
    args = ModelArgs(**{**TINY, **overrides}, vocab_size=384, max_seq_len=256)
    model = Transformer(args)
    for p in model.parameters():  # larger than the default init, so that outputs depend visibly on the input
        torch.nn.init.normal_(p, std=0.2) if p.dim() > 1 else None
    save(model, folder, n_shards=n_shards)
    return model


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """Path of a tiny random checkpoint folder (params.json, consolidated.00.pth; tokenizer.model beside it)."""
    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    make_checkpoint(folder)
    return folder


@pytest.fixture(scope="session")
def shared_data():
    """../shared/data where it exists (tests that need real data skip without it)."""
    path = Path(os.environ.get("ALIGNER_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    if not path.is_dir():
        pytest.skip(f"real data not present at {path}")
    return path
