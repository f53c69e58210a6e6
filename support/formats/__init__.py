"""
Every file format the project reads, in one room; the scripts call this small interface.

Base models (`load`, `open_checkpoint`, `read_params`, `context_length`, `check_context`):
- Meta's checkpoint folders, params.json and consolidated.NN.pth, and tokenizer.model beside
  them (`Tokenizer`, `find_tokenizer`): meta.py, which also writes them (`save`).
- Hugging Face LLaMA folders, config.json with safetensors or .bin weights: hf.py.

Adapter files, everything --aligner takes (`read_adapter`, `check_adapter_file`):
- this project's Aligner, LLaMA-Adapter, LoRA and Prompt Tuning files: each by its own module's
  `from_state` (aligner.py, lora.py, prompt_tuning.py), beside the `save` that writes it;
- lit-llama's Aligner and LLaMA-Adapter files (the Aligners the paper's authors released among
  them) and its LoRA files: lit_llama.py;
- Hugging Face PEFT LoRA folders: peft.py.
Each file is loaded once; what it holds is told from its keys. `read_aligner` and
`check_aligner_file` take the same files but Prompt Tuning's (train_dpo.py's --init-aligner and
--reference, analyze.py).
"""

from pathlib import Path

import torch

import lora
from aligner import Aligner, AlignerShape
from llama import Transformer, precompute_freqs_cis
from lora import LoRAShape
from prompt_tuning import PromptTuning, is_prompt_tuning
from support.files import load_pt
from support.formats import hf, lit_llama, peft
from support.formats.meta import (META_CONTEXT, MetaCheckpoint, Tokenizer, check_finite, check_keys, checked_weight,
                                  checkpoint_inputs, find_tokenizer, finite_weight, model_args, read_params, save)

__all__ = ["load", "save", "open_checkpoint", "read_params", "find_tokenizer", "checkpoint_inputs", "context_length",
           "check_context", "Tokenizer", "read_adapter", "read_aligner", "check_adapter_file", "check_adapter_files",
           "check_aligner_file", "is_lora"]


# -----------------------------------------------------------------------------
# base models: Meta's folders or Hugging Face's

def open_checkpoint(ckpt_dir):
    """The checkpoint in a folder, opened without reading its weights: Meta's layout
    (params.json, consolidated.NN.pth), or Hugging Face's (config.json, safetensors or .bin)."""
    if not Path(ckpt_dir).is_dir():
        raise FileNotFoundError(f"{ckpt_dir}: no checkpoint folder here")
    if hf.is_hf_folder(ckpt_dir):
        return hf.HFCheckpoint(ckpt_dir)
    return MetaCheckpoint(ckpt_dir)


def context_length(ckpt_dir) -> tuple:
    """(the longest sequence the checkpoint was trained on, where that number comes from):
    config.json's max_position_embeddings (2048, LlamaConfig's default, where it is absent),
    or META_CONTEXT for Meta's layout. Reads only the settings file."""
    if not Path(ckpt_dir).is_dir():
        raise FileNotFoundError(f"{ckpt_dir}: no checkpoint folder here")
    if hf.is_hf_folder(ckpt_dir):
        return hf.max_positions(Path(ckpt_dir) / "config.json")
    read_params(ckpt_dir)
    return META_CONTEXT, f"LLaMA-2's context; {Path(ckpt_dir) / 'params.json'} records none"


def check_context(ckpt_dir, max_seq_len: int, beyond: bool = False):
    """Refuse, before any weight loads, a --max-seq-len past the checkpoint's context: RoPE
    positions it never saw, and a RoPE table and KV cache sized by it. --beyond-context allows it."""
    context, source = context_length(ckpt_dir)
    if max_seq_len > context and not beyond:
        raise ValueError(f"--max-seq-len {max_seq_len} is past {ckpt_dir}'s context of {context} tokens "
                         f"({source}); pass --beyond-context to go past it")


def load(ckpt_dir, device="cpu", dtype=torch.float32, tokenizer_path=None,
         max_seq_len: int = 2048, max_batch_size: int = 32):
    """A frozen Transformer and its Tokenizer from a checkpoint folder.

    The weights are read one at a time, memory-mapped, into a model built on
    the meta device, so at most one full copy of them is ever held. A weight
    holding NaN or an infinite value, or a model whose first forward is not
    finite, is refused (finite_weight, check_finite).
    """
    ckpt = open_checkpoint(ckpt_dir)
    tokenizer = Tokenizer(tokenizer_path or ckpt.tokenizer_path)
    args = model_args(ckpt, tokenizer, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    with torch.device("meta"):
        model = Transformer(args)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_keys(ckpt, expected)
    state = {key: finite_weight(ckpt, key, checked_weight(ckpt, key, shape).to(device=device, dtype=dtype))
             for key, shape in expected.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.freqs_cis = precompute_freqs_cis(args.head_dim, args.max_seq_len, args.rope_theta).to(device)
    model = model.requires_grad_(False).eval()
    check_finite(model, tokenizer, ckpt_dir)
    return model, tokenizer


# -----------------------------------------------------------------------------
# adapter files: whatever --aligner is given

def adapter_kind(path):
    """(what the file or folder holds, its loaded contents): loaded once, told apart by its keys.
    The kinds: "PEFT" (a folder; contents None), "Prompt Tuning", "LoRA", "lit-llama LoRA",
    "lit-llama Aligner" and "Aligner" (this project's file, or anything else, which its reader refuses)."""
    path = Path(path)
    if path.is_dir():
        return "PEFT", None
    state = load_pt(path, "Aligner file")
    if is_prompt_tuning(state):
        return "Prompt Tuning", state
    if lora.is_own_state(state):
        return "LoRA", state
    if lit_llama.is_lora(state):
        return "lit-llama LoRA", state
    if lit_llama.is_aligner(state):
        return "lit-llama Aligner", state
    return "Aligner", state


def read_aligner(path, args=None):
    """An Aligner or LLaMA-Adapter (ours or lit-llama's), or a LoRA (ours, lit-llama's or a PEFT
    folder; in eval mode), from a file or folder: what train_dpo.py's --init-aligner and
    --reference and analyze.py take. With `args` (ModelArgs), refuses one made for a base of
    another shape; lit-llama's LoRA and PEFT's need it, their files not recording every dimension."""
    kind, state = adapter_kind(path)
    return _read(kind, state, Path(path), args)


def read_adapter(path, args=None):
    """Whatever an --aligner file holds: what read_aligner reads, and a Prompt Tuning."""
    kind, state = adapter_kind(path)
    if kind == "Prompt Tuning":
        return PromptTuning.from_state(state, Path(path), args)
    return _read(kind, state, Path(path), args)


def _read(kind, state, path: Path, args):
    if kind == "PEFT":
        return peft.read_peft(path, args).eval()
    if kind == "LoRA":
        return lora.from_state(state, path, args).eval()
    if kind == "lit-llama LoRA":
        return lit_llama.lora_from_state(state, path, args).eval()
    if kind == "lit-llama Aligner":
        return lit_llama.aligner_from_state(state, path, args)
    return Aligner.from_state(state, path, args)


def check_aligner_file(path):
    """Refuse, before any model loads, a file read_aligner would refuse for itself (without the
    base's arguments); returns the AlignerShape or LoRAShape it holds."""
    kind, state = adapter_kind(path)
    return _shape(kind, state, Path(path))


def check_adapter_file(path):
    """Refuse, before any model loads, an --aligner file that is no usable adapter of any kind;
    returns the AlignerShape or LoRAShape it holds, or the Prompt Tuning itself."""
    kind, state = adapter_kind(path)
    if kind == "Prompt Tuning":
        return PromptTuning.from_state(state, Path(path))
    return _shape(kind, state, Path(path))


def check_adapter_files(paths) -> list:
    """check_adapter_file of each --aligner path, None for "base" (the model without one)."""
    shapes = []
    for path in paths:
        if path == "base":
            shapes.append(None)
        elif not Path(path).exists():
            raise FileNotFoundError(f"--aligner {path}: no such file")
        else:
            shapes.append(check_adapter_file(path))
    return shapes


def _shape(kind, state, path: Path):
    if kind == "PEFT":
        return peft.peft_shape(path)
    if kind == "LoRA":
        found = lora.from_state(state, path)
        return LoRAShape(found.rank, found.alpha)
    if kind == "lit-llama LoRA":
        return lit_llama.lora_shape(state, path)
    if kind == "lit-llama Aligner":
        return lit_llama.aligner_shape(state, path)
    aligner = Aligner.from_state(state, path)
    return AlignerShape(aligner.n_tokens, aligner.start_layer, aligner.layer_specific)


def is_lora(path) -> bool:
    """Whether `path` holds a LoRA: a PEFT adapter folder, or a file of ours or lit-llama's."""
    path = Path(path)
    if path.is_dir():
        return (path / "adapter_config.json").is_file()
    if not path.is_file():
        return False
    state = load_pt(path, "LoRA file")
    return lora.is_own_state(state) or lit_llama.is_lora(state)
