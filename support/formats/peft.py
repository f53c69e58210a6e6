"""
Hugging Face PEFT adapter folders (adapter_config.json, adapter_model.safetensors or .bin), read as this project's LoRA.

Only a plain LoRA on q_proj and v_proj is read: any LoraConfig setting that changes what the
adapter computes (DoRA, rsLoRA, biases, patterns, other targets, initialisations that rewrite the
base) is refused with the file and key (peft_config).
"""

import json
import re
from pathlib import Path

import torch

from llama import ModelArgs
from lora import LoRA, LoRAShape, checked_tensor
from support.files import FileError, load_pt
from support.formats import hf

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
    config = hf.read_json(path, "PEFT adapter config")
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
    hf.py's own reader) or adapter_model.bin; every key one of a LoRA on the targets."""
    path = folder / "adapter_model.safetensors"
    if path.is_file():
        stored = hf.read_safetensors_header(path)
        tensors = {name: hf.map_rows(t, 0, t.shape[0] if t.shape else 1) for name, t in stored.items()}
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
    conversion permuted q_proj's rows within each head (hf.rotary_rows), and a lora_B
    trained on q_proj is in that order: its rows are put back into Meta's order here, as
    hf.py does for q_proj itself. v_proj's rows are Meta's, and every lora_A reads the
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
    meta_rows = hf.rotary_rows(args.n_heads, args.head_dim)  # Meta's row j is transformers' meta_rows[j]
    for module in config["target_modules"]:
        target = PEFT_TARGETS[module]
        a_param, b_param = (lora.a_q, lora.b_q) if target == "wq" else (lora.a_v, lora.b_v)
        for i in range(args.n_layers):
            keys = [PEFT_KEY.format(i=i, module=module, part=part) for part in "AB"]
            for key in keys:
                if key not in tensors:
                    raise FileError(f"{path}: missing key {key!r}")
            a = checked_tensor(path, keys[0], tensors[keys[0]], (rank, args.dim))
            b = checked_tensor(path, keys[1], tensors[keys[1]], (b_param.shape[1], rank))
            a_param.data[i] = a
            b_param.data[i] = b[meta_rows] if target == "wq" else b
    extra = [k for k in tensors if int(re.search(r"layers\.(\d+)\.", k).group(1)) >= args.n_layers]
    if extra:
        raise FileError(f"{path}: key {extra[0]!r} is past this model's {args.n_layers} layers")
    return lora


def peft_shape(folder: Path) -> LoRAShape:
    """Refuse, before any model loads, a folder read_peft would refuse for itself; returns its LoRA's shape."""
    config = peft_config(folder)
    peft_tensors(folder, config)
    return LoRAShape(config["r"], config["lora_alpha"])
