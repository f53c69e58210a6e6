"""
The Aligner: one shared set of N learnable prefix tokens P (N x dim) that every
layer from `start_layer` on attends to through its own frozen key and value
weights, each layer's term scaled by a per-head gate beta_l.

Reference: Zhou, Wu, Zhu, Terzopoulos, "Aligner: One Global Token is Worth
Millions of Parameters When Aligning Large Language Models", arXiv 2312.05503
(Eq. 5-7). The attention itself lives in llama.py; this module holds only the
trainable parameters, so one frozen base model serves any number of Aligners:
`model(tokens, aligner=aligner)`.

The gates start at zero and are used raw (no tanh), so a fresh Aligner leaves
the base model's outputs unchanged. The prefix starts as an embedding does,
N(0, 1), the scale of an RMS-normalised hidden state.

Files: `save` writes this project's small file; `Aligner.read` reads it and
the files the paper's authors released (lit-llama layout, bf16: their
lit_llama/aligner.py names the prefix global_value_embedding and the gates
gating_factor). Every script that takes an Aligner file reads it through
`Aligner.read`, so the authors' Aligners work wherever ours do.
"""

import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from files import atomic_save, check_values, load_pt
from llama import ModelArgs

BASE_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads")  # the base shape an Aligner file records


class AlignerShape(NamedTuple):
    """What an Aligner file says of the Aligner's own shape."""
    n_tokens: int
    start_layer: int


class Aligner(nn.Module):
    def __init__(self, args: ModelArgs, n_tokens: int = 10, start_layer: int = 2):
        super().__init__()
        if n_tokens < 1:
            raise ValueError(f"an Aligner needs at least one token, not {n_tokens}")
        if not 0 <= start_layer < args.n_layers:
            raise ValueError(f"start_layer {start_layer} is outside the model's {args.n_layers} layers")
        self.n_tokens = n_tokens
        self.start_layer = start_layer
        self.base = {key: getattr(args, key) for key in BASE_KEYS}
        self.prefix = nn.Parameter(torch.randn(n_tokens, args.dim))  # P, shared by all adapted layers
        self.gates = nn.Parameter(torch.zeros(args.n_layers - start_layer, args.n_heads))  # beta_l per head

    def num_params(self) -> int:
        """N * dim + (n_layers - start_layer) * n_heads: 5,056 for LLaMA-2-7B with N = 1."""
        return sum(p.numel() for p in self.parameters())

    def check_fits(self, args: ModelArgs, source="the Aligner"):
        theirs = {key: getattr(args, key) for key in BASE_KEYS}
        if self.base != theirs:
            raise ValueError(f"{source} was made for a base with {self.base}, not {theirs}")

    # --- files ---------------------------------------------------------------

    def save(self, path):
        """One small file with the tensors, the settings and the base shape; written atomically."""
        atomic_save({"n_tokens": self.n_tokens, "start_layer": self.start_layer, "base": self.base,
                     "prefix": self.prefix.detach().cpu(), "gates": self.gates.detach().cpu()}, path)

    @classmethod
    def read(cls, path, args: ModelArgs) -> "Aligner":
        """An Aligner file of either layout, for a base of shape `args`: this project's (`save`)
        or the paper's authors' lit-llama files. Every script reads Aligners through here."""
        state = load_pt(path, "Aligner file")
        if is_lit_llama(state):
            return cls._from_lit_llama_state(_lit_llama_weights(state), Path(path), args)
        return cls._from_state(state, Path(path), args)

    @classmethod
    def check_file(cls, path) -> "AlignerShape":
        """Refuse, before any model loads, a file that is no usable Aligner of either layout;
        returns the number of tokens and the start layer it holds (None where the authors'
        layout leaves one to be checked against the model)."""
        state = load_pt(path, "Aligner file")
        if is_lit_llama(state):
            weights = _lit_llama_weights(state)
            check_values(path, weights, "Aligner file")
            prefix = weights["global_value_embedding.weight"]
            layers = [int(m.group(1)) for key in weights
                      if (m := re.fullmatch(r"transformer\.h\.(\d+)\.attn\.gating_factor", key))]
            return AlignerShape(prefix.shape[0] if prefix.dim() == 2 else None, min(layers, default=None))
        aligner = cls._from_state(state, Path(path))
        return AlignerShape(aligner.n_tokens, aligner.start_layer)

    @classmethod
    def load(cls, path, args: ModelArgs = None) -> "Aligner":
        """An Aligner saved by `save`; with `args`, refuses a file made for a base of another shape."""
        state = load_pt(path, "Aligner file")
        if is_lit_llama(state):
            raise ValueError(f"{path}: this is an Aligner in the authors' lit-llama layout; "
                             "read it with Aligner.read or Aligner.from_lit_llama")
        return cls._from_state(state, Path(path), args)

    @classmethod
    def from_lit_llama(cls, path, args: ModelArgs) -> "Aligner":
        """An Aligner released by the paper's authors (lit-llama layout, usually bf16)."""
        state = load_pt(path, "Aligner file")
        if not is_lit_llama(state):
            raise ValueError(f"{path}: no 'global_value_embedding.weight'; not an Aligner in lit-llama layout")
        return cls._from_lit_llama_state(_lit_llama_weights(state), Path(path), args)

    @classmethod
    def _from_state(cls, state, path: Path, args: ModelArgs = None) -> "Aligner":
        needed = ("n_tokens", "start_layer", "base", "prefix", "gates")
        if not isinstance(state, dict) or any(key not in state for key in needed):
            raise ValueError(f"{path}: not an Aligner file (it needs the keys {list(needed)})")
        check_values(path, {key: state[key] for key in ("prefix", "gates")}, "Aligner file")
        base = state["base"]
        if not isinstance(base, dict) or any(key not in base for key in BASE_KEYS):
            raise ValueError(f"{path}: 'base' must hold {list(BASE_KEYS)}, not {base!r}")
        for key in ("n_tokens", "start_layer"):
            if type(state[key]) is not int:  # type(), not isinstance: True and False are ints to Python
                raise ValueError(f"{path}: {key} is {state[key]!r}, not an integer")
        try:
            shape_args = ModelArgs(**{key: base[key] for key in BASE_KEYS}, vocab_size=1)
            aligner = cls(shape_args, n_tokens=state["n_tokens"], start_layer=state["start_layer"])
        except (ValueError, TypeError) as e:  # the settings it records are not an Aligner's
            raise ValueError(f"{path}: {e}") from None
        if args is not None:
            aligner.check_fits(args, source=str(path))
        for key in ("prefix", "gates"):
            param = getattr(aligner, key)
            if not isinstance(state[key], torch.Tensor) or state[key].shape != param.shape:
                shape = tuple(state[key].shape) if isinstance(state[key], torch.Tensor) else type(state[key]).__name__
                raise ValueError(f"{path}: {key} has shape {shape}, its settings imply {tuple(param.shape)}")
            param.data.copy_(state[key])
        return aligner

    @classmethod
    def _from_lit_llama_state(cls, state: dict, path: Path, args: ModelArgs) -> "Aligner":
        """The authors' layout (their lit_llama/aligner.py):

            global_value_embedding.weight          (N, dim)        the prefix P
            transformer.h.{i}.attn.gating_factor   (1, H, 1, 1)    layer i's gates, i >= start_layer
            transformer.h.{i}.attn.adapter_wte.weight  (N, dim)    the same P again, once per layer

        Their model shares one embedding module among the layers, so each layer's
        adapter_wte is a copy of the prefix; a copy that differs is refused. A
        gating_factor of one value (their older files) is spread over the heads,
        as their loader (_load_from_state_dict) does.
        """
        if args is None:
            raise ValueError(f"{path}: an Aligner in the authors' layout records no model shape; "
                             "it needs the base model's arguments to be read")
        prefix = state["global_value_embedding.weight"]
        if not isinstance(prefix, torch.Tensor) or prefix.dim() != 2 or prefix.shape[1] != args.dim:
            shape = tuple(prefix.shape) if isinstance(prefix, torch.Tensor) else type(prefix).__name__
            raise ValueError(f"{path}: 'global_value_embedding.weight' has shape {shape}; "
                             f"the model needs (N, {args.dim})")
        check_values(path, {key: t for key, t in state.items() if key.endswith(("embedding.weight", "gating_factor"))},
                     "Aligner file")
        gates = {}
        for key, tensor in state.items():
            if key == "global_value_embedding.weight":
                continue
            if re.fullmatch(r"transformer\.h\.\d+\.attn\.adapter_wte\.weight", key):
                if not torch.equal(tensor, prefix):
                    raise ValueError(f"{path}: {key!r} differs from 'global_value_embedding.weight'; in the "
                                     "authors' layout every layer's adapter_wte is the one shared prefix")
                continue
            match = re.fullmatch(r"transformer\.h\.(\d+)\.attn\.gating_factor", key)
            if match is None:
                raise ValueError(f"{path}: unexpected key {key!r} for an Aligner in lit-llama layout")
            gates[int(match.group(1))] = _spread_gate(tensor, args.n_heads, path, key)
        if not gates:
            raise ValueError(f"{path}: no 'transformer.h.N.attn.gating_factor' keys")
        start_layer = min(gates)
        if sorted(gates) != list(range(start_layer, args.n_layers)):
            raise ValueError(f"{path}: gates for layers {sorted(gates)} do not cover layers "
                             f"{start_layer}..{args.n_layers - 1} of this model")
        aligner = cls(args, n_tokens=prefix.shape[0], start_layer=start_layer)
        aligner.prefix.data.copy_(prefix.float())
        for i in range(start_layer, args.n_layers):
            aligner.gates.data[i - start_layer] = gates[i]
        return aligner


def is_lit_llama(state) -> bool:
    """Whether a loaded file is an Aligner in the authors' layout (bare, or under "model" as fabric.save writes)."""
    return isinstance(state, dict) and "global_value_embedding.weight" in _lit_llama_weights(state)


def _lit_llama_weights(state: dict) -> dict:
    return state["model"] if isinstance(state.get("model"), dict) else state


def _spread_gate(tensor, n_heads: int, path, key) -> torch.Tensor:
    """(n_heads,) float32 gates from a gating_factor: (1, H, 1, 1), or one value for all heads."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{path}: {key!r} is a {type(tensor).__name__}, not a tensor")
    if tensor.dim() == 4 and tuple(tensor.shape) == (1, n_heads, 1, 1):
        return tensor.float().flatten()
    if tensor.dim() < 4 and tensor.numel() == 1:
        return tensor.float().reshape(1).repeat(n_heads)
    raise ValueError(f"{path}: {key!r} has shape {tuple(tensor.shape)}; expected (1, {n_heads}, 1, 1) "
                     "or a single value for all heads")


# -----------------------------------------------------------------------------
# many Aligners over one base model

@dataclass
class AlignerRows:
    """One Aligner per batch row: what Transformer.forward reads from an Aligner, with a batch axis."""
    prefix: torch.Tensor  # (B, N, dim)
    gates: torch.Tensor  # (B, n_layers - start_layer, n_heads)
    start_layer: int


class AlignerBank:
    """Aligners of one shape stacked into two tensors, so each batch row can pick its own.

    A bank of K one-token Aligners for LLaMA-2-7B holds K * 5,056 values.
    `None` in the list stands for the base model: a zero prefix with zero gates,
    which adds exactly nothing.
    """

    def __init__(self, aligners: list):
        real = [a for a in aligners if a is not None]
        if not real:
            raise ValueError("an AlignerBank needs at least one Aligner")
        first = real[0]
        for a in real[1:]:
            if (a.n_tokens, a.start_layer, a.base) != (first.n_tokens, first.start_layer, first.base):
                raise ValueError("the Aligners in one bank must share n_tokens, start_layer and base shape; "
                                 f"got {(a.n_tokens, a.start_layer)} beside {(first.n_tokens, first.start_layer)}")
        self.start_layer = first.start_layer
        with torch.no_grad():
            self.prefix = torch.stack([torch.zeros_like(first.prefix) if a is None else a.prefix.detach()
                                       for a in aligners])  # (K, N, dim)
            self.gates = torch.stack([torch.zeros_like(first.gates) if a is None else a.gates.detach()
                                      for a in aligners])  # (K, n_layers - start_layer, n_heads)

    def __len__(self):
        return self.prefix.shape[0]

    def to(self, device=None, dtype=None):
        self.prefix = self.prefix.to(device=device, dtype=dtype)
        self.gates = self.gates.to(device=device, dtype=dtype)
        return self

    def nbytes(self) -> int:
        return self.prefix.nbytes + self.gates.nbytes

    def select(self, rows) -> AlignerRows:
        """Row b of the batch gets Aligner rows[b]."""
        rows = torch.as_tensor(rows, device=self.prefix.device)
        return AlignerRows(self.prefix[rows], self.gates[rows], self.start_layer)
