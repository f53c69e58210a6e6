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
"""

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from files import atomic_save, check_values, load_pt
from llama import ModelArgs

BASE_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads")  # the base shape an Aligner file records


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
    def load(cls, path, args: ModelArgs = None) -> "Aligner":
        """An Aligner saved by `save`; with `args`, refuses a file made for a base of another shape."""
        path = Path(path)
        state = load_pt(path, "Aligner file")
        needed = ("n_tokens", "start_layer", "base", "prefix", "gates")
        if not isinstance(state, dict) or any(key not in state for key in needed):
            if isinstance(state, dict) and "global_value_embedding.weight" in state:
                raise ValueError(f"{path}: this is an Aligner in the authors' lit-llama layout; "
                                 "read it with Aligner.from_lit_llama")
            raise ValueError(f"{path}: not an Aligner file (it needs the keys {list(needed)})")
        check_values(path, {key: state[key] for key in ("prefix", "gates")}, "Aligner file")
        base = state["base"]
        shape_args = ModelArgs(**{key: base[key] for key in BASE_KEYS}, vocab_size=1)
        aligner = cls(shape_args, n_tokens=state["n_tokens"], start_layer=state["start_layer"])
        if args is not None:
            aligner.check_fits(args, source=str(path))
        for key in ("prefix", "gates"):
            param = getattr(aligner, key)
            if state[key].shape != param.shape:
                raise ValueError(f"{path}: {key} has shape {tuple(state[key].shape)}, "
                                 f"its settings imply {tuple(param.shape)}")
            param.data.copy_(state[key])
        return aligner

    @classmethod
    def from_lit_llama(cls, path, args: ModelArgs) -> "Aligner":
        """Read an Aligner released by the paper's authors (lit-llama layout, usually bf16).

        `global_value_embedding.weight` (N, dim) is the prefix;
        `transformer.h.{i}.attn.gating_factor` (1, n_heads, 1, 1) is layer i's gate.
        Their per-layer `adapter_wte` copies of the prefix are not needed.
        """
        path = Path(path)
        state = load_pt(path, "lit-llama Aligner file")
        if isinstance(state.get("model"), dict):
            state = state["model"]
        if "global_value_embedding.weight" not in state:
            raise ValueError(f"{path}: no 'global_value_embedding.weight'; not an Aligner in lit-llama layout")
        prefix = state["global_value_embedding.weight"]
        gates = {}
        for key, tensor in state.items():
            if key == "global_value_embedding.weight" or re.fullmatch(r"transformer\.h\.\d+\.attn\.adapter_wte\.weight", key):
                continue
            match = re.fullmatch(r"transformer\.h\.(\d+)\.attn\.gating_factor", key)
            if match is None:
                raise ValueError(f"{path}: unexpected key {key!r} for an Aligner in lit-llama layout")
            gates[int(match.group(1))] = tensor
        if not gates:
            raise ValueError(f"{path}: no 'transformer.h.N.attn.gating_factor' keys")
        start_layer = min(gates)
        missing = [i for i in range(start_layer, args.n_layers) if i not in gates]
        extra = [i for i in gates if i >= args.n_layers]
        if missing or extra:
            raise ValueError(f"{path}: gates for layers {sorted(gates)} do not cover layers "
                             f"{start_layer}..{args.n_layers - 1} of this model")
        aligner = cls(args, n_tokens=prefix.shape[0], start_layer=start_layer)
        if prefix.shape[1] != args.dim:
            raise ValueError(f"{path}: the prefix has width {prefix.shape[1]}, the model's dim is {args.dim}")
        aligner.prefix.data.copy_(prefix.float())
        for i in range(start_layer, args.n_layers):
            gate = gates[i]
            if gate.numel() != args.n_heads:
                raise ValueError(f"{path}: layer {i}'s gating_factor has shape {tuple(gate.shape)}, "
                                 f"expected (1, {args.n_heads}, 1, 1)")
            aligner.gates.data[i - start_layer] = gate.float().flatten()
        return aligner


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
