"""Meta's weights written as a Hugging Face LLaMA folder, by hand: config.json, safetensors
(1 or more files with their index) or .bin files, and tokenizer.model.

The conversion is written out here from transformers' convert_llama_weights_to_hf.py,
independently of support/formats/hf.py: keys renamed, and within each head the rows
of wq and wk moved from adjacent rotary pairs to the head's two halves.
"""

import json
import shutil
from pathlib import Path

import torch

NAMES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
         "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
         "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj", "feed_forward.w3": "mlp.up_proj",
         "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
         "tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def to_half_split(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of Meta's wq or wk (H * hd, dim) -> transformers' order: row 2j + s of a head goes to s * hd/2 + j."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def to_hf_state(state: dict, n_heads: int, n_kv_heads: int) -> dict:
    """Meta's state dict -> transformers' names and rotary layout."""
    out = {}
    for key, w in state.items():
        module = key.removesuffix(".weight")
        if module in NAMES:
            out[f"{NAMES[module]}.weight"] = w
            continue
        _, layer, module = module.split(".", 2)
        if module == "attention.wq":
            w = to_half_split(w, n_heads)
        elif module == "attention.wk":
            w = to_half_split(w, n_kv_heads)
        out[f"model.layers.{layer}.{NAMES[module]}.weight"] = w
    return out


def hf_config(args, hidden_dim: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "hidden_size": args.dim, "intermediate_size": hidden_dim, "num_hidden_layers": args.n_layers,
            "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads,
            "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta, "rope_scaling": None,
            "vocab_size": args.vocab_size, "attention_bias": False, "mlp_bias": False,
            "tie_word_embeddings": False, "max_position_embeddings": args.max_seq_len,
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}


def write_safetensors(path, tensors: dict, align: bool = True, edit_header=None):
    """The format written out: 8-byte little-endian header length, JSON header, data.

    align pads the header with spaces so that the data starts on 8 bytes, as the
    safetensors package does; edit_header(header) may damage the header before it is written.
    """
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        blob = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    if edit_header is not None:
        edit_header(header)
    text = json.dumps(header).encode()
    if align:
        text += b" " * (-(8 + len(text)) % 8)
    Path(path).write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def write_hf(state: dict, args, folder, fmt="safetensors", n_files=1, dtype=None, tokenizer=None,
             align=True, extra=None) -> Path:
    """Meta's `state` of a model of ModelArgs `args`, saved as a Hugging Face folder in `fmt`
    ("safetensors" or "bin"), split into n_files with an index when n_files > 1; `extra`
    tensors (transformers' names) are stored too."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype or v.dtype) for k, v in state.items()}
    hf = to_hf_state(state, args.n_heads, args.n_kv_heads) | (extra or {})
    config = hf_config(args, hidden_dim=state["layers.0.feed_forward.w1.weight"].shape[0])
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer is not None:
        shutil.copy(tokenizer, folder / "tokenizer.model")

    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    names = list(hf)
    parts = [names[i::n_files] for i in range(n_files)]  # interleaved, so every file holds some of each layer
    weight_map = {}
    for i, part in enumerate(parts):
        file = f"{stem}.{ext}" if n_files == 1 else f"{stem}-{i + 1:05d}-of-{n_files:05d}.{ext}"
        tensors = {name: hf[name].clone() for name in part}  # clones: torch.save would write whole storages
        if fmt == "safetensors":
            write_safetensors(folder / file, tensors, align=align)
        else:
            torch.save(tensors, folder / file)
        weight_map.update({name: file for name in part})
    if n_files > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in hf.values())},
                 "weight_map": weight_map}
        (folder / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2))
    return folder
