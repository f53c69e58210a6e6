"""Shared fixtures: a tiny LLaMA with its own SentencePiece tokenizer, saved in Meta's layout."""

import io
import json
import os
from pathlib import Path

import pytest
import torch

from llama import ModelArgs, Transformer
from support.formats import save

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


def read_jsonl(path) -> list:
    """The records of a JSON Lines file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def write_fox_task(path, n: int):
    """A tiny Alpaca task whose n answers all take one form ("Fox 3 is red."); returns path."""
    records = [{"instruction": f"Name the color of fox {i}.", "input": "", "output": f"Fox {i} is red."}
               for i in range(n)]
    Path(path).write_text(json.dumps(records))
    return Path(path)


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


def authors_aligner_state(args, n_tokens=1, start_layer=2, seed=0) -> dict:
    """An Aligner in the paper's authors' layout, as their released files hold it: bf16, keys in
    their order (the shared prefix, then per layer its gating_factor (1, H, 1, 1) and its own
    adapter_wte copy of the prefix), gates drawn so that the Aligner changes the model."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randn(n_tokens, args.dim, generator=g).bfloat16()
    state = {"global_value_embedding.weight": prefix}
    for i in range(start_layer, args.n_layers):
        state[f"transformer.h.{i}.attn.gating_factor"] = torch.randn(1, args.n_heads, 1, 1, generator=g).bfloat16()
        state[f"transformer.h.{i}.attn.adapter_wte.weight"] = prefix.clone()
    return state


def lit_llama_adapter_state(args, n_tokens=2, start_layer=2, seed=0) -> dict:
    """A LLaMA-Adapter V1 file as lit-llama's finetune/adapter.py saves one (adapter_state_from_state_dict):
    per adapted layer its own adapter_wte (N, dim) and its gating_factor (1, H, 1, 1), in bf16."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(start_layer, args.n_layers):
        state[f"transformer.h.{i}.attn.adapter_wte.weight"] = torch.randn(n_tokens, args.dim, generator=g).bfloat16()
        state[f"transformer.h.{i}.attn.gating_factor"] = torch.randn(1, args.n_heads, 1, 1, generator=g).bfloat16()
    return state


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices gain nothing from threads, and lose much to them on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
