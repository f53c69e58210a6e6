"""
A single-file LLaMA, the model alone, with the Aligner written into its attention.

Its module names are the keys of Meta's checkpoints; reading and writing them,
and Hugging Face's folders, is support/formats/'s work (formats.load).

References:
- LLaMA / LLaMA-2 (Touvron et al. 2023): the architecture and Meta's
  checkpoint layout, whose key names the modules below use unchanged.
- Aligner (Zhou, Wu, Zhu, Terzopoulos, arXiv 2312.05503), Eq. 4-7: every
  layer from `start_layer` on also attends, with a separate softmax and a
  per-head gate, to one shared set of prefix tokens. All of it stands in one
  section below, "The attention of an adapted layer (Eq. 4-7)"; `Attention.forward`
  calls it. The paper's baseline, LLaMA-Adapter V1, runs through the same code
  with a prefix per layer. Its other baseline, LoRA (lora.py), adds a low-rank
  update to the queries and values (`lora_projection`), passed to `forward`
  the same way.

Departures from Meta's model.py: no model parallelism (sharded checkpoints are
merged as they load, or split again by FSDP); the KV cache is an object passed to
`forward` rather than state inside the model, so one frozen base serves
training, decoding and many concurrent generations; prompts of different
lengths in one batch are left-padded, with positions counted from each row's
first real token.
"""

import math
from dataclasses import dataclass, fields
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


# The base shape that adapter files (aligner.py, lora.py, prompt_tuning.py) record, so that one made
# for another base is refused.
BASE_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads")


@dataclass
class ModelArgs:
    # params.json's own keys, so that ModelArgs(**params) just works
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None: one key/value head per query head
    vocab_size: int = -1  # -1: take it from the tokenizer
    multiple_of: int = 256  # the feed-forward width is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    hidden_dim: Optional[int] = None  # the feed-forward width itself (a Hugging Face config's intermediate_size)
    # runtime settings, not part of params.json
    max_seq_len: int = 2048
    max_batch_size: int = 32

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"dim {self.dim}, n_heads {self.n_heads} and n_kv_heads {self.n_kv_heads} "
                             "must divide: dim by n_heads, n_heads by n_kv_heads")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        """The SwiGLU width: hidden_dim where given, else Meta's rule, 2/3 of 4 * dim rounded up to multiple_of."""
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def base_shape(self) -> dict:
        """What an adapter file records of the base it was made for, and is refused by another (BASE_KEYS)."""
        return {key: getattr(self, key) for key in BASE_KEYS}

    def check_base(self, base: dict, source: str):
        """Refuse an adapter made for a base of another shape: `base` is the base_shape it records."""
        if base != self.base_shape():
            raise ValueError(f"{source} was made for a base with {base}, not {self.base_shape()}")

    def params(self) -> dict:
        """The keys written to params.json (the runtime settings are left out, and hidden_dim when unset)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("max_seq_len", "max_batch_size")
                and not (f.name == "hidden_dim" and self.hidden_dim is None)}


# -----------------------------------------------------------------------------
# the pieces of a layer, as small functions a test can call alone

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # x / sqrt(mean(x^2) + eps) in float32, by torch's fused kernel (one pass instead of five)
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return normed.type_as(x) * self.weight


def precompute_freqs_cis(head_dim: int, end: int, theta: float = 10000.0) -> torch.Tensor:
    """e^(i * m * theta^(-2j/d)) for positions m < end: (end, head_dim // 2), complex64."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(end).float(), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x0, x1), (x2, x3), ... as complex numbers, as Meta does.

    x: (B, T, H, hd); freqs_cis: (T, hd/2) shared by all rows, or (B, T, hd/2)
    when rows are left-padded and so count positions from different offsets.
    """
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (B, T, H, hd/2)
    freqs = freqs_cis.unsqueeze(-2)  # a heads axis: (T, 1, hd/2) or (B, T, 1, hd/2)
    return torch.view_as_real(xc * freqs).flatten(3).type_as(x)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, H_kv, S, hd) -> (B, H_kv * n_rep, S, hd): query head h reads key/value head h // n_rep."""
    if n_rep == 1:
        return x
    bsz, n_kv_heads, seqlen, head_dim = x.shape
    return x[:, :, None].expand(bsz, n_kv_heads, n_rep, seqlen, head_dim).reshape(
        bsz, n_kv_heads * n_rep, seqlen, head_dim)


# -----------------------------------------------------------------------------
# The attention of an adapted layer (Eq. 4-7): all that the method adds to LLaMA.
#
# One shared prefix P (N, dim) is read by every layer l >= start_layer (the paper's Appendix A):
#   Eq. 4   Â = softmax(Q K^T / sqrt(d) + mask) V    the layer's ordinary causal attention
#   Eq. 5   K_p = P W_k^l,  V_p = P W_v^l            the layer's own frozen weights; no RoPE, no RMSNorm
#   Eq. 6   Ã = softmax(Q K_p^T / sqrt(d)) V_p       its own softmax over the N prefix keys, no mask
#   Eq. 7   A = Â + beta_l Ã
# beta_l starts at zero and is used raw (no tanh): a fresh Aligner leaves the base model exactly
# as it was. The paper writes one gate per layer; the authors' code (lit_llama/aligner.py,
# gating_factor) and Table 1's counts have one per head, as here. LLaMA-Adapter V1, the
# paper's baseline, differs in one place: a prefix P^l of each layer's own instead of P
# (Transformer.aligner_layers hands each layer its prefix).

def sequence_attention(q, k, v, mask=None, is_causal=False):
    """Eq. 4, written out: Â = softmax(Q K^T / sqrt(d) + mask) V.

    q: (B, H, T, hd); k, v: (B, H, S, hd); mask: bool (B or 1, 1, T, S), True
    where a query may look; or no mask and is_causal, for a sequence that starts
    at position 0; or neither, and every query sees every key. The model calls
    the fused kernel instead (`attention` below); tests/test_llama.py checks
    that the two agree.
    """
    if is_causal:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.shape[-1])  # (B, H, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1).type_as(q) @ v  # (B, H, T, hd)


class AlignerLayer(NamedTuple):
    """What one adapted layer reads of the Aligner."""
    prefix: torch.Tensor  # P, (b, N, dim); b is 1, or the batch size when each row has its own Aligner
    gate: torch.Tensor  # beta_l, (b, H)


def prefix_keys_values(prefix: torch.Tensor, wk: nn.Linear, wv: nn.Linear, n_heads: int, head_dim: int):
    """Eq. 5: K_p = P W_k, V_p = P W_v through the layer's own frozen projections.

    prefix (b, N, dim) -> k_p, v_p (b, H, N, hd): each key/value head is repeated
    for the query heads that read it (grouped-query attention).
    """
    bsz, n_tokens, _ = prefix.shape
    k_p = wk(prefix).view(bsz, n_tokens, -1, head_dim).transpose(1, 2)  # (b, H_kv, N, hd)
    v_p = wv(prefix).view(bsz, n_tokens, -1, head_dim).transpose(1, 2)  # (b, H_kv, N, hd)
    n_rep = n_heads // k_p.shape[1]
    return repeat_kv(k_p, n_rep), repeat_kv(v_p, n_rep)  # (b, H, N, hd)


def prefix_attention(q, k_p, v_p, gate):
    """Eq. 6 with its gate, the second term of Eq. 7: beta_l Ã = beta_l * softmax(Q K_p^T / sqrt(d)) V_p.

    The prefix has its own softmax and no mask: every position sees all N
    prefix tokens. q: (B, H, T, hd); k_p, v_p: (b, H, N, hd); gate: (b, H, 1, 1),
    b = 1 or B. Returns (B, H, T, hd).
    """
    bsz, n_heads, seqlen, head_dim = q.shape
    if k_p.shape[2] == 1:
        # softmax over a single key is 1: the term is the constant beta_l * V_p at every position
        return (gate * v_p).expand(bsz, n_heads, seqlen, head_dim)  # a view: no copy
    # Keys-first scores (N, T): a softmax along T is fast where one over a short
    # last axis (N = 10) is not; contiguous q lets the product read q^T in place.
    # The gate scales V_p (N rows) rather than the output (T rows).
    scores = (k_p @ q.contiguous().transpose(-2, -1)).float() / math.sqrt(head_dim)  # (b, H, N, T)
    weights = torch.softmax(scores, dim=-2).type_as(q)  # over the N prefix keys
    return weights.transpose(-2, -1) @ (gate * v_p)  # (B, H, T, N) @ (b, H, N, hd) -> (B, H, T, hd)


def attention(q, k, v, mask, is_causal, prefix=None):
    """Eq. 7: A = Â + beta_l Ã. Â is the causal attention over the sequence (Eq. 4: the fused
    kernel computes sequence_attention); in an adapted layer the gated prefix term is added.

    k, v: (B, H_kv, S, hd), read by H / H_kv query heads each; prefix: None
    or (k_p, v_p, gate) for prefix_attention. Returns (B, H, T, hd).
    """
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                         enable_gqa=q.shape[1] != k.shape[1])  # (B, H, T, hd)
    if prefix is not None:
        out = out + prefix_attention(q, *prefix)
    return out


# -----------------------------------------------------------------------------
# LoRA, the paper's other baseline (lora.py): a low-rank update beside wq and wv

class LoRALayer(NamedTuple):
    """What one layer reads of a LoRA: the low-rank updates of its wq and wv."""
    a_q: torch.Tensor  # (r, dim)
    b_q: torch.Tensor  # (H * hd, r)
    a_v: torch.Tensor  # (r, dim)
    b_v: torch.Tensor  # (H_kv * hd, r)
    scale: float  # alpha / r
    dropout: float  # on the input of the A path; 0 unless the LoRA is training


def lora_projection(x, w: nn.Linear, a, b, scale: float, dropout: float = 0.0):
    """W x + (alpha / r) B A dropout(x), the frozen projection with its low-rank update (Hu et al.
    2021, Eq. 3 and Section 4.1; lit-llama's MergedLinear.forward adds the update after B, scaled).

    x: (B, T, dim); w: (out, dim); a: (r, dim); b: (out, r). Returns (B, T, out).
    """
    after_a = F.linear(F.dropout(x, dropout, training=dropout > 0), a)  # (B, T, r)
    return w(x) + F.linear(after_a, b) * scale  # (B, T, out)


# -----------------------------------------------------------------------------
# the model

class Span(NamedTuple):
    """Where the tokens of one forward sit: computed once per forward, read by every layer."""
    positions: torch.Tensor  # (T,) the cache slots these tokens fill
    freqs_cis: torch.Tensor  # RoPE: (T, hd/2), or (B, T, hd/2) when rows are left-padded
    kv_len: Optional[int]  # attend to cache slots [0, kv_len); None: the whole cache (static shapes)
    mask: Optional[torch.Tensor]  # bool (B or 1, 1, T, S), True where a query may look; None: see is_causal
    is_causal: bool  # with no mask: causal from position 0 (True), or every key visible (False)


class KVCache:
    """What a generation computes once and reuses at every step.

    The keys and values of the positions seen so far, (B, H_kv, max_len, hd)
    per layer, and each adapted layer's prefix keys and values (Eq. 5), which
    depend on the Aligner alone and so are computed on the first forward only:
    a cache serves one generation with one Aligner. `pad[b]` counts the
    left-padding of row b: those slots are never attended to, and row b's
    positions count from its first real token.
    """

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int, device=None,
                 dtype=torch.float32, pad: Optional[torch.Tensor] = None):
        if max_len > args.max_seq_len:
            raise ValueError(f"a cache of {max_len} positions exceeds max_seq_len {args.max_seq_len}")
        shape = (batch_size, args.n_kv_heads, max_len, args.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.max_len = max_len
        self.pad = pad
        self.length = 0  # positions filled so far, when the model counts them (see Transformer.forward)
        self.prefix = [None] * args.n_layers  # (k_p, v_p) per adapted layer, from the first forward

    def update(self, layer: int, k, v, span: Span):
        """Write k, v (B, H_kv, T, hd) into the slots span.positions; return the keys and values to attend to."""
        self.k[layer].index_copy_(2, span.positions, k)
        self.v[layer].index_copy_(2, span.positions, v)
        if span.kv_len is None:
            return self.k[layer], self.v[layer]
        return self.k[layer][:, :, :span.kv_len], self.v[layer][:, :, :span.kv_len]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)

    def forward(self, x, span: Span, aligner=None, cache: Optional[KVCache] = None):
        """aligner: this layer's AlignerLayer (Eq. 4-7), its LoRALayer, or None."""
        bsz, seqlen, _ = x.shape
        lora, aligner = (aligner, None) if isinstance(aligner, LoRALayer) else (None, aligner)

        # QKV (a LoRA adds its update to the queries and values, so the cache holds its values), and RoPE
        if lora is None:
            q, v = self.wq(x), self.wv(x)  # the base path: nothing added, bit for bit the base model
        else:
            q = lora_projection(x, self.wq, lora.a_q, lora.b_q, lora.scale, lora.dropout)  # (B, T, H * hd)
            v = lora_projection(x, self.wv, lora.a_v, lora.b_v, lora.scale, lora.dropout)  # (B, T, H_kv * hd)
        q = q.view(bsz, seqlen, self.n_heads, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = v.view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary_emb(q, span.freqs_cis), apply_rotary_emb(k, span.freqs_cis)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H or H_kv, T, hd)
        if cache is not None:
            k, v = cache.update(self.layer_id, k, v, span)  # (B, H_kv, S, hd): every position so far

        # the Aligner's keys and values (Eq. 5), from this layer's own weights, here in its
        # forward: under FSDP the weights are gathered only while the layer runs
        prefix = None
        if aligner is not None:
            if cache is None or cache.prefix[self.layer_id] is None:
                k_p, v_p = prefix_keys_values(aligner.prefix, self.wk, self.wv, self.n_heads, self.head_dim)
                if cache is not None:
                    cache.prefix[self.layer_id] = (k_p, v_p)
            else:
                k_p, v_p = cache.prefix[self.layer_id]
            prefix = (k_p, v_p, aligner.gate[:, :, None, None])  # gate (b, H, 1, 1)

        out = attention(q, k, v, span.mask, span.is_causal, prefix)  # Eq. 7: (B, H, T, hd)
        out = out.transpose(1, 2).reshape(bsz, seqlen, -1)  # (B, T, dim)
        return self.wo(out)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.ffn_dim, bias=False)
        self.w2 = nn.Linear(args.ffn_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.ffn_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # SwiGLU


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.attention = Attention(args, layer_id)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, span: Span, aligner=None, cache: Optional[KVCache] = None):
        h = x + self.attention(self.attention_norm(x), span, aligner, cache)
        return h + self.feed_forward(self.ffn_norm(h))


# -----------------------------------------------------------------------------
# Prompt Tuning (Lester et al. 2021; prompt_tuning.py): the baseline that acts at the input only.
# Its N soft tokens are ordinary sequence positions, the first N of each row; no layer reads
# anything else of it. Transformer.forward places them on a sequence's first forward and keeps
# them in the KV cache after it.

def place_soft_tokens(h: torch.Tensor, soft: torch.Tensor, pad: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The token embeddings h (B, T, dim) with the soft tokens (N, dim) before them: (B, N + T, dim).

    With left padding, row b's soft tokens come right after its pad[b] padding slots, so they take
    its first N positions as they would alone, and the mask that hides the padding leaves them be.
    """
    bsz, seqlen, dim = h.shape
    n_soft = soft.shape[0]
    x = torch.cat([soft.to(h.dtype).expand(bsz, n_soft, dim), h], dim=1)  # (B, N + T, dim), soft tokens first
    if pad is None:
        return x
    slot = torch.arange(n_soft + seqlen, device=h.device)[None]  # (1, N + T)
    before = pad[:, None]  # (B, 1)
    # each slot's index in x: padding, then the soft tokens, then the real tokens
    source = torch.where(slot < before, slot + n_soft, torch.where(slot < before + n_soft, slot - before, slot))
    return x.gather(1, source[..., None].expand(bsz, n_soft + seqlen, dim))  # (B, N + T, dim)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        if args.vocab_size <= 0:
            raise ValueError("vocab_size must be set (params.json's -1 means: take it from the tokenizer)")
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        # A plain attribute, not a buffer: it stays complex64 whatever dtype the weights take.
        self.freqs_cis = precompute_freqs_cis(args.head_dim, args.max_seq_len, args.rope_theta)
        self.grad_checkpointing = False  # recompute each layer's activations in backward

    def aligner_layers(self, aligner) -> list:
        """Each layer's AlignerLayer: its prefix and its gates; None below start_layer.

        `aligner` carries `prefix`, `gates` (n_layers - start_layer, H), `start_layer` and
        `layer_specific`; the prefix is P (N, dim), shared by every adapted layer, or for a
        LLaMA-Adapter one P^l per layer, (n_layers - start_layer, N, dim). A leading batch
        axis on both tensors gives each row its own.
        """
        if aligner is None:
            return [None] * self.args.n_layers
        if getattr(aligner, "kind", None) == "LoRA":
            return self.lora_layers(aligner)
        prefix, gates = aligner.prefix, aligner.gates
        if gates.dim() == 2:
            prefix, gates = prefix[None], gates[None]  # one Aligner for every row
        n_adapted = self.args.n_layers - aligner.start_layer
        per_layer = (n_adapted,) if aligner.layer_specific else ()
        if prefix.shape[1:-2] != per_layer or prefix.shape[-1] != self.args.dim or \
                gates.shape[1:] != (n_adapted, self.args.n_heads):
            raise ValueError(f"the {'LLaMA-Adapter' if aligner.layer_specific else 'Aligner'} (prefix "
                             f"{tuple(prefix.shape[1:])}, gates {tuple(gates.shape[1:])}) does not fit this model: "
                             f"dim {self.args.dim}, {n_adapted} adapted layers of {self.args.n_heads} heads")
        dtype = self.tok_embeddings.weight.dtype
        prefix, gates = prefix.to(dtype), gates.to(dtype)  # (b, [n_adapted,] N, dim), (b, n_adapted, H)
        layers = [AlignerLayer(prefix[:, i] if aligner.layer_specific else prefix, gates[:, i]) for i in range(n_adapted)]
        return [None] * aligner.start_layer + layers

    def lora_layers(self, lora) -> list:
        """Each layer's LoRALayer, from the LoRA's tensors stacked over the layers (lora.py), in the
        model's dtype; dropout only while the LoRA trains."""
        n, r, dim = self.args.n_layers, lora.rank, self.args.dim
        q_out, v_out = self.args.n_heads * self.args.head_dim, self.args.n_kv_heads * self.args.head_dim
        shapes = {"a_q": (n, r, dim), "b_q": (n, q_out, r), "a_v": (n, r, dim), "b_v": (n, v_out, r)}
        for name, shape in shapes.items():
            if tuple(getattr(lora, name).shape) != shape:
                raise ValueError(f"the LoRA's {name} {tuple(getattr(lora, name).shape)} does not fit this model, "
                                 f"which needs {shape}")
        weight = self.tok_embeddings.weight
        a_q, b_q, a_v, b_v = (getattr(lora, name).to(weight.device, weight.dtype) for name in shapes)
        dropout = lora.dropout if lora.training else 0.0
        return [LoRALayer(a_q[i], b_q[i], a_v[i], b_v[i], lora.scale, dropout) for i in range(n)]

    def span(self, seqlen: int, device, cache: Optional[KVCache], positions: Optional[torch.Tensor]) -> Span:
        """Where this forward's tokens sit, and the mask they need, if any."""
        pad = None if cache is None else cache.pad
        static = positions is not None
        if not static:
            start = 0 if cache is None else cache.length
            end = start + seqlen
            if end > self.args.max_seq_len:
                raise ValueError(f"{end} positions exceed max_seq_len {self.args.max_seq_len}")
            if cache is not None and end > cache.max_len:
                raise ValueError(f"the KV cache holds {cache.max_len} positions; {end} were asked for")
            positions = torch.arange(start, end, device=device)
        freqs_cis = self.freqs_cis.to(device)
        if pad is None:
            freqs_cis = freqs_cis[positions]  # (T, hd/2)
        else:
            freqs_cis = freqs_cis[(positions[None] - pad[:, None]).clamp(min=0)]  # (B, T, hd/2)

        # No mask where the kernel needs none: a whole sequence from position 0 is
        # plain causal attention, and one new token sees every key before it.
        # Handing the kernel a mask it does not need rules out its fastest paths.
        if not static and pad is None and (start == 0 or seqlen == 1):
            return Span(positions, freqs_cis, None if cache is None else end, None, start == 0)
        keys = torch.arange(cache.max_len if static else end, device=device)  # (S,)
        mask = keys[None, :] <= positions[:, None]  # (T, S) causal
        if pad is not None:
            real = keys[None, None, :] >= pad[:, None, None]  # (B, 1, S)
            # A padding query sees itself, so its (unused) softmax row is never all -inf.
            itself = keys[None, :] == positions[:, None]  # (T, S)
            mask = mask & (real | itself)  # (B, T, S)
        mask = mask[..., None, :, :] if mask.dim() == 3 else mask  # (B, 1, T, S) or (T, S)
        return Span(positions, freqs_cis, None if static else end, mask, False)

    def forward(self, tokens: torch.Tensor, aligner=None, cache: Optional[KVCache] = None,
                positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, vocab_size) in float32.

        aligner: None for the base model; or anything with `soft_tokens` (N, dim),
        Prompt Tuning, whose soft tokens go before the tokens on a sequence's first
        forward (place_soft_tokens) and whose positions' logits are left out.
        cache: None for a whole sequence from
        position 0 (training); a KVCache to continue where the last call stopped.
        positions: None, or the (T,) cache slots of the tokens given by the
        caller, for decoding with static shapes (torch.compile): the whole cache
        is then attended under a mask, and cache.length is left alone.
        """
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        soft = getattr(aligner, "soft_tokens", None)  # Prompt Tuning's (N, dim): at the input only
        if soft is not None:
            aligner = None
            if positions is None and (cache is None or cache.length == 0):  # a sequence's first forward
                h = place_soft_tokens(h, soft, None if cache is None else cache.pad)  # (B, N + T, dim)
            else:
                soft = None  # they are in the cache already
        seqlen = h.shape[1]
        span = self.span(seqlen, tokens.device, cache, positions)
        for layer, layer_aligner in zip(self.layers, self.aligner_layers(aligner)):
            if self.grad_checkpointing and torch.is_grad_enabled() and (h.requires_grad or layer_aligner is not None):
                h = checkpoint(layer, h, span, layer_aligner, cache, use_reentrant=False)
            else:
                h = layer(h, span, layer_aligner, cache)
        if cache is not None and positions is None:
            cache.length += seqlen
        if soft is not None:
            # the tokens given: row b's real tokens sit N slots on (its padding's logits mean nothing)
            h = h[:, soft.shape[0]:]  # (B, T, dim)
        return self.output(self.norm(h)).float()  # (B, T, vocab_size)
