"""
The same weights in transformers' LlamaForCausalLM: Meta's checkpoint keys
renamed, and the query/key rows permuted for its rotary layout.

Meta's RoPE rotates adjacent pairs of a head's features (x0, x1), (x2, x3), ...;
transformers' rotates the two halves (x_j, x_{j + hd/2}). Reordering the rows
of wq and wk so that output feature 2j goes to j and 2j + 1 to j + hd/2 makes
the two compute the same attention scores (the conversion transformers itself
ships for Meta's checkpoints does the same). wv, wo and the rest are unchanged.

transformers is an optional benchmark dependency: importing this module without
it raises ImportError, which bench/run.py turns into a skipped row.
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llama import ModelArgs

# Meta's module names -> transformers' (layer i's keys carry the prefix layers.{i}.)
LAYER_KEYS = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
TOP_KEYS = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of wq or wk (n_heads * hd, dim) from adjacent-pair to half-split order, head by head."""
    rows, cols = w.shape
    head_dim = rows // n_heads
    return w.view(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)  # pair j's (2j, 2j+1) -> (j, j + hd/2)


def hf_config(args: ModelArgs, ffn_width: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=ffn_width,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads, rms_norm_eps=args.norm_eps,
        max_position_embeddings=args.max_seq_len, tie_word_embeddings=False,
        rope_theta=args.rope_theta,
        bos_token_id=1, eos_token_id=2, pad_token_id=None)


def to_hf_state(meta_state: dict, args: ModelArgs) -> dict:
    """A Meta state dict (one merged shard) -> LlamaForCausalLM's keys and rotary layout."""
    out = {}
    for key, tensor in meta_state.items():
        if key == "rope.freqs":
            continue
        name, _, param = key.rpartition(".")  # param: "weight"
        if name in TOP_KEYS:
            out[f"{TOP_KEYS[name]}.{param}"] = tensor
            continue
        _, layer, sub = name.split(".", 2)  # "layers", i, "attention.wq"
        if sub == "attention.wq":
            tensor = permute_rotary(tensor, args.n_heads)
        elif sub == "attention.wk":
            tensor = permute_rotary(tensor, args.n_kv_heads)
        out[f"model.layers.{layer}.{LAYER_KEYS[sub]}.{param}"] = tensor
    return out


def load_hf(meta_state: dict, args: ModelArgs, dtype=torch.float32) -> LlamaForCausalLM:
    """A frozen LlamaForCausalLM in eval mode holding the weights of `meta_state`."""
    config = hf_config(args, ffn_width=meta_state["layers.0.feed_forward.w1.weight"].shape[0])
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(to_hf_state(meta_state, args), strict=True, assign=True)
    model.to(dtype)
    # The rotary table is a buffer the meta-device build left empty: rebuild it beside the
    # weights, after the cast, so that it stays float32 as in a model transformers loads itself.
    device = meta_state["tok_embeddings.weight"].device
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config).to(device)
    model.requires_grad_(False)
    return model.eval()
