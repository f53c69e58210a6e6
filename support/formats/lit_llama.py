"""
lit-llama's adapter files, read into this project's modules: the paper authors' Aligners, LLaMA-Adapters and LoRAs.

Aligners and LLaMA-Adapters (aligner_parts has the keys): the Aligners the paper's authors
released (bf16; their lit_llama/aligner.py names the prefix global_value_embedding and the gates
gating_factor) and lit-llama's own LLaMA-Adapter files (lit_llama/adapter.py: an adapter_wte per
layer), either bare or under "model" as fabric.save writes them. LoRAs: lit-llama's
lit_llama/lora.py, which the authors' finetune/lora.py trains and saves as lora_state_dict,
transformer.h.{i}.attn.c_attn.lora_A and lora_B.
"""

import re
from pathlib import Path
from typing import NamedTuple

import torch

from aligner import Aligner, AlignerShape
from llama import ModelArgs
from lora import LoRA, LoRAShape, checked_tensor
from support.files import FileError, check_values

LIT_KEY = re.compile(r"transformer\.h\.(\d+)\.attn\.c_attn\.lora_([AB])")  # a LoRA's keys
# alpha where a file does not record it (lit-llama's): the authors' finetune/lora.py, line 43
LIT_LLAMA_ALPHA = 16


def weights(state):
    """The weights of a loaded file: bare, or under "model" as fabric.save writes them."""
    return state["model"] if isinstance(state, dict) and isinstance(state.get("model"), dict) else state


# -----------------------------------------------------------------------------
# Aligners and LLaMA-Adapters

def aligner_from_state(state, path: Path, args: ModelArgs = None) -> Aligner:
    """An Aligner or Adapter from a loaded file (see aligner_parts). Without `args`, the shape
    comes from the tensors: the last gated layer is the model's last, and lit-llama's attention
    has one key/value head per query head."""
    parts = aligner_parts(weights(state), path, args)
    if args is None:
        args = aligner_base(path, parts.prefix.shape[-1], parts.n_layers, parts.gates[parts.start_layer])
    aligner = Aligner(args, n_tokens=parts.prefix.shape[-2], start_layer=parts.start_layer,
                      layer_specific=parts.layer_specific)
    aligner.prefix.data.copy_(parts.prefix.float())
    for i in range(parts.start_layer, parts.n_layers):
        aligner.gates.data[i - parts.start_layer] = spread_gate(parts.gates[i], args.n_heads, path,
                                                                f"transformer.h.{i}.attn.gating_factor")
    return aligner


def aligner_shape(state, path: Path) -> AlignerShape:
    """What a loaded file says of its Aligner's shape, checked as aligner_from_state checks it."""
    parts = aligner_parts(weights(state), path)
    return AlignerShape(parts.prefix.shape[-2], parts.start_layer, parts.layer_specific)


class LitLlamaParts(NamedTuple):
    """What a lit-llama file holds, checked: its prefix, its gates by layer, and where they sit."""
    prefix: torch.Tensor  # (N, dim) shared; or (n_layers - start_layer, N, dim), one per layer
    gates: dict  # layer -> gating_factor as stored
    start_layer: int
    n_layers: int
    layer_specific: bool


def aligner_parts(state: dict, path: Path, args: ModelArgs = None) -> LitLlamaParts:
    """lit-llama's layout, of either kind:

        global_value_embedding.weight              (N, dim)       the Aligner's shared prefix P
        transformer.h.{i}.attn.gating_factor       (1, H, 1, 1)   layer i's gates, i >= start_layer
        transformer.h.{i}.attn.adapter_wte.weight  (N, dim)       layer i's prefix

    The authors' Aligner (their lit_llama/aligner.py) shares one embedding module among the
    layers, so each layer's adapter_wte is a copy of global_value_embedding; a copy that
    differs is refused. A file without global_value_embedding is a LLaMA-Adapter
    (lit_llama/adapter.py): each adapter_wte is that layer's own prefix P^l. A gating_factor
    of one value (lit-llama's older files) is spread over the heads, as lit-llama's
    _load_from_state_dict does (spread_gate).
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


def aligner_base(path, dim: int, n_layers: int, gate: torch.Tensor) -> ModelArgs:
    """The base shape a lit-llama file implies, for reading it without the model: the heads from a
    (1, H, 1, 1) gating_factor; lit-llama's attention has one key/value head per query head."""
    if gate.dim() != 4:
        raise ValueError(f"{path}: its gating_factor holds one value for all heads, so the file does not say "
                         "how many heads the model has; read it with the base model's arguments")
    n_heads = gate.shape[1]
    if dim % n_heads:
        raise ValueError(f"{path}: a prefix of width {dim} does not split into {n_heads} heads")
    return ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_heads, vocab_size=1)


def is_aligner(state) -> bool:
    """Whether a loaded file is in lit-llama's layout, an Aligner or an Adapter (bare, or under "model"
    as fabric.save writes)."""
    if not isinstance(state, dict):
        return False
    found = weights(state)
    return "global_value_embedding.weight" in found or any(
        isinstance(key, str) and key.endswith(".attn.adapter_wte.weight") for key in found)


def spread_gate(tensor, n_heads: int, path, key) -> torch.Tensor:
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
# LoRAs

def is_lora(state) -> bool:
    """Whether a loaded file holds lit-llama's LoRA keys."""
    found = weights(state)
    return isinstance(found, dict) and any(isinstance(k, str) and LIT_KEY.fullmatch(k) for k in found)


def lora_shape(state, path: Path) -> LoRAShape:
    """What a loaded file says of its LoRA's shape: the rank, and the alpha lit-llama's files do not record."""
    pairs = lora_pairs(weights(state), path)
    return LoRAShape(next(iter(pairs.values()))[0].shape[0] // 2, LIT_LLAMA_ALPHA)


def lora_pairs(stored, path: Path) -> dict:
    """{layer: (lora_A, lora_B)} of lit-llama's file, every key checked to be one of these."""
    if not isinstance(stored, dict):
        raise FileError(f"{path}: holds a {type(stored).__name__}, not a LoRA's dict of tensors")
    found = {}
    for key, tensor in stored.items():
        match = LIT_KEY.fullmatch(key) if isinstance(key, str) else None
        if match is None:
            raise FileError(f"{path}: unexpected key {key!r}; lit-llama's LoRA file holds only "
                            "transformer.h.N.attn.c_attn.lora_A and lora_B")
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2:
            raise FileError(f"{path}: {key} is not a 2-D tensor")
        found.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
    if not found:
        raise FileError(f"{path}: no transformer.h.N.attn.c_attn.lora_A keys: not a LoRA file")
    for i in range(max(found) + 1):
        for part in "AB":
            if part not in found.get(i, {}):
                raise FileError(f"{path}: missing key 'transformer.h.{i}.attn.c_attn.lora_{part}'")
    pairs = {i: (found[i]["A"], found[i]["B"]) for i in sorted(found)}
    a0, b0 = pairs[0]
    if a0.shape[0] % 2 or b0.shape[0] % 2 or b0.shape[1] != a0.shape[0] // 2:
        raise FileError(f"{path}: transformer.h.0.attn.c_attn.lora_A has shape {tuple(a0.shape)} and lora_B "
                        f"{tuple(b0.shape)}; lit-llama's hold (2r, dim) and (2 dim, r), for q and v")
    for i, (a, b) in pairs.items():  # one rank and one width in every layer
        for part, t, first in (("A", a, a0), ("B", b, b0)):
            if t.shape != first.shape:
                raise FileError(f"{path}: transformer.h.{i}.attn.c_attn.lora_{part} has shape {tuple(t.shape)}, "
                                f"layer 0's {tuple(first.shape)} (rank {a0.shape[0] // 2})")
    return pairs


def lora_from_state(state, path: Path, args: ModelArgs, dropout: float = 0.05) -> LoRA:
    """lit-llama's file. In its fused c_attn = [wq; wk; wv] (scripts/convert_checkpoint.py), lora_A
    (2r, dim) stacks A_q over A_v, and lora_B (2 dim, r) stacks B_q over B_v: the grouped
    convolution of MergedLinear.forward (groups = 2) sends A's first r rows through B's first dim
    rows, the queries, and its last r rows through the last dim, the values; zero_pad leaves the
    keys unchanged. lit-llama keeps Meta's rotary order of wq's rows (adjacent pairs, its
    apply_rope), so B_q applies to Meta's wq as it is. alpha: LIT_LLAMA_ALPHA. `dropout` is the one a
    further training run uses, the file recording none."""
    pairs = lora_pairs(weights(state), path)
    if args is None:
        raise FileError(f"{path}: lit-llama's LoRA file does not record the model's heads; read it with the "
                        "base model's arguments")
    if args.n_kv_heads != args.n_heads:
        raise FileError(f"{path}: lit-llama's fused qkv has one key/value head per query head; this model has "
                        f"{args.n_heads} query heads and {args.n_kv_heads} key/value heads")
    if len(pairs) != args.n_layers:
        raise FileError(f"{path}: LoRA for {len(pairs)} layers; this model has {args.n_layers} "
                        f"(missing key 'transformer.h.{min(len(pairs), args.n_layers)}.attn.c_attn.lora_A')")
    rank = pairs[0][0].shape[0] // 2
    lora = LoRA(args, rank, LIT_LLAMA_ALPHA, dropout)
    for i, (a, b) in pairs.items():
        a = checked_tensor(path, f"transformer.h.{i}.attn.c_attn.lora_A", a, (2 * rank, args.dim))
        b = checked_tensor(path, f"transformer.h.{i}.attn.c_attn.lora_B", b, (2 * args.dim, rank))
        lora.a_q.data[i], lora.a_v.data[i] = a[:rank], a[rank:]  # (r, dim) each
        lora.b_q.data[i], lora.b_v.data[i] = b[:args.dim], b[args.dim:]  # (dim, r) each
    return lora
