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

Files: `LoRA.save` writes this project's file; `read` reads it, lit-llama's
(the authors' finetune/lora.py saves lora_state_dict: transformer.h.{i}.attn.
c_attn.lora_A and lora_B) and Hugging Face PEFT adapter folders. The scripts
reach all three through Aligner.read and Aligner.check_file, so a LoRA goes
wherever an Aligner file does.
"""

import json
import math
import re
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

import hf_checkpoint
from llama import BASE_KEYS, ModelArgs
from support.files import FileError, atomic_save, check_values, load_pt

TARGETS = ("wq", "wv")  # the projections adapted: lit_llama/lora.py's enable_lora=[True, False, True]
# alpha where a file does not record it (lit-llama's): the authors' finetune/lora.py, line 43
LIT_LLAMA_ALPHA = 16


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
# reading: this project's files, lit-llama's, PEFT's folders

LIT_KEY = re.compile(r"transformer\.h\.(\d+)\.attn\.c_attn\.lora_([AB])")


def _weights(state) -> dict:
    return state["model"] if isinstance(state, dict) and isinstance(state.get("model"), dict) else state


def is_lora(path) -> bool:
    """Whether `path` holds a LoRA: a PEFT adapter folder, or a file of ours or lit-llama's."""
    path = Path(path)
    if path.is_dir():
        return (path / "adapter_config.json").is_file()
    return path.is_file() and is_lora_state(load_pt(path, "LoRA file"))


def is_lora_state(state) -> bool:
    if not isinstance(state, dict):
        return False
    if state.get("kind") == "LoRA":
        return True
    weights = _weights(state)
    return isinstance(weights, dict) and any(isinstance(k, str) and LIT_KEY.fullmatch(k) for k in weights)


def read(path, args: ModelArgs = None, dropout: float = 0.05) -> LoRA:
    """A LoRA from this project's file, lit-llama's file or a PEFT folder, in eval mode (no
    dropout). With `args`, refuses one made for a base of another shape; lit-llama's and PEFT's
    need `args`, their files not recording every dimension. `dropout` is the one a further
    training run uses where the file records none (lit-llama's)."""
    path = Path(path)
    if path.is_dir():
        return read_peft(path, args).eval()
    state = load_pt(path, "LoRA file")
    if isinstance(state, dict) and state.get("kind") == "LoRA":
        return _from_state(state, path, args).eval()
    return _from_lit_llama(_weights(state), path, args, dropout).eval()


def check_file(path) -> LoRAShape:
    """Refuse, before any model loads, a LoRA file or folder that cannot be used; returns its shape."""
    path = Path(path)
    if path.is_dir():
        config = peft_config(path)
        peft_tensors(path, config)
        return LoRAShape(config["r"], config["lora_alpha"])
    state = load_pt(path, "LoRA file")
    if isinstance(state, dict) and state.get("kind") == "LoRA":
        lora = _from_state(state, path)
        return LoRAShape(lora.rank, lora.alpha)
    pairs = _lit_llama_pairs(_weights(state), path)
    return LoRAShape(next(iter(pairs.values()))[0].shape[0] // 2, LIT_LLAMA_ALPHA)


def _checked_tensor(path, key: str, tensor, shape: tuple) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise FileError(f"{path}: {key} is a {type(tensor).__name__}, not a tensor")
    if tuple(tensor.shape) != tuple(shape):
        raise FileError(f"{path}: {key} has shape {tuple(tensor.shape)}; this LoRA needs {tuple(shape)}")
    check_values(path, {key: tensor}, "LoRA file")
    return tensor.float()


def _from_state(state: dict, path: Path, args: ModelArgs = None) -> LoRA:
    """This project's file (LoRA.save)."""
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
        getattr(lora, key).data.copy_(_checked_tensor(path, key, state[key], getattr(lora, key).shape))
    return lora


def _lit_llama_pairs(weights, path: Path) -> dict:
    """{layer: (lora_A, lora_B)} of lit-llama's file, every key checked to be one of these."""
    if not isinstance(weights, dict):
        raise FileError(f"{path}: holds a {type(weights).__name__}, not a LoRA's dict of tensors")
    found = {}
    for key, tensor in weights.items():
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


def _from_lit_llama(weights, path: Path, args: ModelArgs, dropout: float) -> LoRA:
    """lit-llama's file. In its fused c_attn = [wq; wk; wv] (scripts/convert_checkpoint.py), lora_A
    (2r, dim) stacks A_q over A_v, and lora_B (2 dim, r) stacks B_q over B_v: the grouped
    convolution of MergedLinear.forward (groups = 2) sends A's first r rows through B's first dim
    rows, the queries, and its last r rows through the last dim, the values; zero_pad leaves the
    keys unchanged. lit-llama keeps Meta's rotary order of wq's rows (adjacent pairs, its
    apply_rope), so B_q applies to Meta's wq as it is. alpha: LIT_LLAMA_ALPHA."""
    pairs = _lit_llama_pairs(weights, path)
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
        a = _checked_tensor(path, f"transformer.h.{i}.attn.c_attn.lora_A", a, (2 * rank, args.dim))
        b = _checked_tensor(path, f"transformer.h.{i}.attn.c_attn.lora_B", b, (2 * args.dim, rank))
        lora.a_q.data[i], lora.a_v.data[i] = a[:rank], a[rank:]  # (r, dim) each
        lora.b_q.data[i], lora.b_v.data[i] = b[:args.dim], b[args.dim:]  # (dim, r) each
    return lora


# PEFT's LoraConfig: the options this reader implements, at the values it implements. Any other
# value changes what the adapter computes, and is refused.
PEFT_PLAIN = {"use_dora": (False, None), "use_rslora": (False, None), "bias": ("none", None),
              "layers_to_transform": (None,), "layers_pattern": (None,), "rank_pattern": ({}, None),
              "alpha_pattern": ({}, None), "modules_to_save": (None, []), "layer_replication": (None,),
              "fan_in_fan_out": (False, None), "lora_bias": (False, None), "trainable_token_indices": (None,),
              "target_parameters": (None, []), "exclude_modules": (None, [])}
# Keys that do not change what a trained adapter computes: PEFT's bookkeeping, the settings read
# below, and initialisations that leave the base's weights alone. Any other key must hold its
# empty or false default (newer PEFT options among them), or the adapter is refused.
PEFT_READ_OR_INERT = {"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                      "inference_mode", "r", "lora_alpha", "lora_dropout", "target_modules", "init_lora_weights",
                      "megatron_config", "megatron_core", "qalora_group_size", "eva_config", "ensure_weight_tying"}
# init_lora_weights that leave the base as it was (PiSSA, OLoRA, CorDA and LoftQ rewrite it)
PEFT_PLAIN_INITS = (True, False, "gaussian", "eva")
PEFT_TARGETS = {"q_proj": "wq", "v_proj": "wv"}
PEFT_KEY = "base_model.model.model.layers.{i}.self_attn.{module}.lora_{part}.weight"


def peft_config(folder: Path) -> dict:
    """adapter_config.json of a PEFT folder, checked to be a plain LoRA on q_proj and v_proj."""
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise FileError(f"{folder}: a folder without adapter_config.json; a LoRA folder is a PEFT adapter "
                        "(adapter_config.json, adapter_model.safetensors)")
    config = hf_checkpoint.read_json(path, "PEFT adapter config")
    if not isinstance(config, dict):
        raise FileError(f"{path}: not a JSON object")
    if config.get("peft_type") != "LORA":
        raise FileError(f"{path}: peft_type is {json.dumps(config.get('peft_type'))}; this reads LORA adapters")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if type(value) not in (int, float) or (key == "r" and type(value) is not int) or value <= 0:
            raise FileError(f"{path}: {key} is {json.dumps(value)}; it must be a positive "
                            f"{'integer' if key == 'r' else 'number'}")
    for key, value in config.items():
        plain = PEFT_PLAIN.get(key, () if key in PEFT_READ_OR_INERT else (None, False, {}, []))
        if plain and value not in plain:
            raise FileError(f"{path}: {key} is {json.dumps(value)}; this reader implements plain LoRA "
                            f"only ({key} {json.dumps(plain[0])})")
    if config.get("init_lora_weights", True) not in PEFT_PLAIN_INITS:
        raise FileError(f"{path}: init_lora_weights is {json.dumps(config['init_lora_weights'])}, which rewrites "
                        "the base's weights; this reader applies a LoRA to the base as it is")
    targets = config.get("target_modules")
    if not isinstance(targets, list) or not targets:
        raise FileError(f"{path}: target_modules is {json.dumps(targets)}; list the modules, a subset of "
                        f"{sorted(PEFT_TARGETS)}")
    for module in targets:
        if module not in PEFT_TARGETS:
            raise FileError(f"{path}: target_modules holds {json.dumps(module)}; this model adapts "
                            f"{' and '.join(sorted(PEFT_TARGETS))} only")
    dropout = config.get("lora_dropout", 0.0)
    if type(dropout) not in (int, float) or not 0 <= dropout < 1:
        raise FileError(f"{path}: lora_dropout is {json.dumps(dropout)}; it must be in [0, 1)")
    return config


def peft_tensors(folder: Path, config: dict) -> tuple:
    """(the weight file, {key: tensor}) of a PEFT folder: adapter_model.safetensors (read by
    hf_checkpoint's own reader) or adapter_model.bin; every key one of a LoRA on the targets."""
    path = folder / "adapter_model.safetensors"
    if path.is_file():
        stored = hf_checkpoint.read_safetensors_header(path)
        tensors = {name: hf_checkpoint.map_rows(t, 0, t.shape[0] if t.shape else 1) for name, t in stored.items()}
    elif (folder / "adapter_model.bin").is_file():
        path = folder / "adapter_model.bin"
        tensors = load_pt(path, "PEFT adapter")
        if not isinstance(tensors, dict):
            raise FileError(f"{path}: holds a {type(tensors).__name__}, not a dict of tensors")
    else:
        raise FileError(f"{folder}: no adapter_model.safetensors or adapter_model.bin")
    pattern = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.self_attn\.(\w+)\.lora_([AB])\.weight")
    for key, tensor in tensors.items():
        match = pattern.fullmatch(key) if isinstance(key, str) else None
        if match is None:
            raise FileError(f"{path}: unexpected key {key!r}; this reads a LoRA on "
                            f"{' and '.join(sorted(PEFT_TARGETS))} (base_model.model.model.layers.N.self_attn."
                            "q_proj.lora_A.weight, ...)")
        if match.group(2) not in config["target_modules"]:
            raise FileError(f"{path}: key {key!r} is for {match.group(2)}, which is not among the target_modules "
                            f"{config['target_modules']} of {folder / 'adapter_config.json'}")
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2:
            raise FileError(f"{path}: {key} is not a 2-D tensor")
        rank = tensor.shape[0 if match.group(3) == "A" else 1]
        if rank != config["r"]:
            raise FileError(f"{path}: {key} has shape {tuple(tensor.shape)}, rank {rank}; "
                            f"{folder / 'adapter_config.json'} says r {config['r']}")
    return path, tensors


def read_peft(folder: Path, args: ModelArgs) -> LoRA:
    """A PEFT adapter folder over a Hugging Face LLaMA. lora_A (r, hidden) and lora_B (out, r) of
    q_proj and v_proj in each layer; scaling lora_alpha / r (PEFT's LoraLayer). transformers'
    conversion permuted q_proj's rows within each head (hf_checkpoint.rotary_rows), and a lora_B
    trained on q_proj is in that order: its rows are put back into Meta's order here, as
    hf_checkpoint does for q_proj itself. v_proj's rows are Meta's, and every lora_A reads the
    hidden state, whose order is the same in both. A target left out of target_modules keeps B = 0."""
    config = peft_config(folder)
    path, tensors = peft_tensors(folder, config)
    if args is None:
        raise FileError(f"{folder}: a PEFT adapter does not record the model's shape; read it with the base "
                        "model's arguments")
    rank = config["r"]
    lora = LoRA(args, rank, config["lora_alpha"], config.get("lora_dropout", 0.0))
    with torch.no_grad():
        lora.b_q.zero_()
        lora.b_v.zero_()
    meta_rows = hf_checkpoint.rotary_rows(args.n_heads, args.head_dim)  # Meta's row j is transformers' meta_rows[j]
    for module in config["target_modules"]:
        target = PEFT_TARGETS[module]
        a_param, b_param = (lora.a_q, lora.b_q) if target == "wq" else (lora.a_v, lora.b_v)
        for i in range(args.n_layers):
            keys = [PEFT_KEY.format(i=i, module=module, part=part) for part in "AB"]
            for key in keys:
                if key not in tensors:
                    raise FileError(f"{path}: missing key {key!r}")
            a = _checked_tensor(path, keys[0], tensors[keys[0]], (rank, args.dim))
            b = _checked_tensor(path, keys[1], tensors[keys[1]], (b_param.shape[1], rank))
            a_param.data[i] = a
            b_param.data[i] = b[meta_rows] if target == "wq" else b
    extra = [k for k in tensors if int(re.search(r"layers\.(\d+)\.", k).group(1)) >= args.n_layers]
    if extra:
        raise FileError(f"{path}: key {extra[0]!r} is past this model's {args.n_layers} layers")
    return lora
