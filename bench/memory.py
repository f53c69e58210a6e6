"""
Memory of Aligner training per rank at LLaMA-2's sizes: the weights under FSDP
at 1 to 8 ranks, a micro-batch's activations with and without activation
checkpointing, and the Aligner's own state.

    python bench/memory.py                        # 7B, 13B, 70B; micro-batch 8 x 512 (SFT's default on a GPU)
    python bench/memory.py --batch 4 --seq-len 1024 --n-tokens 1

Nothing is allocated: the model is built on the meta device, where tensors
have shapes but no data, and one training forward runs on it.
- Weights: bf16 bytes of the frozen base over the ranks (FSDP keeps 1/world
  of every weight), plus the whole blocks gathered at a time: FSDP2 gathers
  the block that runs and prefetches the next, so two blocks in all.
- Activations: the tensors autograd saves for backward, counted once per
  storage by saved-tensor hooks. On the meta device attention would take the
  math path, which saves the T x T weights; it is counted instead as the
  fused kernels that run on a GPU save it: q, k, v, the output and the
  log-sum-exp. The float32 logits' gradient, alive at the start of backward,
  is added. With --grad-checkpointing only each adapted layer's input is
  kept, and one layer's saved tensors exist again while it is recomputed.
- The Aligner: float32 parameters, gradients and AdamW's two moments.
Not counted: the allocator's caching and fragmentation, kernel workspaces,
and short-lived temporaries; bench/gpu.py measures the real peak on a GPU.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root
import support.startup  # noqa: E402,F401  first of the project: Ctrl-C while torch loads ends in one line too

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.autograd.graph import saved_tensors_hooks  # noqa: E402

import llama  # noqa: E402
from aligner import Aligner  # noqa: E402
from llama import ModelArgs, Transformer  # noqa: E402
from support import cli  # noqa: E402

SIZES = {  # params.json of Meta's LLaMA-2 downloads, vocab_size from the tokenizer
    "7B": dict(dim=4096, n_layers=32, n_heads=32, multiple_of=256, norm_eps=1e-5, vocab_size=32000),
    "13B": dict(dim=5120, n_layers=40, n_heads=40, multiple_of=256, norm_eps=1e-5, vocab_size=32000),
    "70B": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3,
                norm_eps=1e-5, vocab_size=32000),
}
GiB = 2**30


class FusedAttention(torch.autograd.Function):
    """scaled_dot_product_attention as a fused GPU kernel holds it for backward: q, k, v,
    the output and the log-sum-exp per query; never the T x T weights."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)  # (B, H, T, hd)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)  # (B, H, T)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("a memory count only")


def fused_sdpa(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False):
    return FusedAttention.apply(q, k, v)


def saved_bytes(args: ModelArgs, batch: int, seq_len: int, n_tokens: int, start_layer: int,
                device="meta") -> dict:
    """Bytes autograd keeps for backward after one training forward, in all and per layer.
    On the meta device attention is counted as the fused kernels save it; elsewhere the
    real kernel runs (tests/test_bench.py checks the two counts agree on the CPU)."""
    with torch.device(device):
        model = Transformer(args).to(torch.bfloat16).requires_grad_(False)
        aligner = Aligner(args, n_tokens=n_tokens, start_layer=start_layer)
        tokens = torch.zeros(batch, seq_len, dtype=torch.long)
    params = {p.untyped_storage()._cdata for p in [*model.parameters(), *aligner.parameters()]}
    storages, current = {}, ["outside the layers"]
    for i, layer in enumerate(model.layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i))
        layer.register_forward_hook(lambda m, a, out: current.__setitem__(0, "outside the layers"))

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in params:
            storages.setdefault(key, (current[0], t.untyped_storage().nbytes()))
        return t

    real = llama.F.scaled_dot_product_attention
    if device == "meta":
        llama.F.scaled_dot_product_attention = fused_sdpa
    try:
        with saved_tensors_hooks(pack, lambda t: t):
            logits = model(tokens, aligner)  # (B, T, V) float32
            F.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    finally:
        llama.F.scaled_dot_product_attention = real
    by_layer = {}
    for where, nbytes in storages.values():
        by_layer[where] = by_layer.get(where, 0) + nbytes
    return {"total": sum(by_layer.values()), "by_layer": by_layer, "logits_grad": logits.nbytes}


def activations(args, batch, seq_len, n_tokens, start_layer, checkpointing: bool) -> int:
    saved = saved_bytes(args, batch, seq_len, n_tokens, start_layer)
    if not checkpointing:
        return saved["total"] + saved["logits_grad"]
    layer_inputs = (args.n_layers - start_layer) * batch * seq_len * args.dim * 2  # bf16 (B, T, dim) each
    one_layer = max(v for k, v in saved["by_layer"].items() if k != "outside the layers")
    return layer_inputs + one_layer + saved["by_layer"].get("outside the layers", 0) + saved["logits_grad"]


def weights_per_rank(args: ModelArgs, ranks: int) -> int:
    """The bf16 bytes a rank holds: its shard of every weight, plus two whole blocks while they run."""
    with torch.device("meta"):
        model = Transformer(args)
    total = sum(p.numel() for p in model.parameters()) * 2
    block = sum(p.numel() for p in model.layers[0].parameters()) * 2
    return total if ranks == 1 else total // ranks + 2 * block


def aligner_state(args: ModelArgs, n_tokens: int, start_layer: int) -> int:
    """float32 parameters, gradients, and AdamW's exp_avg and exp_avg_sq: 16 bytes a parameter."""
    return Aligner(args, n_tokens=n_tokens, start_layer=start_layer).num_params() * 16


def table(batch, seq_len, n_tokens, start_layer, ranks=(1, 2, 4, 8)) -> str:
    header = (["model"] + [f"weights, {r} rank{'s' * (r > 1)} (GiB)" for r in ranks]
              + [f"activations {batch} x {seq_len} (GiB)", "with --grad-checkpointing (GiB)",
                 "Aligner + AdamW (KiB)"])
    rows = []
    for name, params in SIZES.items():
        args = ModelArgs(**params, max_seq_len=seq_len)
        rows.append([name] + [f"{weights_per_rank(args, r) / GiB:.1f}" for r in ranks]
                    + [f"{activations(args, batch, seq_len, n_tokens, start_layer, c) / GiB:.1f}" for c in (False, True)]
                    + [f"{aligner_state(args, n_tokens, start_layer) / 1024:.0f}"])
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def main(argv=None):
    parser = cli.ArgumentParser(description="Memory per rank of Aligner training at LLaMA-2's sizes.")
    parser.add_argument("--batch", type=cli.positive_int, default=8, help="sequences per micro-batch on one rank")
    parser.add_argument("--seq-len", type=cli.positive_int, default=512, help="tokens per sequence")
    parser.add_argument("--n-tokens", type=cli.positive_int, default=10, help="N, the Aligner's tokens")
    parser.add_argument("--start-layer", type=cli.non_negative_int, default=2,
                        help="the first adapted layer (below 32, LLaMA-2-7B's layer count)")
    args = parser.parse_args(argv)
    print(f"bf16 base, Aligner N={args.n_tokens} from layer {args.start_layer}, "
          f"micro-batch {args.batch} x {args.seq_len} tokens per rank\n")
    print(table(args.batch, args.seq_len, args.n_tokens, args.start_layer))


if __name__ == "__main__":
    cli.run(main)
