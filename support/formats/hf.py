"""
Hugging Face LLaMA folders (config.json, safetensors or .bin weights), read in Meta's key names and layout.

They are read without the safetensors or transformers packages, so that a
model built from Meta's checkpoints loads them unchanged.

What it reads, from a folder holding config.json:
- config.json, mapped to ModelArgs' names (hidden_size -> dim,
  intermediate_size -> hidden_dim, ...); a setting this model cannot represent
  (rope scaling, biases, tied embeddings, another activation) is refused.
- the weights, the first of these that exists: model.safetensors.index.json
  with its model-0000N-of-0000M.safetensors, model.safetensors,
  pytorch_model.bin.index.json with its pytorch_model-*.bin, pytorch_model.bin.
- tokenizer.model, the SentencePiece model Meta shipped, copied into the folder.

References:
- The safetensors format (github.com/huggingface/safetensors, "Format"): an
  8-byte little-endian header length N, N bytes of JSON
  {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
  then the raw little-endian data, with offsets counted from the end of the header.
- transformers' convert_llama_weights_to_hf.py renames Meta's keys and permutes
  the rows of wq and wk within each head, from Meta's rotary pairs of adjacent
  features (x0, x1), (x2, x3), ... to the pairs (x_j, x_{j + hd/2}) of the
  head's two halves that its rotate_half expects. `get` undoes that permutation
  (`rotary_rows`); wv, wo and the rest are stored as Meta has them.

Departures:
- A rope_scaling or rope_parameters object of rope_type "default" (plain RoPE,
  as transformers 5 writes it) is read as no scaling, not refused.
- Weights come back as views of the memory-mapped file where its layout
  allows, as torch.load(mmap=True) gives them (copy-on-write: writing to one
  never reaches the file); wq and wk, and data not aligned to its dtype (which
  the format permits), are copies.
- A .bin file in torch's old (non-zip) format cannot be memory-mapped: it is
  read whole, with a warning, and only the last such file is kept in memory.
"""

import json
import math
import mmap
import re
import warnings
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from support.files import FileError, load_pt


def is_hf_folder(path) -> bool:
    """A Hugging Face model folder is told apart from Meta's by its config.json."""
    return (Path(path) / "config.json").is_file()


# -----------------------------------------------------------------------------
# config.json -> ModelArgs' names

INT_KEYS = {"hidden_size": "dim", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
            "vocab_size": "vocab_size", "intermediate_size": "hidden_dim"}

# Settings whose other values this model cannot compute: (key, the value it needs, why).
# An absent key takes LlamaConfig's default, which is the value needed.
FIXED_KEYS = [
    ("model_type", "llama", "this reads LLaMA models only"),
    ("hidden_act", "silu", "LLaMA's feed-forward is SwiGLU"),
    ("attention_bias", False, "LLaMA's attention projections have no bias"),
    ("mlp_bias", False, "LLaMA's feed-forward has no bias"),
    ("tie_word_embeddings", False, "LLaMA's output matrix is its own, not the embedding's"),
]


def read_json(path: Path, what: str):
    if not path.is_file():
        raise FileError(f"{path}: no {what} here")
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise FileError(f"{path}: cannot be read as JSON ({e})") from None


def positive_int(config: dict, key: str, path: Path) -> int:
    if key not in config:
        raise FileError(f"{path}: no {key}; a LLaMA config.json gives it")
    value = config[key]
    if type(value) is not int or value <= 0:  # type(), not isinstance: true and false are ints to Python
        raise FileError(f"{path}: {key} is {json.dumps(value)}; it must be a positive integer")
    return value


def positive_number(value, key: str, path: Path) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
        raise FileError(f"{path}: {key} is {json.dumps(value)}; it must be a positive number")
    return float(value)


def rope_theta(config: dict, path: Path) -> float:
    """RoPE's base: rope_theta (transformers 4) or rope_parameters.rope_theta (5); 10000 if neither.

    rope_scaling (4) and rope_parameters (5) may only describe plain RoPE.
    """
    theta = config.get("rope_theta")
    for key in ("rope_scaling", "rope_parameters"):
        rope = config.get(key)
        if rope is None:
            continue
        kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else None
        if kind != "default" or set(rope) - {"rope_type", "type", "rope_theta"}:
            raise FileError(f"{path}: {key} is {json.dumps(rope)}; this model computes plain RoPE only "
                            "(no scaling: null, or rope_type \"default\")")
        if "rope_theta" in rope:
            if theta is not None and rope["rope_theta"] != theta:
                raise FileError(f"{path}: rope_theta {theta} and {key}.rope_theta {rope['rope_theta']} disagree")
            theta = rope["rope_theta"]
    return 10000.0 if theta is None else positive_number(theta, "rope_theta", path)


def check_heads(params: dict, config: dict, path: Path):
    dim, n_heads, n_kv_heads = params["dim"], params["n_heads"], params["n_kv_heads"]
    if dim % n_heads or n_heads % n_kv_heads:
        raise FileError(f"{path}: hidden_size {dim}, num_attention_heads {n_heads} and num_key_value_heads "
                        f"{n_kv_heads} must divide: hidden_size by the heads, the heads by the key/value heads")
    if (dim // n_heads) % 2:
        raise FileError(f"{path}: a head of hidden_size / num_attention_heads = {dim // n_heads} features "
                        "cannot be rotated in pairs")
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim != dim // n_heads:
        raise FileError(f"{path}: head_dim is {json.dumps(head_dim)}; this model's heads are "
                        f"hidden_size / num_attention_heads = {dim // n_heads} wide")


def read_config(path: Path) -> dict:
    """config.json -> ModelArgs keyword arguments in Meta's names, or a FileError that names the key."""
    config = read_json(path, "config.json")
    if not isinstance(config, dict):
        raise FileError(f"{path}: not a JSON object")
    for key, needed, why in FIXED_KEYS:
        if key in config and config[key] != needed:
            raise FileError(f"{path}: {key} is {json.dumps(config[key])}; this model needs "
                            f"{json.dumps(needed)} ({why})")
    ints = {meta: positive_int(config, key, path) for key, meta in INT_KEYS.items()}
    params = {
        "dim": ints["dim"],
        "n_layers": ints["n_layers"],
        "n_heads": ints["n_heads"],
        "n_kv_heads": (ints["n_heads"] if config.get("num_key_value_heads") is None
                       else positive_int(config, "num_key_value_heads", path)),
        "vocab_size": ints["vocab_size"],
        "norm_eps": positive_number(config.get("rms_norm_eps", 1e-6), "rms_norm_eps", path),  # LlamaConfig's default
        "rope_theta": rope_theta(config, path),
        "hidden_dim": ints["hidden_dim"],  # the exact feed-forward width, not rounded through multiple_of
    }
    check_heads(params, config, path)
    return params


def max_positions(path: Path) -> tuple:
    """(config.json's max_position_embeddings, where it comes from): the context the model was
    trained for; LlamaConfig's default, 2048, where the key is absent."""
    config = read_json(path, "config.json")
    if not isinstance(config, dict):
        raise FileError(f"{path}: not a JSON object")
    if config.get("max_position_embeddings") is None:
        return 2048, f"{path} has no max_position_embeddings; LlamaConfig's default"
    return positive_int(config, "max_position_embeddings", path), f"{path}'s max_position_embeddings"


# -----------------------------------------------------------------------------
# Meta's keys and shapes, transformers' names for them

TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
LAYER_NAMES = {  # Meta's module in layer N -> transformers' in model.layers.N
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj", "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
# A table of RoPE frequencies older transformers saved with the weights; it is recomputed, not read.
ROTARY_TABLE = re.compile(r"(model\.)?(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq")


def meta_shapes(params: dict) -> dict:
    """Every weight's Meta key -> its shape, in the order of Transformer.state_dict()."""
    dim, hidden, vocab = params["dim"], params["hidden_dim"], params["vocab_size"]
    head_dim = dim // params["n_heads"]
    layer = {"attention.wq": (params["n_heads"] * head_dim, dim),
             "attention.wk": (params["n_kv_heads"] * head_dim, dim),
             "attention.wv": (params["n_kv_heads"] * head_dim, dim),
             "attention.wo": (dim, params["n_heads"] * head_dim),
             "feed_forward.w1": (hidden, dim), "feed_forward.w2": (dim, hidden), "feed_forward.w3": (hidden, dim),
             "attention_norm": (dim,), "ffn_norm": (dim,)}
    shapes = {"tok_embeddings.weight": (vocab, dim)}
    for i in range(params["n_layers"]):
        shapes.update({f"layers.{i}.{module}.weight": shape for module, shape in layer.items()})
    shapes.update({"norm.weight": (dim,), "output.weight": (vocab, dim)})
    return shapes


def hf_name(key: str) -> str:
    """Meta's key -> transformers': layers.3.attention.wq.weight -> model.layers.3.self_attn.q_proj.weight."""
    if key in TOP_NAMES:
        return TOP_NAMES[key]
    _, layer, module = key.removesuffix(".weight").split(".", 2)  # "layers", "3", "attention.wq"
    return f"model.layers.{layer}.{LAYER_NAMES[module]}.weight"


def rotary_rows(n_heads: int, head_dim: int) -> torch.Tensor:
    """For each row of Meta's wq or wk, the row of transformers' q_proj or k_proj that holds it.

    Within a head, Meta's row 2j + s (feature s = 0, 1 of rotary pair j) is
    transformers' row s * hd/2 + j: the conversion sent each pair's first
    feature to the head's first half and its second to the second half.
    """
    hf_rows = torch.arange(n_heads * head_dim).view(n_heads, 2, head_dim // 2)  # (H, s, j): transformers' order
    return hf_rows.transpose(1, 2).reshape(-1)  # (H, j, s) -> Meta's row h * hd + 2j + s


# -----------------------------------------------------------------------------
# safetensors, parsed by hand

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


class StoredTensor(NamedTuple):
    """Where one tensor of a safetensors file lies."""
    path: Path
    dtype: torch.dtype
    shape: tuple
    start: int  # byte offset of its data in the file
    nbytes: int


def read_header(path: Path):
    """(the header's JSON object, the byte offset where the data starts); the header checked to fit the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        length_bytes = f.read(8)
        if len(length_bytes) < 8:
            raise FileError(f"{path}: {size} bytes, too short for a safetensors file's 8-byte header length "
                            "(truncated?)")
        length = int.from_bytes(length_bytes, "little")
        if 8 + length > size:
            raise FileError(f"{path}: its header of {length} bytes runs past the end of the {size}-byte file "
                            "(truncated, or not a safetensors file)")
        text = f.read(length)
    try:
        header = json.loads(text)
    except ValueError as e:
        raise FileError(f"{path}: its header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise FileError(f"{path}: its header is not a JSON object")
    return header, 8 + length


def stored_tensor(path: Path, name: str, entry, data_start: int, data_size: int) -> StoredTensor:
    """One header entry, checked: a known dtype, a shape, and offsets inside the data that hold exactly it."""
    if not isinstance(entry, dict) or {"dtype", "shape", "data_offsets"} - set(entry):
        raise FileError(f"{path}: header entry {name} lacks dtype, shape or data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in SAFETENSORS_DTYPES:
        raise FileError(f"{path}: {name} has dtype {json.dumps(dtype)}, which this reader does not know "
                        f"(it reads {', '.join(SAFETENSORS_DTYPES)})")
    if not isinstance(shape, list) or any(type(n) is not int or n < 0 for n in shape):
        raise FileError(f"{path}: {name} has shape {json.dumps(shape)}, not a list of sizes")
    if (not isinstance(offsets, list) or len(offsets) != 2 or any(type(n) is not int for n in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise FileError(f"{path}: {name} has data_offsets {json.dumps(offsets)}, not [begin, end]")
    begin, end = offsets
    if end > data_size:
        raise FileError(f"{path}: {name} lies at bytes {begin}..{end} of the data, which holds only "
                        f"{data_size} bytes (the file is truncated, or its header is wrong)")
    dtype = SAFETENSORS_DTYPES[dtype]
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected:
        raise FileError(f"{path}: {name} has data_offsets [{begin}, {end}], {end - begin} bytes, but its "
                        f"shape {shape} in {entry['dtype']} takes {expected}")
    return StoredTensor(path, dtype, tuple(shape), data_start + begin, end - begin)


def read_safetensors_header(path: Path) -> dict:
    """A safetensors file's tensors by name, each checked against the file; no tensor data is read."""
    header, data_start = read_header(path)
    data_size = path.stat().st_size - data_start
    tensors = {name: stored_tensor(path, name, entry, data_start, data_size)
               for name, entry in header.items() if name != "__metadata__"}
    by_start = sorted(((n, t) for n, t in tensors.items() if t.nbytes), key=lambda item: item[1].start)
    for (name, t), (next_name, next_t) in zip(by_start, by_start[1:]):
        if next_t.start < t.start + t.nbytes:
            raise FileError(f"{path}: {name} and {next_name} overlap in the data (the header is wrong)")
    return tensors


def map_rows(t: StoredTensor, first: int, count: int) -> torch.Tensor:
    """Rows first..first + count (dim 0) of a stored tensor, memory-mapped: only those
    bytes are mapped, and a page is read from disk when it is first touched."""
    rows = t.shape[0] if t.shape else 1
    row_bytes = t.nbytes // rows if rows else 0
    start, nbytes = t.start + first * row_bytes, count * row_bytes
    shape = (count, *t.shape[1:]) if t.shape else ()
    if nbytes == 0:
        return torch.empty(shape, dtype=t.dtype)
    page = start - start % mmap.ALLOCATIONGRANULARITY  # a mapping starts on a page boundary
    try:
        with open(t.path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), start + nbytes - page, offset=page, access=mmap.ACCESS_COPY)
    except (OSError, ValueError) as e:  # the file shrank since its header was read, or cannot be mapped
        raise FileError(f"{t.path}: cannot be memory-mapped ({e})") from None
    data = torch.frombuffer(mapped, dtype=torch.uint8)[start - page:]  # (nbytes,); keeps the mapping alive
    if (start - page) % t.dtype.itemsize:
        data = data.clone()  # not aligned to the dtype: a copy of these bytes only
    return data.view(t.dtype).view(shape)


# -----------------------------------------------------------------------------
# the folder

def find_weight_files(folder: Path):
    """(files, weight_map or None, index path or None), from the first layout the folder holds."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = folder / index_name
        if index.is_file():
            content = read_json(index, "weight index")
            weight_map = content.get("weight_map") if isinstance(content, dict) else None
            if not weight_map or not isinstance(weight_map, dict) or not all(
                    isinstance(file, str) for file in weight_map.values()):
                raise FileError(f"{index}: no weight_map of weight names to file names")
            files = [folder / name for name in sorted(set(weight_map.values()))]
            for path in files:
                if not path.is_file():
                    raise FileError(f"{index}: names {path.name}, which is not in {folder}")
            return files, weight_map, index
        if (folder / single).is_file():
            return [folder / single], None, None
    raise FileError(f"{folder}: config.json but no model.safetensors, pytorch_model.bin, or the index.json "
                    "of their shards")


class HFCheckpoint:
    """A Hugging Face LLaMA folder, read in Meta's names and layout, one weight at a time.

    `params` are ModelArgs' keyword arguments (hidden_dim: the exact feed-forward
    width); `keys()` lists Meta's weight names; `get(key, rows)` reads one weight,
    or the rows `rows` of its dim 0, from the memory-mapped file.
    """

    def __init__(self, folder):
        self.folder = Path(folder)
        self.params = read_config(self.folder / "config.json")
        self._shapes = meta_shapes(self.params)
        self._meta_key = {hf_name(key): key for key in self._shapes}  # transformers' name -> Meta's key
        self._loaded = {}  # .bin path -> its state dict, memory-mapped where the file allows
        self._held_whole = None  # the one old-format .bin file read whole, if any
        self._warned = set()  # the old-format .bin files warned about
        files, weight_map, index = find_weight_files(self.folder)
        if files[0].suffix == ".safetensors":
            self._where = self._index_safetensors(files, weight_map, index)
        else:
            self._where = self._index_bin(files, weight_map)
        missing = [key for key in self._shapes if hf_name(key) not in self._where]
        if missing:
            name = hf_name(missing[0])
            count = f"missing: {len(missing)} of {len(self._shapes)} weights"
            if index is None:
                raise FileError(f"{files[0]}: holds no {name} (Meta's {missing[0]}), which config.json's model "
                                f"needs ({count})")
            if name in weight_map:
                raise FileError(f"{index}: places {name} in {weight_map[name]}, which does not hold it, nor does "
                                f"any other file the index names ({count})")
            raise FileError(f"{index}: names no file for {name} (Meta's {missing[0]}), which config.json's model "
                            f"needs ({count})")

    @property
    def tokenizer_path(self) -> Path:
        path = self.folder / "tokenizer.model"
        if not path.is_file():
            raise FileError(f"{path}: missing; this model reads the SentencePiece tokenizer.model "
                            "that LLaMA's Hugging Face folders hold beside config.json (or name it with --tokenizer)")
        return path

    layout = "Hugging Face layout"

    def keys(self) -> list:
        return list(self._shapes)

    def shape(self, key: str) -> tuple:
        return self._shapes[key]

    def where(self, key: str) -> Path:
        """The file to name in an error about `key`."""
        where = self._where.get(hf_name(key), self.folder / "config.json")
        return where.path if isinstance(where, StoredTensor) else where

    def get(self, key: str, rows: Optional[slice] = None) -> torch.Tensor:
        """Weight `key` in Meta's layout and the dtype stored, or only rows[rows] of its dim 0."""
        if key not in self._shapes:
            raise KeyError(f"{key!r} is not a weight of this model; keys() lists them")
        if rows is not None and not isinstance(rows, slice):
            raise TypeError(f"rows must be a slice of dim 0, not {type(rows).__name__}")
        n_rows = self._shapes[key][0]
        wanted = torch.arange(n_rows) if rows is None else torch.arange(n_rows)[rows]  # Meta's rows
        heads = {"attention.wq": self.params["n_heads"], "attention.wk": self.params["n_kv_heads"]}
        module = key.removesuffix(".weight").split(".", 2)[-1]
        if key.startswith("layers.") and module in heads:
            wanted = rotary_rows(heads[module], self.params["dim"] // self.params["n_heads"])[wanted]
        first = int(wanted.min()) if len(wanted) else 0
        count = int(wanted.max()) + 1 - first if len(wanted) else 0
        stored = self._stored_rows(hf_name(key), first, count)  # the span of stored rows that holds them
        return select_rows(stored, wanted - first)

    # --- where each weight lies

    def _check_name(self, path: Path, name: str) -> bool:
        """True for a weight this model reads, False for one to skip; a FileError for any other."""
        if name in self._meta_key:
            return True
        if ROTARY_TABLE.fullmatch(name):
            return False
        raise FileError(f"{path}: unexpected weight {name}; a LLaMA of {self.params['n_layers']} layers "
                        "has no such weight")

    def _check_shape(self, path: Path, name: str, shape):
        expected = self._shapes[self._meta_key[name]]
        if tuple(shape) != expected:
            raise FileError(f"{path}: {name} has shape {tuple(shape)}; config.json implies {expected}")

    def _index_safetensors(self, files, weight_map, index) -> dict:
        where = {}
        for path in files:
            for name, stored in read_safetensors_header(path).items():
                if not self._check_name(path, name):
                    continue
                if name in where:
                    raise FileError(f"{path}: {name} is also in {where[name].path.name}")
                self._check_shape(path, name, stored.shape)
                where[name] = stored
        for name, file in (weight_map or {}).items():
            if name in where and where[name].path.name != Path(file).name:
                raise FileError(f"{index}: places {name} in {file}, but {where[name].path.name} holds it")
        return where

    def _index_bin(self, files, weight_map) -> dict:
        if weight_map is None:
            return {name: files[0] for name in self._state(files[0]) if self._check_name(files[0], name)}
        return {name: self.folder / file for name, file in weight_map.items()
                if self._check_name(self.folder / file, name)}

    # --- reading

    def _stored_rows(self, name: str, first: int, count: int) -> torch.Tensor:
        where = self._where[name]
        if isinstance(where, StoredTensor):
            return map_rows(where, first, count)
        state = self._state(where)
        if name not in state:
            raise FileError(f"{where}: holds no {name}, which {where.parent / 'pytorch_model.bin.index.json'} "
                            "places there")
        return state[name][first:first + count]

    def _state(self, path: Path) -> dict:
        """A .bin file's weights, memory-mapped, checked once on first use."""
        if path in self._loaded:
            return self._loaded[path]
        if not path.is_file():
            raise FileError(f"{path}: no weight file here")
        with open(path, "rb") as f:
            zip_format = f.read(4) == b"PK\x03\x04"  # torch.save's format since 1.6; a damaged one still starts so
        if zip_format:
            state = load_pt(path, "weight file", mmap=True)
        else:
            self._loaded.pop(self._held_whole, None)  # at most one file held whole in memory
            self._held_whole = path
            state = load_pt(path, "weight file")
        if not isinstance(state, dict):
            raise FileError(f"{path}: holds a {type(state).__name__}, not a dict of weights")
        for name, tensor in state.items():
            if not isinstance(tensor, torch.Tensor):
                raise FileError(f"{path}: {name} is a {type(tensor).__name__}, not a tensor")
            if self._check_name(path, name):
                self._check_shape(path, name, tensor.shape)
        if not zip_format and path not in self._warned:  # once per usable file, though it may be read whole again
            warnings.warn(f"{path}: torch's old (non-zip) format cannot be memory-mapped; reading it whole")
            self._warned.add(path)
        self._loaded[path] = state
        return state


def select_rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """t[rows] along dim 0: a view when the rows run in order, else a gather of those rows only."""
    if len(rows) == 0 or torch.equal(rows, torch.arange(int(rows[0]), int(rows[0]) + len(rows))):
        return t.narrow(0, int(rows[0]) if len(rows) else 0, len(rows))
    return t.index_select(0, rows)
