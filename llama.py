"""
A single-file LLaMA that reads Meta's original checkpoints, with the Aligner
written into its attention.

References:
- LLaMA / LLaMA-2 (Touvron et al. 2023): the architecture and Meta's
  checkpoint layout, whose key names the modules below use unchanged.
- Aligner (Zhou, Wu, Zhu, Terzopoulos, arXiv 2312.05503), Eq. 5-7: every
  layer from `start_layer` on also attends, with a separate softmax and a
  per-head gate, to one shared set of prefix tokens.

Departures from Meta's model.py: no model parallelism (sharded checkpoints are
merged on load); the KV cache is an object passed to `forward` rather than
state inside the model, so one frozen base serves training, decoding and many
concurrent generations; prompts of different lengths in one batch are
left-padded, with positions counted from each row's first real token.
"""

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from files import FileError, atomic_save, atomic_text, load_pt, read_text


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

    def params(self) -> dict:
        """The keys written to params.json (the runtime settings are left out)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("max_seq_len", "max_batch_size")}


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


def sequence_attention(q, k, v, mask=None):
    """The first term of Eq. 6: softmax(Q K^T / sqrt(d) + mask) V, written out.

    q: (B, H, T, hd); k, v: (B, H, S, hd); mask: bool (B or 1, 1, T, S), True
    where a query may look, or None for the causal mask of a sequence that
    starts at position 0. Returns (B, H, T, hd).
    """
    seqlen, kvlen = q.shape[2], k.shape[2]
    if mask is None:
        mask = torch.ones(seqlen, kvlen, dtype=torch.bool, device=q.device).tril()
    scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.shape[-1])  # (B, H, T, S)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1).type_as(q) @ v  # (B, H, T, hd)


def prefix_attention(q, k_p, v_p, gate):
    """The second term of Eq. 6 (Eq. 7): beta_l * softmax(Q K_p^T / sqrt(d)) V_p.

    The prefix has its own softmax and no mask: every position sees all N
    prefix tokens. q: (B, H, T, hd); k_p, v_p: (B or 1, H, N, hd);
    gate: (B or 1, H, 1, 1). Returns (B, H, T, hd).
    """
    # The scores are laid out keys-first, (N, T): a softmax over a short last
    # axis (N is often 10) runs row by row and is slow; over the next-to-last
    # axis it runs along T. q comes in as a transposed view; made contiguous
    # first, the product reads q^T in place rather than copying it transposed.
    # The gate scales V_p (N rows) rather than the output (T rows).
    scores = (k_p @ q.contiguous().transpose(-2, -1)).float() / math.sqrt(q.shape[-1])  # (B, H, N, T)
    weights = torch.softmax(scores, dim=-2).type_as(q)  # over the N prefix keys
    return weights.transpose(-2, -1) @ (gate * v_p)  # (B, H, T, N) @ (B or 1, H, N, hd) -> (B, H, T, hd)


# -----------------------------------------------------------------------------
# the model

class KVCache:
    """What a generation computes once and reuses at every step.

    The keys and values of the positions seen so far, (B, H_kv, max_len, hd)
    per layer, and the Aligner's prefix keys and values (Eq. 5), which depend
    on the Aligner alone and so are computed on the first forward only.
    `pad[b]` counts the left-padding of row b: those positions are never
    attended to, and row b's positions count from its first real token.
    """

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int, device=None,
                 dtype=torch.float32, pad: Optional[torch.Tensor] = None):
        if max_len > args.max_seq_len:
            raise ValueError(f"a cache of {max_len} positions exceeds max_seq_len {args.max_seq_len}")
        shape = (batch_size, args.n_kv_heads, max_len, args.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.pad = pad
        self.length = 0  # positions filled so far
        self.prefix = None  # per-layer (k_p, v_p, gate), set on the first forward

    def update(self, layer: int, k, v):
        """Store k, v (B, H_kv, T, hd) after the filled positions; return all keys and values so far."""
        end = self.length + k.shape[2]
        if end > self.k[layer].shape[2]:
            raise ValueError(f"the KV cache holds {self.k[layer].shape[2]} positions; {end} were asked for")
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


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

    def prefix_kv(self, prefix: torch.Tensor):
        """Eq. 5: K_p = P W_k, V_p = P W_v through this layer's own frozen weights; no RoPE, no norm.

        prefix: (b, N, dim) -> k_p, v_p: (b, H, N, hd), repeated over grouped-query heads.
        """
        bsz, n_tokens, _ = prefix.shape
        k = self.wk(prefix).view(bsz, n_tokens, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(prefix).view(bsz, n_tokens, self.n_kv_heads, self.head_dim).transpose(1, 2)
        n_rep = self.n_heads // self.n_kv_heads
        return repeat_kv(k, n_rep), repeat_kv(v, n_rep)  # (b, H, N, hd)

    def forward(self, x, freqs_cis, mask, prefix=None, cache: Optional[KVCache] = None):
        bsz, seqlen, _ = x.shape

        # QKV, and RoPE on the sequence's queries and keys
        q = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary_emb(q, freqs_cis), apply_rotary_emb(k, freqs_cis)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H or H_kv, T, hd)
        if cache is not None:
            k, v = cache.update(self.layer_id, k, v)  # (B, H_kv, S, hd), S = positions so far

        # Eq. 6, first term: causal attention over the sequence. The fused kernel
        # computes sequence_attention above; tests/test_llama.py checks they agree.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             enable_gqa=self.n_heads != self.n_kv_heads)  # (B, H, T, hd)

        # Eq. 6, second term: the gated attention over the shared prefix
        if prefix is not None:
            k_p, v_p, gate = prefix
            if k_p.shape[2] == 1:
                # softmax over a single key is 1: the term is the constant gate * V_p
                out = out + gate * v_p
            else:
                out = out + prefix_attention(q, k_p, v_p, gate)

        out = out.transpose(1, 2).reshape(bsz, seqlen, -1)  # (B, T, dim)
        return self.wo(out)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        hidden = int(2 * (4 * args.dim) / 3)
        if args.ffn_dim_multiplier is not None:
            hidden = int(args.ffn_dim_multiplier * hidden)
        hidden = args.multiple_of * ((hidden + args.multiple_of - 1) // args.multiple_of)
        self.w1 = nn.Linear(args.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # SwiGLU


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.attention = Attention(args, layer_id)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, freqs_cis, mask, prefix=None, cache=None):
        h = x + self.attention(self.attention_norm(x), freqs_cis, mask, prefix, cache)
        return h + self.feed_forward(self.ffn_norm(h))


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

    def prefix_kv(self, aligner) -> list:
        """Each layer's (k_p, v_p, gate) for the Aligner's shared prefix; None below start_layer.

        `aligner` carries `prefix` (N, dim), `gates` (n_layers - start_layer, H)
        and `start_layer`; a leading batch axis on both gives each row its own.
        """
        prefix, gates = aligner.prefix, aligner.gates
        if prefix.dim() == 2:
            prefix, gates = prefix[None], gates[None]  # one Aligner for every row
        dtype = self.tok_embeddings.weight.dtype
        prefix = prefix.to(dtype)  # (b, N, dim)
        n_adapted = self.args.n_layers - aligner.start_layer
        if prefix.shape[-1] != self.args.dim or gates.shape[1:] != (n_adapted, self.args.n_heads):
            raise ValueError(f"the Aligner (prefix {tuple(prefix.shape[1:])}, gates {tuple(gates.shape[1:])}) "
                             f"does not fit this model: dim {self.args.dim}, {n_adapted} adapted layers "
                             f"of {self.args.n_heads} heads")
        out = [None] * aligner.start_layer
        for i, layer in enumerate(self.layers[aligner.start_layer:]):
            k_p, v_p = layer.attention.prefix_kv(prefix)  # (b, H, N, hd)
            gate = gates[:, i].to(dtype)[:, :, None, None]  # (b, H, 1, 1)
            out.append((k_p, v_p, gate))
        return out

    def forward(self, tokens: torch.Tensor, aligner=None, cache: Optional[KVCache] = None) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, vocab_size) in float32.

        aligner: None for the base model. cache: None for a whole sequence from
        position 0 (training); a KVCache to continue where the last call stopped.
        """
        bsz, seqlen = tokens.shape
        start = 0 if cache is None else cache.length
        if start + seqlen > self.args.max_seq_len:
            raise ValueError(f"{start + seqlen} positions exceed max_seq_len {self.args.max_seq_len}")
        self.freqs_cis = self.freqs_cis.to(tokens.device)
        positions = torch.arange(start, start + seqlen, device=tokens.device)
        pad = cache.pad if cache is not None else None

        if pad is None:
            freqs_cis = self.freqs_cis[positions]  # (T, hd/2)
            # None asks the kernel for its own causal mask; it is right only from position 0
            mask = None if start == 0 else torch.ones(seqlen, start + seqlen, dtype=torch.bool,
                                                      device=tokens.device).tril(start)
        else:
            row_positions = (positions[None] - pad[:, None]).clamp(min=0)  # (B, T)
            freqs_cis = self.freqs_cis[row_positions]  # (B, T, hd/2)
            keys = torch.arange(start + seqlen, device=tokens.device)
            causal = keys[None, :] <= positions[:, None]  # (T, S)
            real = keys[None, None, :] >= pad[:, None, None]  # (B, 1, S)
            # A padding query sees itself, so its (unused) softmax row is never all -inf.
            itself = keys[None, :] == positions[:, None]  # (T, S)
            mask = (causal & (real | itself))[:, None]  # (B, 1, T, S)

        if aligner is None:
            prefixes = [None] * self.args.n_layers
        elif cache is None:
            prefixes = self.prefix_kv(aligner)
        else:
            if cache.prefix is None:
                cache.prefix = self.prefix_kv(aligner)
            prefixes = cache.prefix

        h = self.tok_embeddings(tokens)  # (B, T, dim)
        for layer, prefix in zip(self.layers, prefixes):
            if self.grad_checkpointing and torch.is_grad_enabled() and h.requires_grad:
                h = checkpoint(layer, h, freqs_cis, mask, prefix, cache, use_reentrant=False)
            else:
                h = layer(h, freqs_cis, mask, prefix, cache)
        if cache is not None:
            cache.length += seqlen
        return self.output(self.norm(h)).float()  # (B, T, vocab_size)


# -----------------------------------------------------------------------------
# the tokenizer

class Tokenizer:
    """Meta's SentencePiece model: encode and decode, with its bos/eos ids."""

    def __init__(self, model_path):
        from sentencepiece import SentencePieceProcessor

        model_path = Path(model_path)
        if not model_path.is_file():
            raise FileNotFoundError(f"{model_path}: no tokenizer model here")
        try:
            self.sp = SentencePieceProcessor(model_file=str(model_path))
        except Exception as e:  # SentencePiece raises RuntimeError or OSError on a damaged file
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise FileError(f"{model_path}: cannot be read as a SentencePiece tokenizer ({reason[:200]})") from None
        self.n_words = self.sp.vocab_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id()

    def encode(self, s: str, bos: bool = True, eos: bool = False) -> list:
        return [self.bos_id] * bos + self.sp.encode(s) + [self.eos_id] * eos

    def decode(self, ids) -> str:
        return self.sp.decode(list(ids))


def find_tokenizer(ckpt_dir) -> Path:
    """tokenizer.model in the checkpoint folder, or beside it as in Meta's download."""
    ckpt_dir = Path(ckpt_dir)
    for path in (ckpt_dir / "tokenizer.model", ckpt_dir.parent / "tokenizer.model"):
        if path.is_file():
            return path
    raise FileNotFoundError(f"no tokenizer.model in {ckpt_dir} or in {ckpt_dir.parent}; "
                            "pass the tokenizer's path explicitly")


# -----------------------------------------------------------------------------
# Meta's checkpoint format: params.json and consolidated.NN.pth, one file per
# model-parallel shard

# How Meta splits each weight over model-parallel shards: the dimension its
# pieces are concatenated on. 1-D weights (the norms) are copied whole in every shard.
def shard_dim(key: str) -> Optional[int]:
    if key.endswith("norm.weight"):
        return None
    if key.startswith("tok_embeddings.") or key.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        return 1
    return 0  # wq, wk, wv, w1, w3, output


def save(model: Transformer, ckpt_dir, n_shards: int = 1):
    """Write `model` as Meta ships a checkpoint: params.json and n_shards consolidated.NN.pth files."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    shards = [{} for _ in range(n_shards)]
    for key, tensor in state.items():
        dim = shard_dim(key)
        if dim is not None and tensor.shape[dim] % n_shards:
            raise ValueError(f"{key} of shape {tuple(tensor.shape)} does not split into {n_shards} shards")
        for i in range(n_shards):
            piece = tensor if dim is None else tensor.chunk(n_shards, dim)[i]
            shards[i][key] = piece.clone()  # a copy, so the file holds this shard and not the whole tensor
    for i, shard in enumerate(shards):
        atomic_save(shard, ckpt_dir / f"consolidated.{i:02d}.pth")
    text = json.dumps(model.args.params(), indent=2) + "\n"
    atomic_text(ckpt_dir / "params.json", text)


# What each params.json key must hold: (integer only?, may be null?, the values it allows)
PARAM_RULES = {"dim": (True, False, "positive"), "n_layers": (True, False, "positive"),
               "n_heads": (True, False, "positive"), "n_kv_heads": (True, True, "positive"),
               "vocab_size": (True, False, "-1 or positive"), "multiple_of": (True, False, "positive"),
               "ffn_dim_multiplier": (False, True, "positive"), "norm_eps": (False, False, "positive"),
               "rope_theta": (False, False, "positive")}


def param_problem(value, integer: bool, nullable: bool, allowed: str):
    """What is wrong with one params.json value, or None."""
    if value is None and nullable:
        return None
    number = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not number or not math.isfinite(value):
        return f"must be {'an integer' if integer else 'a number'}{' or null' if nullable else ''}, not {value!r}"
    if not (value > 0 or (allowed == "-1 or positive" and value == -1)):
        return f"is {value}; it must be {allowed}"
    return None


def read_params(ckpt_dir) -> dict:
    """params.json as a dict of ModelArgs' keys, each checked for its type and range, so that a
    wrong value stops here with the file and the key, not later inside the model."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"{ckpt_dir}: no checkpoint folder here")
    path = ckpt_dir / "params.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; a Meta checkpoint folder holds params.json "
                                "beside consolidated.00.pth")
    try:
        params = json.loads(read_text(path, "params.json"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(params, dict):
        raise ValueError(f"{path}: expected a JSON object of the model's settings, got {type(params).__name__}")
    known = set(ModelArgs().params())
    for key, value in params.items():
        if key not in known:
            raise ValueError(f"{path}: unknown key {key!r}; this model reads {sorted(known)}")
        problem = param_problem(value, *PARAM_RULES[key])
        if problem:
            raise ValueError(f"{path}: {key!r} {problem}")
    try:
        ModelArgs(**params)
    except ValueError as e:  # dim, n_heads and n_kv_heads that do not divide
        raise ValueError(f"{path}: {e}") from None
    return params


def load(ckpt_dir, device="cpu", dtype=torch.float32, tokenizer_path=None,
         max_seq_len: int = 2048, max_batch_size: int = 32):
    """A frozen Transformer and its Tokenizer from a Meta checkpoint folder.

    Shards are memory-mapped and merged one weight at a time into a model built
    on the meta device, so at most one full copy of the weights is ever held.
    """
    ckpt_dir = Path(ckpt_dir)
    params = read_params(ckpt_dir)
    tokenizer = Tokenizer(tokenizer_path or find_tokenizer(ckpt_dir))
    args = ModelArgs(**params, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    if args.vocab_size == -1:
        args.vocab_size = tokenizer.n_words
    elif args.vocab_size != tokenizer.n_words:
        raise ValueError(f"{ckpt_dir / 'params.json'}: vocab_size {args.vocab_size}, "
                         f"but the tokenizer has {tokenizer.n_words} pieces")

    paths = sorted(ckpt_dir.glob("consolidated.*.pth"))
    if not paths:
        raise FileNotFoundError(f"{ckpt_dir}: no consolidated.*.pth files")
    expected_names = [f"consolidated.{i:02d}.pth" for i in range(len(paths))]
    if [p.name for p in paths] != expected_names:
        raise ValueError(f"{ckpt_dir}: shards {[p.name for p in paths]} are not numbered 00 to {len(paths) - 1:02d}")
    shards = [load_pt(p, "checkpoint shard", mmap=True) for p in paths]
    for path, shard in zip(paths, shards):
        if not isinstance(shard, dict) or not all(isinstance(t, torch.Tensor) for t in shard.values()):
            raise ValueError(f"{path}: not a checkpoint shard (expected a dict of weight names to tensors)")
        shard.pop("rope.freqs", None)  # Meta's files carry the RoPE table; it is recomputed here

    with torch.device("meta"):
        model = Transformer(args)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for path, shard in zip(paths, shards):
        for key in shard:
            if key not in expected:
                raise ValueError(f"{path}: unexpected key {key!r}")
        for key in expected:
            if key not in shard:
                raise ValueError(f"{path}: missing key {key!r}")

    state = {}
    for key, shape in expected.items():
        dim = shard_dim(key)
        pieces = [shard.pop(key) for shard in shards]
        merged = pieces[0] if dim is None or len(pieces) == 1 else torch.cat(pieces, dim)
        if tuple(merged.shape) != shape:
            raise ValueError(f"{ckpt_dir}: {key} is {tuple(merged.shape)} after merging {len(paths)} shard(s); "
                             f"params.json implies {shape}")
        state[key] = merged.to(device=device, dtype=dtype)
        del pieces, merged
    model.load_state_dict(state, strict=True, assign=True)
    model.freqs_cis = precompute_freqs_cis(args.head_dim, args.max_seq_len, args.rope_theta).to(device)
    model.requires_grad_(False)
    return model.eval(), tokenizer
