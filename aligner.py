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
N(0, 1), the scale of an RMS-normalised hidden state (the authors' and
lit-llama's nn.Embedding start so too). Every run of the authors began from
one and the same such draw, PyTorch's CUDA generator seeded 1337;
`authors_prefix` makes it again on the CPU (Philox4x32-10, `cuda_normal`), and
the training scripts start from it with `--prefix-init authors`. It is what the
paper's Section 4.4 found "exactly the same" in Aligners trained on different
tasks: the draw's values that bf16 steps left where they were.

The paper's baseline, LLaMA-Adapter V1 (Zhang et al., arXiv 2303.16199, as
lit-llama's lit_llama/adapter.py implements it), is the same module with
`layer_specific=True`: each adapted layer l has a prefix P^l of its own,
(n_layers - start_layer, N, dim), and the same gates and attention. The
paper's claim is that the one shared prefix does as well as these
layer-specific ones with a fraction of the parameters (Table 1: 5,056 for a
one-token Aligner on LLaMA-2-7B against 1,229,760 for the Adapter at N = 10).

Files: `save` writes this project's small file and `load` reads it. The
lit-llama files of both kinds, the Aligners the paper's authors released and
lit-llama's LLaMA-Adapter files, are read by support/formats/lit_llama.py; every
script takes an Aligner file through support.formats.read_adapter, so those
files work wherever ours do, and LoRA files and PEFT folders too.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from llama import BASE_KEYS, ModelArgs
from support.files import atomic_save, check_values, load_pt


class AlignerShape(NamedTuple):
    """What an Aligner file says of the Aligner's own shape."""
    n_tokens: int
    start_layer: int
    layer_specific: bool  # a LLaMA-Adapter


class Aligner(nn.Module):
    def __init__(self, args: ModelArgs, n_tokens: int = 10, start_layer: int = 2, layer_specific: bool = False):
        super().__init__()
        if n_tokens < 1:
            raise ValueError(f"an Aligner needs at least one token, not {n_tokens}")
        if not 0 <= start_layer < args.n_layers:
            raise ValueError(f"start_layer {start_layer} is outside the model's {args.n_layers} layers")
        self.n_tokens = n_tokens
        self.start_layer = start_layer
        self.layer_specific = layer_specific
        self.base = args.base_shape()
        n_adapted = args.n_layers - start_layer
        # P (N, dim), shared by all adapted layers; LLaMA-Adapter: P^l (n_adapted, N, dim), one per layer
        self.prefix = nn.Parameter(torch.randn((n_adapted,) * layer_specific + (n_tokens, args.dim)))
        self.gates = nn.Parameter(torch.zeros(n_adapted, args.n_heads))  # beta_l per head

    @property
    def kind(self) -> str:
        return "LLaMA-Adapter" if self.layer_specific else "Aligner"

    def num_params(self) -> int:
        """N * dim + (n_layers - start_layer) * n_heads: 5,056 for LLaMA-2-7B with N = 1.
        LLaMA-Adapter: (n_layers - start_layer) * (N * dim + n_heads): 1,229,760 with N = 10."""
        return sum(p.numel() for p in self.parameters())

    def describe(self) -> str:
        """One line for the scripts to print: what it is and how many parameters it trains."""
        tokens = f"{self.n_tokens} token{'s' * (self.n_tokens != 1)}"
        where = (f"in each of the {self.gates.shape[0]} layers from layer {self.start_layer}" if self.layer_specific
                 else f"from layer {self.start_layer}")
        return f"{self.kind}: {tokens} {where}, {self.num_params():,} parameters"

    def check_fits(self, args: ModelArgs, source="the Aligner"):
        args.check_base(self.base, source)

    # --- files ---------------------------------------------------------------

    def save(self, path):
        """One small file with the tensors, the settings and the base shape; written atomically."""
        atomic_save({"n_tokens": self.n_tokens, "start_layer": self.start_layer, "layer_specific": self.layer_specific,
                     "base": self.base, "prefix": self.prefix.detach().cpu(), "gates": self.gates.detach().cpu()}, path)

    @classmethod
    def load(cls, path, args: ModelArgs = None) -> "Aligner":
        """An Aligner saved by `save`; with `args`, refuses a file made for a base of another shape.
        Files of every kind and layout are read by support.formats.read_adapter."""
        return cls.from_state(load_pt(path, "Aligner file"), Path(path), args)

    @classmethod
    def from_state(cls, state, path: Path, args: ModelArgs = None) -> "Aligner":
        """The Aligner in a loaded file of `save`'s; `path` names it in errors."""
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
        layer_specific = state.get("layer_specific", False)  # files from before LLaMA-Adapter hold no such key
        if not isinstance(layer_specific, bool):
            raise ValueError(f"{path}: 'layer_specific' must be true or false, not {layer_specific!r}")
        try:
            shape_args = ModelArgs(**{key: base[key] for key in BASE_KEYS}, vocab_size=1)
            aligner = cls(shape_args, n_tokens=state["n_tokens"], start_layer=state["start_layer"],
                          layer_specific=layer_specific)
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


# -----------------------------------------------------------------------------
# the authors' starting prefix, drawn again on the CPU

# The authors' finetune/aligner.py seeds every run alike, fabric.seed_everything(1337 + global_rank)
# (line 103; devices = 1, line 39, so rank 0), and the first module their LLaMA builds
# (lit_llama/aligner.py, line 246) is the prefix, nn.Embedding(N, dim), drawn by PyTorch's CUDA
# normal_ in bf16 (precision="bf16-true", line 100).
AUTHORS_SEED = 1337
# PyTorch's CUDA normal_ launches one 256-thread block per 256 values, capped at the blocks the GPU
# holds at once (ATen's cuda/DistributionTemplates.h, calc_execution_policy). 129,024 threads (84
# SMs of 1,536, as an RTX A6000 or A40 has) is the cap that reproduces the released MetaMath
# Aligners of 100 and 300 tokens, whose 409,600 and 1,228,800 values outnumber it (our inference
# from those files; the cap changes nothing for N * dim up to 129,024).
AUTHORS_GPU_THREADS = 129_024

PHILOX_M = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))  # Philox4x32's round multipliers
PHILOX_W = (np.uint64(0x9E3779B9), np.uint64(0xBB67AE85))  # its key increments (golden ratio, sqrt(3) - 1)
MASK32, SHIFT32 = np.uint64(0xFFFFFFFF), np.uint64(32)


def philox4x32_10(counter, key):
    """Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel Random Numbers: As Easy as 1, 2, 3",
    SC 2011): four 32-bit words out of a counter of four and a key of two, in ten rounds.

    counter: four arrays (or ints) of 32-bit values, broadcast together; key: two ints.
    Returns four uint64 arrays holding 32-bit words. Each round multiplies two counter words
    into 64-bit products (exact in uint64) and mixes their halves with the other words and the key.
    """
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in counter)
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    for _ in range(10):
        p0, p1 = PHILOX_M[0] * c0, PHILOX_M[1] * c2
        c0, c1, c2, c3 = (p1 >> SHIFT32) ^ c1 ^ k0, p1 & MASK32, (p0 >> SHIFT32) ^ c3 ^ k1, p0 & MASK32
        k0, k1 = (k0 + PHILOX_W[0]) & MASK32, (k1 + PHILOX_W[1]) & MASK32
    return c0, c1, c2, c3


def box_muller(x, y, cosine):
    """curand's Box-Muller on two 32-bit words, in float32 as curand computes it: u and v are the
    words' midpoints in (0, 1] and (0, 2 pi]; the value is sqrt(-2 ln u) sin v (cos v where `cosine`)."""
    step, step_2pi = np.float32(2.0 ** -32), np.float32(2.0 ** -32) * np.float32(2 * np.pi)
    u = x.astype(np.float32) * step + step / np.float32(2)
    v = y.astype(np.float32) * step_2pi + step_2pi / np.float32(2)
    return np.sqrt(np.float32(-2) * np.log(u)) * np.where(cosine, np.cos(v), np.sin(v))


def cuda_normal(n: int, seed: int, threads: int = AUTHORS_GPU_THREADS) -> torch.Tensor:
    """The n values, float32, that PyTorch's CUDA normal_ writes into a fresh tensor right after
    torch.manual_seed(seed), reproduced on the CPU. numpy's float32 log, sin and cos stand in for
    curand's, which may differ in the last bit; a cast to bf16 nearly always hides that.

    How CUDA draws them (ATen's distribution_nullary_kernel, curand_normal4 over curand's
    Philox4x32-10): T = min(threads, n) threads (rounded up to a block of 256) walk the tensor in
    passes of 4 T values. In pass r, thread t takes the Philox words (x, y, z, w) of counter
    (r, 0, t, 0) under key (the seed's low and high 32 bits) and makes four normals, sin and cos
    from (x, y), then from (z, w), which land at r * 4T + t, + T, + 2T and + 3T. Where
    n <= threads, value i is the sine of counter (0, 0, i, 0).
    """
    i = np.arange(n, dtype=np.uint64)
    span = np.uint64(-(-min(threads, n) // 256) * 256)  # T, whole blocks
    r, within = i // (np.uint64(4) * span), i % (np.uint64(4) * span)
    which, t = within // span, within % span  # which of the thread's four values, and the thread
    zero = np.zeros_like(i)
    x, y, z, w = philox4x32_10((r, zero, t, zero), (seed & 0xFFFFFFFF, seed >> 32))
    first_pair = which < 2
    values = box_muller(np.where(first_pair, x, z), np.where(first_pair, y, w), cosine=which % 2 == 1)
    return torch.from_numpy(values.astype(np.float32))


def authors_prefix(n_tokens: int, dim: int) -> torch.Tensor:
    """(N, dim) bf16: the prefix every one of the authors' Aligner runs started from, the seed-1337
    CUDA draw of nn.Embedding(N, dim). Their runs trained it in pure bf16, where a step smaller than
    half a bf16 step leaves a value exactly as drawn: 3,404 and 2,405 of the 4,096 values of the
    released one-token Alpaca and MetaMath Aligners are these (tests/test_authors_prefix.py)."""
    return cuda_normal(n_tokens * dim, AUTHORS_SEED).to(torch.bfloat16).view(n_tokens, dim)


# -----------------------------------------------------------------------------
# many Aligners over one base model

@dataclass
class AlignerRows:
    """One Aligner per batch row: what Transformer.forward reads from an Aligner, with a batch axis."""
    prefix: torch.Tensor  # (B, N, dim); LLaMA-Adapters: (B, n_layers - start_layer, N, dim)
    gates: torch.Tensor  # (B, n_layers - start_layer, n_heads)
    start_layer: int
    layer_specific: bool = False


class AlignerBank:
    """Aligners of one shape stacked into two tensors, so each batch row can pick its own.

    A bank of K one-token Aligners for LLaMA-2-7B holds K * 5,056 values. LLaMA-Adapters
    bank the same way, each row with its own per-layer prefixes.
    `None` in the list stands for the base model: a zero prefix with zero gates,
    which adds exactly nothing.
    """

    def __init__(self, aligners: list):
        real = [a for a in aligners if a is not None]
        if not real:
            raise ValueError("an AlignerBank needs at least one Aligner")
        for a in real:
            if not isinstance(a, Aligner):
                raise ValueError(f"a {a.kind} cannot share a batch with other adapters or the base model: "
                                 "a LoRA changes the base's own projections, a Prompt Tuning lengthens every "
                                 "row; generate with it in a batch of its own")
        first = real[0]
        for a in real[1:]:
            if shape_of(a) != shape_of(first):
                raise ValueError("the Aligners in one bank must share their kind, n_tokens, start_layer and base "
                                 f"shape; got {shape_of(a)[:3]} beside {shape_of(first)[:3]}")
        self.start_layer = first.start_layer
        self.layer_specific = first.layer_specific
        with torch.no_grad():
            self.prefix = torch.stack([torch.zeros_like(first.prefix) if a is None else a.prefix.detach()
                                       for a in aligners])  # (K, N, dim), or (K, n_adapted, N, dim)
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
        return AlignerRows(self.prefix[rows], self.gates[rows], self.start_layer, self.layer_specific)


def shape_of(aligner) -> tuple:
    """What Aligners must share to sit in one AlignerBank: (kind, N, start layer, base shape)."""
    return aligner.kind, aligner.n_tokens, aligner.start_layer, tuple(sorted(aligner.base.items()))
