"""
Meta's checkpoint format: params.json, consolidated.NN.pth (one file per model-parallel shard) and tokenizer.model.

`MetaCheckpoint` opens a folder without reading its weights; the shards are memory-mapped and
merged one weight at a time as the model loads (shard_dim). `save` writes a model in this
layout, as the demo's base is shipped. Checks that stop a damaged
or mismatched checkpoint with a line naming the file and key live here too (read_params,
check_keys, checked_weight, finite_weight, check_finite); formats.load uses them for every layout.
"""

import json
import math
from pathlib import Path
from typing import Optional

import torch

from llama import ModelArgs, Transformer
from support.files import FileError, atomic_save, atomic_text, load_pt, read_text

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
    """tokenizer.model in the checkpoint folder, or beside it as in Meta's download; where the
    folder is a symbolic link (or lies under one), also beside the folder it points to."""
    ckpt_dir = Path(ckpt_dir)
    places = [ckpt_dir, ckpt_dir.parent]
    target = ckpt_dir.resolve()
    if target != ckpt_dir.absolute():
        places.append(target.parent)
    for place in places:
        if (place / "tokenizer.model").is_file():
            return place / "tokenizer.model"
    where = ", in ".join(str(p) for p in places[:-1]) + f" or in {places[-1]}"
    raise FileNotFoundError(f"no tokenizer.model in {where}; name it with --tokenizer")


def checkpoint_inputs(ckpt, tokenizer=None) -> list:
    """(flag, path) for what a script reads of its base model: the --ckpt folder, and --tokenizer
    or the tokenizer.model that find_tokenizer finds for the folder (beside it, say)."""
    if ckpt is None:
        return []
    if tokenizer is None:
        try:
            tokenizer = find_tokenizer(ckpt)
        except FileNotFoundError:
            pass
    return [("--ckpt", ckpt)] + ([("--tokenizer", tokenizer)] if tokenizer is not None else [])


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


SHAPE_KEYS = ("dim", "n_layers", "n_heads")  # params.json's keys without which the model's shape is unknown


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
    missing = [key for key in SHAPE_KEYS if key not in params]
    if missing:  # ModelArgs' defaults are LLaMA-7B's: filled in, they would describe another model
        raise ValueError(f"{path}: no {' and no '.join(repr(k) for k in missing)}; the model's shape needs "
                         "dim, n_layers and n_heads, which Meta's params.json gives")
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


class MetaCheckpoint:
    """A checkpoint folder as Meta ships it, opened without reading its weights.

    The consolidated.NN.pth shards are memory-mapped; `get` merges one weight
    from its pieces, or only some of its rows, when asked, so that loading
    holds at most one copy of the model, and a rank under FSDP reads only the
    rows it keeps.
    """

    def __init__(self, folder):
        self.folder = Path(folder)
        self.params = read_params(self.folder)
        paths = sorted(self.folder.glob("consolidated.*.pth"))
        if not paths:
            raise FileNotFoundError(f"{self.folder}: no consolidated.*.pth files")
        expected_names = [f"consolidated.{i:02d}.pth" for i in range(len(paths))]
        if [p.name for p in paths] != expected_names:
            raise ValueError(f"{self.folder}: shards {[p.name for p in paths]} are not numbered "
                             f"00 to {len(paths) - 1:02d}")
        self.paths = paths
        self.layout = f"Meta's layout, {len(paths)} shard{'s' * (len(paths) != 1)} merged"
        self.shards = [load_pt(p, "checkpoint shard", mmap=True) for p in paths]
        for path, shard in zip(paths, self.shards):
            if not isinstance(shard, dict) or not all(isinstance(t, torch.Tensor) for t in shard.values()):
                raise ValueError(f"{path}: not a checkpoint shard (expected a dict of weight names to tensors)")
            shard.pop("rope.freqs", None)  # Meta's files carry the RoPE table; it is recomputed here
        for path, shard in zip(paths[1:], self.shards[1:]):
            for key in set(shard) ^ set(self.shards[0]):
                where = "unexpected" if key in shard else "missing"
                raise ValueError(f"{path}: {where} key {key!r} ({paths[0].name} has {len(self.shards[0])} keys)")

    @property
    def tokenizer_path(self) -> Path:
        return find_tokenizer(self.folder)

    def keys(self) -> list:
        return list(self.shards[0])

    def where(self, key: str) -> Path:
        """The file to name in an error about `key`."""
        return self.paths[0]

    def shape(self, key: str) -> tuple:
        """The merged weight's shape, read from the shards' headers, not their data."""
        pieces = [shard[key].shape for shard in self.shards]
        dim = shard_dim(key)
        if dim is None or len(pieces) == 1:
            return tuple(pieces[0])
        merged = list(pieces[0])
        merged[dim] = sum(p[dim] for p in pieces)
        return tuple(merged)

    def get(self, key: str, rows: Optional[slice] = None) -> torch.Tensor:
        """The whole weight, or rows[rows] of its dim 0, merged from the shards that hold them."""
        pieces = [shard[key] for shard in self.shards]
        dim = shard_dim(key)
        if dim is None or len(pieces) == 1:
            return pieces[0] if rows is None else pieces[0][rows]
        if dim == 1:  # every shard holds some columns of every row
            return torch.cat([p if rows is None else p[rows] for p in pieces], 1)
        if rows is None:
            return torch.cat(pieces, 0)
        first, stop, _ = rows.indices(sum(p.shape[0] for p in pieces))
        taken, offset = [], 0
        for p in pieces:  # the rows [first, stop) of the merged weight, from the shards that hold them
            lo, hi = max(first - offset, 0), min(stop - offset, p.shape[0])
            if lo < hi:
                taken.append(p[lo:hi])
            offset += p.shape[0]
        return torch.cat(taken, 0) if taken else pieces[0][:0]


def model_args(ckpt, tokenizer: "Tokenizer", **runtime) -> ModelArgs:
    """ModelArgs from a checkpoint's params, with vocab_size checked against (or taken from) the tokenizer."""
    args = ModelArgs(**ckpt.params, **runtime)
    if args.vocab_size == -1:
        args.vocab_size = tokenizer.n_words
    elif args.vocab_size != tokenizer.n_words:
        raise ValueError(f"{ckpt.folder}: vocab_size {args.vocab_size}, but the tokenizer "
                         f"{ckpt.tokenizer_path} has {tokenizer.n_words} pieces")
    return args


def checked_weight(ckpt, key: str, shape: tuple, rows: Optional[slice] = None) -> torch.Tensor:
    """ckpt.get(key, rows), refused with a line that names it when its shape is not the model's."""
    if ckpt.shape(key) != shape:
        raise ValueError(f"{ckpt.folder}: {key} has shape {ckpt.shape(key)} ({ckpt.layout}); "
                         f"its params imply {shape}")
    return ckpt.get(key, rows)


def check_keys(ckpt, expected) -> None:
    """Refuse a checkpoint whose weights are not exactly the model's, naming the first key that differs."""
    have = set(ckpt.keys())
    for key in ckpt.keys():
        if key not in expected:
            raise ValueError(f"{ckpt.where(key)}: unexpected key {key!r}")
    for key in expected:
        if key not in have:
            raise ValueError(f"{ckpt.folder}: missing key {key!r}")


# The context of a checkpoint in Meta's layout, whose params.json records none: LLaMA-2's
# (Touvron et al. 2023, "Llama 2", Table 1: 4k). LLaMA-1 was trained at 2048.
META_CONTEXT = 4096


def finite_weight(ckpt, key: str, weight: torch.Tensor) -> torch.Tensor:
    """The weight, refused with a line naming its file and key where it holds NaN or an
    infinite value (damaged, or too large for the dtype it was cast to). Checked one weight at
    a time as it loads: a fused attention kernel can turn NaN scores into zeros, hiding from
    the logits a NaN in wq or wk."""
    if not torch.isfinite(weight).all():
        what = "NaN" if torch.isnan(weight).any() else f"an infinite value in {weight.dtype}"
        raise FileError(f"{ckpt.where(key)}: {key} holds {what}; the checkpoint is damaged"
                        + ("" if what == "NaN" else " or too large for this dtype"))
    return weight


def check_finite(model, tokenizer, ckpt_dir):
    """Stop where the base model's first forward is not finite, naming the checkpoint, rather
    than let it generate nonsense or train on NaN: weights each finite can still overflow in a
    narrow dtype. A forward of BOS and the first few pieces."""
    ids = [tokenizer.bos_id] + list(range(min(8, model.args.vocab_size)))
    probe = torch.tensor([ids[:model.args.max_seq_len]], device=model.tok_embeddings.weight.device)  # (1, T)
    with torch.no_grad():
        logits = model(probe)  # (1, T, V)
    if not torch.isfinite(logits).all():
        raise FileError(f"{ckpt_dir}: the base model's first forward gives NaN or infinite logits in "
                        f"{model.tok_embeddings.weight.dtype}; its values are too large for this dtype")
