"""
LoRA, the paper's other baseline: a trained low-rank update W + (alpha / r) B A
beside the frozen query and value projections of every layer.

References:
- Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv
  2106.09685: h = W0 x + B A x (Eq. 3), A drawn at random (the paper: a
  Gaussian; here lit-llama's uniform, below) and B zero so that training
  starts from the base model, the update scaled by alpha / r (Section 4.1),
  applied to W_q and W_v (Section 7.1).
- lit-llama's lit_llama/lora.py, which the Aligner authors' finetune/lora.py
  trains (their copy in the Aligner repository): MergedLinear on the fused qkv
  projection with enable_lora=[True, False, True] (line 434) in every layer,
  A initialised by kaiming_uniform_(a=sqrt(5)) and B at zero (lines 200-201),
  dropout on the input of the A path only (line 312), the update added after B
  and scaled (line 323).

Departures from lit_llama/lora.py: Meta's separate wq, wk and wv instead of one
fused c_attn, so one (A, B) pair for wq and one for wv, stacked over the layers
as (n_layers, r, dim) and (n_layers, out, r) tensors rather than a grouped
convolution; the weights are never merged by switching to eval mode (lit-llama
merges on model.eval()): the LoRA is passed to the model's forward,
`model(tokens, aligner=lora)`, like an Aligner, and merged only where a script
is asked to (`merge`, generate.py and evaluate.py --merge-lora).

Files: `LoRA.save` writes this project's file and `from_state` reads it;
support/formats/ reads lit-llama's (the authors' finetune/lora.py saves
lora_state_dict: transformer.h.{i}.attn.c_attn.lora_A and lora_B) and Hugging
Face PEFT adapter folders. The scripts reach all three through
support.formats.read_adapter, so a LoRA goes wherever an Aligner file does.
"""

import math
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from llama import BASE_KEYS, ModelArgs
from support.files import FileError, atomic_save, check_values

TARGETS = ("wq", "wv")  # the projections adapted: lit_llama/lora.py's enable_lora=[True, False, True]


class LoRAShape(NamedTuple):
    """What a LoRA file says of its own shape, read before any model loads."""
    rank: int
    alpha: float


class LoRA(nn.Module):
    kind = "LoRA"  # what the scripts and Transformer.aligner_layers tell it from an Aligner by

    def __init__(self, args: ModelArgs, rank: int = 8, alpha: float = 16, dropout: float = 0.05):
        super().__init__()
        if rank < 1:
            raise ValueError(f"a LoRA needs a rank of at least 1, not {rank}")
        if not alpha > 0:
            raise ValueError(f"a LoRA's alpha must be positive, not {alpha}")
        if not 0 <= dropout < 1:
            raise ValueError(f"a LoRA's dropout must be in [0, 1), not {dropout}")
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        self.base = args.base_shape()
        n_layers, dim = args.n_layers, args.dim
        q_out, v_out = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        # one (A, B) pair per layer for wq and one for wv, stacked over the layers
        self.a_q = nn.Parameter(torch.empty(n_layers, rank, dim))  # (L, r, dim)
        self.b_q = nn.Parameter(torch.zeros(n_layers, q_out, rank))  # (L, H * hd, r)
        self.a_v = nn.Parameter(torch.empty(n_layers, rank, dim))  # (L, r, dim)
        self.b_v = nn.Parameter(torch.zeros(n_layers, v_out, rank))  # (L, H_kv * hd, r)
        for a in (self.a_q, self.a_v):
            for layer in a.data:  # each A as lit-llama draws it: nn.Linear's own init, fan_in = dim
                nn.init.kaiming_uniform_(layer, a=math.sqrt(5))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def num_params(self) -> int:
        """n_layers * r * (dim + q_out + dim + v_out): 4,194,304 for LLaMA-2-7B at r = 8."""
        return sum(p.numel() for p in self.parameters())

    def describe(self) -> str:
        """One line for the scripts to print: what it is and how many parameters it trains."""
        return (f"LoRA: rank {self.rank}, alpha {self.alpha:g}, on wq and wv of all {self.a_q.shape[0]} layers, "
                f"{self.num_params():,} parameters")

    def check_fits(self, args: ModelArgs, source="the LoRA"):
        theirs = args.base_shape()
        if self.base != theirs:
            raise ValueError(f"{source}: 'base' is {self.base}; this model is {theirs}")

    def save(self, path):
        """One small file with the tensors, the settings and the base shape; written atomically."""
        atomic_save({"kind": self.kind, "rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                     "targets": list(TARGETS), "base": self.base,
                     **{k: getattr(self, k).detach().cpu() for k in ("a_q", "b_q", "a_v", "b_v")}}, path)


# -----------------------------------------------------------------------------
# merging: W + (alpha / r) B A written into the base's own weights

def merge(model, lora: LoRA):
    """Add each layer's update (alpha / r) B A to its wq and wv, in place: the merged model then
    computes, to float rounding, what model(tokens, aligner=lora) does. The product is formed in
    float32 and rounded once into the weight's dtype. Give it a copy to keep the base."""
    lora.check_fits(model.args)
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            att = layer.attention
            for w, a, b in ((att.wq, lora.a_q[i], lora.b_q[i]), (att.wv, lora.a_v[i], lora.b_v[i])):
                delta = (b.float() @ a.float()) * lora.scale  # (out, r) @ (r, dim) -> (out, dim)
                w.weight.copy_((w.weight.float() + delta.to(w.weight.device)).to(w.weight.dtype))
    return model


def check_merge(paths: list, shapes: list, fsdp: bool):
    """Refuse, before the model loads, a --merge-lora that cannot be done: it writes one LoRA into
    the base's weights, so the run must have exactly one --aligner, that LoRA, on one process."""
    if len(paths) != 1 or not isinstance(shapes[0], LoRAShape):
        raise ValueError(f"--merge-lora writes one LoRA into the base's weights; give it exactly one --aligner, "
                         f"a LoRA (given: {', '.join(map(str, paths)) or 'none'})")
    if fsdp:
        raise ValueError("--merge-lora needs the whole weights of wq and wv on one process; it does not run "
                         "under --fsdp")


# -----------------------------------------------------------------------------
# reading this project's file; lit-llama's files and PEFT's folders are read in support/formats/

def is_own_state(state) -> bool:
    """Whether a loaded file is a LoRA of `LoRA.save`'s (its "kind")."""
    return isinstance(state, dict) and state.get("kind") == LoRA.kind


def checked_tensor(path, key: str, tensor, shape: tuple) -> torch.Tensor:
    """A file's tensor as float32, refused with its file and key unless it is a finite tensor of `shape`."""
    if not isinstance(tensor, torch.Tensor):
        raise FileError(f"{path}: {key} is a {type(tensor).__name__}, not a tensor")
    if tuple(tensor.shape) != tuple(shape):
        raise FileError(f"{path}: {key} has shape {tuple(tensor.shape)}; this LoRA needs {tuple(shape)}")
    check_values(path, {key: tensor}, "LoRA file")
    return tensor.float()


def from_state(state: dict, path: Path, args: ModelArgs = None) -> LoRA:
    """The LoRA in a loaded file of `LoRA.save`'s; `path` names it in errors."""
    for key in ("rank", "alpha", "dropout", "targets", "base", "a_q", "b_q", "a_v", "b_v"):
        if key not in state:
            raise FileError(f"{path}: missing key {key!r}; a LoRA file holds kind, rank, alpha, dropout, "
                            "targets, base and the tensors a_q, b_q, a_v, b_v")
    if list(state["targets"]) != list(TARGETS):
        raise FileError(f"{path}: 'targets' is {state['targets']!r}; this model adapts {list(TARGETS)}")
    base = state["base"]
    if not isinstance(base, dict) or any(type(base.get(key)) is not int for key in BASE_KEYS):
        raise FileError(f"{path}: 'base' must hold the integers {list(BASE_KEYS)}, not {base!r}")
    if type(state["rank"]) is not int:
        raise FileError(f"{path}: 'rank' is {state['rank']!r}, not an integer")
    try:
        lora = LoRA(ModelArgs(**{key: base[key] for key in BASE_KEYS}, vocab_size=1),
                    state["rank"], state["alpha"], state["dropout"])
    except (ValueError, TypeError) as e:  # settings that are not a LoRA's
        raise FileError(f"{path}: {e}") from None
    if args is not None:
        lora.check_fits(args, source=str(path))
    for key in ("a_q", "b_q", "a_v", "b_v"):
        getattr(lora, key).data.copy_(checked_tensor(path, key, state[key], getattr(lora, key).shape))
    return lora


