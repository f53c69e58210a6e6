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

Files: `save` writes this project's small file; `Aligner.read` reads it and
the lit-llama files of both kinds: the Aligners the paper's authors released
(bf16; their lit_llama/aligner.py names the prefix global_value_embedding and
the gates gating_factor) and lit-llama's LLaMA-Adapter files (an adapter_wte
per layer). Every script that takes an Aligner file reads it through
`Aligner.read`, so those files work wherever ours do; a LoRA file or PEFT
folder given there is handed to lora.py's reader, so LoRAs go there too.
"""

import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

import lora
from llama import BASE_KEYS, ModelArgs
from prompt_tuning import PromptTuning, is_prompt_tuning
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
        theirs = args.base_shape()
        if self.base != theirs:
            raise ValueError(f"{source} was made for a base with {self.base}, not {theirs}")

    # --- files ---------------------------------------------------------------

    def save(self, path):
        """One small file with the tensors, the settings and the base shape; written atomically."""
        atomic_save({"n_tokens": self.n_tokens, "start_layer": self.start_layer, "layer_specific": self.layer_specific,
                     "base": self.base, "prefix": self.prefix.detach().cpu(), "gates": self.gates.detach().cpu()}, path)

    @classmethod
    def read(cls, path, args: ModelArgs = None) -> "Aligner":
        """An Aligner (or LLaMA-Adapter) file of either layout: this project's (`save`) or
        lit-llama's (the paper's authors' Aligners, lit-llama's Adapters). With `args`, refuses a
        file made for a base of another shape; without, a lit-llama file's shape is read from its
        tensors. Every script reads Aligners through here, and LoRAs too: a LoRA file or PEFT
        folder comes back as a lora.LoRA (lora.read)."""
        if Path(path).is_dir():  # a PEFT LoRA folder
            return lora.read(path, args)
        state = load_pt(path, "Aligner file")
        if lora.is_lora_state(state):
            return lora.read(path, args)
        if is_lit_llama(state):
            return cls._from_lit_llama_state(_lit_llama_weights(state), Path(path), args)
        return cls._from_state(state, Path(path), args)

    @classmethod
    def check_file(cls, path):
        """Refuse, before any model loads, a file that is no usable Aligner or Adapter of either
        layout, or LoRA (lora.check_file); returns the AlignerShape (or LoRAShape) it holds."""
        if Path(path).is_dir():
            return lora.check_file(path)
        state = load_pt(path, "Aligner file")
        if lora.is_lora_state(state):
            return lora.check_file(path)
        if is_lit_llama(state):
            parts = _lit_llama_parts(_lit_llama_weights(state), Path(path))
            return AlignerShape(parts.prefix.shape[-2], parts.start_layer, parts.layer_specific)
        aligner = cls._from_state(state, Path(path))
        return AlignerShape(aligner.n_tokens, aligner.start_layer, aligner.layer_specific)

    @classmethod
    def load(cls, path, args: ModelArgs = None) -> "Aligner":
        """An Aligner saved by `save`; with `args`, refuses a file made for a base of another shape."""
        state = load_pt(path, "Aligner file")
        if is_lit_llama(state):
            raise ValueError(f"{path}: this is an Aligner in lit-llama's layout; "
                             "read it with Aligner.read or Aligner.from_lit_llama")
        return cls._from_state(state, Path(path), args)

    @classmethod
    def from_lit_llama(cls, path, args: ModelArgs = None) -> "Aligner":
        """An Aligner released by the paper's authors, or a LLaMA-Adapter, in lit-llama's layout."""
        state = load_pt(path, "Aligner file")
        if not is_lit_llama(state):
            raise ValueError(f"{path}: neither 'global_value_embedding.weight' nor 'adapter_wte' keys; "
                             "not an Aligner or Adapter in lit-llama's layout")
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

    @classmethod
    def _from_lit_llama_state(cls, state: dict, path: Path, args: ModelArgs = None) -> "Aligner":
        """An Aligner or Adapter from lit-llama's layout (see _lit_llama_parts). Without `args`, the
        shape comes from the tensors: the last gated layer is the model's last, and lit-llama's
        attention has one key/value head per query head."""
        parts = _lit_llama_parts(state, path, args)
        if args is None:
            args = _lit_llama_shape(path, parts.prefix.shape[-1], parts.n_layers, parts.gates[parts.start_layer])
        aligner = cls(args, n_tokens=parts.prefix.shape[-2], start_layer=parts.start_layer,
                      layer_specific=parts.layer_specific)
        aligner.prefix.data.copy_(parts.prefix.float())
        for i in range(parts.start_layer, parts.n_layers):
            aligner.gates.data[i - parts.start_layer] = _spread_gate(parts.gates[i], args.n_heads, path,
                                                                     f"transformer.h.{i}.attn.gating_factor")
        return aligner


class LitLlamaParts(NamedTuple):
    """What a lit-llama file holds, checked: its prefix, its gates by layer, and where they sit."""
    prefix: torch.Tensor  # (N, dim) shared; or (n_layers - start_layer, N, dim), one per layer
    gates: dict  # layer -> gating_factor as stored
    start_layer: int
    n_layers: int
    layer_specific: bool


def _lit_llama_parts(state: dict, path: Path, args: ModelArgs = None) -> LitLlamaParts:
    """lit-llama's layout, of either kind:

        global_value_embedding.weight              (N, dim)       the Aligner's shared prefix P
        transformer.h.{i}.attn.gating_factor       (1, H, 1, 1)   layer i's gates, i >= start_layer
        transformer.h.{i}.attn.adapter_wte.weight  (N, dim)       layer i's prefix

    The authors' Aligner (their lit_llama/aligner.py) shares one embedding module among the
    layers, so each layer's adapter_wte is a copy of global_value_embedding; a copy that
    differs is refused. A file without global_value_embedding is a LLaMA-Adapter
    (lit_llama/adapter.py): each adapter_wte is that layer's own prefix P^l. A gating_factor
    of one value (lit-llama's older files) is spread over the heads, as lit-llama's
    _load_from_state_dict does (_spread_gate).
    """
    check_values(path, {key: t for key, t in state.items()
                        if key.endswith(("embedding.weight", "adapter_wte.weight", "gating_factor"))}, "Aligner file")
    shared = state.get("global_value_embedding.weight")
    layer_prefixes, gates = {}, {}
    for key, tensor in state.items():
        if key == "global_value_embedding.weight":
            continue
        match = re.fullmatch(r"transformer\.h\.(\d+)\.attn\.(adapter_wte\.weight|gating_factor)", key)
        if match is None:
            raise ValueError(f"{path}: unexpected key {key!r} for an Aligner in lit-llama's layout")
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{path}: {key!r} is a {type(tensor).__name__}, not a tensor")
        (layer_prefixes if match.group(2) == "adapter_wte.weight" else gates)[int(match.group(1))] = tensor
    if not gates:
        raise ValueError(f"{path}: no 'transformer.h.N.attn.gating_factor' keys")
    start_layer = min(gates)
    n_layers = args.n_layers if args is not None else max(gates) + 1
    if sorted(gates) != list(range(start_layer, n_layers)):
        raise ValueError(f"{path}: gates for layers {sorted(gates)} do not cover layers "
                         f"{start_layer}..{n_layers - 1} of this model")
    if shared is not None:  # the Aligner: one shared prefix, of which each adapter_wte is a copy
        prefix, name = shared, "'global_value_embedding.weight'"
    else:  # LLaMA-Adapter: a prefix of its own in every gated layer
        if sorted(layer_prefixes) != sorted(gates):
            raise ValueError(f"{path}: adapter_wte for layers {sorted(layer_prefixes)} but gating_factor for "
                             f"layers {sorted(gates)}; a LLaMA-Adapter has both in every adapted layer")
        shapes = {tuple(t.shape) for t in layer_prefixes.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"{path}: the layers' adapter_wte shapes {sorted(shapes)} are not one (N, dim)")
        prefix, name = torch.stack([layer_prefixes[i] for i in sorted(layer_prefixes)]), "adapter_wte"
    if not isinstance(prefix, torch.Tensor) or prefix.dim() != 2 + (shared is None) or (
            args is not None and prefix.shape[-1] != args.dim):
        shape = tuple(prefix.shape) if isinstance(prefix, torch.Tensor) else type(prefix).__name__
        raise ValueError(f"{path}: {name} has shape {shape}; the model needs (N, "
                         f"{'dim' if args is None else args.dim})")
    if shared is not None:
        for i, tensor in layer_prefixes.items():
            if not torch.equal(tensor, shared):
                raise ValueError(f"{path}: 'transformer.h.{i}.attn.adapter_wte.weight' differs from "
                                 "'global_value_embedding.weight'; in the authors' layout every layer's "
                                 "adapter_wte is the one shared prefix")
    return LitLlamaParts(prefix, gates, start_layer, n_layers, shared is None)


def _lit_llama_shape(path, dim: int, n_layers: int, gate: torch.Tensor) -> ModelArgs:
    """The base shape a lit-llama file implies, for reading it without the model: the heads from a
    (1, H, 1, 1) gating_factor; lit-llama's attention has one key/value head per query head."""
    if gate.dim() != 4:
        raise ValueError(f"{path}: its gating_factor holds one value for all heads, so the file does not say "
                         "how many heads the model has; read it with the base model's arguments")
    n_heads = gate.shape[1]
    if dim % n_heads:
        raise ValueError(f"{path}: a prefix of width {dim} does not split into {n_heads} heads")
    return ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_heads, vocab_size=1)


def is_lit_llama(state) -> bool:
    """Whether a loaded file is in lit-llama's layout, an Aligner or an Adapter (bare, or under "model"
    as fabric.save writes)."""
    if not isinstance(state, dict):
        return False
    weights = _lit_llama_weights(state)
    return "global_value_embedding.weight" in weights or any(
        isinstance(key, str) and key.endswith(".attn.adapter_wte.weight") for key in weights)


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
# every file the scripts take through --aligner

def read_adapter(path, args: ModelArgs = None):
    """What an --aligner file holds: a Prompt Tuning (prompt_tuning.py) where its "kind" says so,
    else an Aligner or LLaMA-Adapter of either layout, or a LoRA file or PEFT folder (Aligner.read).
    With `args`, refuses a file made for a base of another shape."""
    if not Path(path).is_dir() and is_prompt_tuning(load_pt(path, "Aligner file")):
        return PromptTuning.read(path, args)
    return Aligner.read(path, args)


def check_adapter_file(path):
    """Refuse, before any model loads, an --aligner file that is no usable adapter of any kind;
    returns the shape Aligner.check_file reads (AlignerShape or lora.LoRAShape), or the Prompt Tuning."""
    if not Path(path).is_dir() and is_prompt_tuning(load_pt(path, "Aligner file")):
        return PromptTuning.read(path)
    return Aligner.check_file(path)


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
