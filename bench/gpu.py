"""
Aligner training on one GPU at LLaMA-2-7B's shape: tokens per second, model
FLOP utilisation against the card's own bf16 matrix-product rate, and peak
memory with and without activation checkpointing.

    python bench/gpu.py               # LLaMA-2-7B shape, bf16, batch 8 x 512: a few minutes on an H100 (estimate)
    python bench/gpu.py --batch 4     # a card with less memory

The weights are random (the speed does not depend on their values), built
straight on the GPU in bf16. A training step is forward + backward + AdamW on
an Aligner with N = 10 tokens on layers 2-31, the base frozen. Its FLOPs are
counted as in bench/run.py (train_step_flops), and the utilisation divides
the achieved rate by the rate of plain bf16 products of the very shapes the
step multiplies, timed in the same run. Peak memory is
torch.cuda.max_memory_allocated during the steps: in all, and less what was
allocated before them (the weights, the batch, the Aligner).
"""

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

import cli  # noqa: E402
from aligner import Aligner  # noqa: E402
from llama import ModelArgs, Transformer, precompute_freqs_cis  # noqa: E402
from run import START_LAYER, MatmulLimit, lm_loss, synchronize, table, train_step_flops  # noqa: E402

LLAMA_2_7B = dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256, norm_eps=1e-5)


def random_model(args: ModelArgs, device, dtype) -> Transformer:
    """A frozen Transformer of this shape with random weights, allocated once, directly on `device`."""
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to(dtype).to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 1.0 if name.startswith("tok_") else 0.02)
    model.freqs_cis = precompute_freqs_cis(args.head_dim, args.max_seq_len, args.rope_theta).to(device)
    return model.requires_grad_(False).eval()


def measure(model, tokens, steps: int, warmup: int, checkpointing: bool):
    """Median seconds of an Aligner (N = 10) training step, and the memory it adds above the weights."""
    device = tokens.device
    model.grad_checkpointing = checkpointing
    aligner = Aligner(model.args, n_tokens=10, start_layer=START_LAYER).to(device)
    optimizer = torch.optim.AdamW(aligner.parameters(), lr=9e-3, weight_decay=0.02)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)  # the weights, the batch and the Aligner
    times = []
    for i in range(warmup + steps):
        synchronize(device)
        start = time.perf_counter()
        loss = lm_loss(model(tokens, aligner), tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else float("nan")
    added = peak - before if device.type == "cuda" else float("nan")
    model.grad_checkpointing = False
    return statistics.median(times), peak, added


def main(argv=None):
    parser = cli.ArgumentParser(description="Aligner training speed and memory at LLaMA-2-7B's shape on one GPU.")
    parser.add_argument("--batch", type=cli.positive_int, default=8, help="sequences per step")
    parser.add_argument("--seq-len", type=cli.positive_int, default=512, help="tokens per sequence")
    parser.add_argument("--steps", type=cli.positive_int, default=5, help="timed steps (the median is shown)")
    parser.add_argument("--warmup", type=cli.non_negative_int, default=2, help="untimed steps before them")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/gpu.py: no CUDA device here; for the CPU table run bench/run.py")
    run(ModelArgs(**LLAMA_2_7B, max_seq_len=args.seq_len, max_batch_size=args.batch), torch.device("cuda"),
        torch.bfloat16, args.batch, args.seq_len, args.steps, args.warmup)


def run(model_args, device, dtype, batch, seq_len, steps, warmup) -> str:
    """Build, measure, print and return the markdown table (a function so a test can run it small on the CPU)."""
    # --- model and batch --------------------------------------------------------
    torch.manual_seed(0)
    model = random_model(model_args, device, dtype)
    tokens = torch.randint(3, model_args.vocab_size, (batch, seq_len), device=device)
    n_params = sum(p.numel() for p in model.parameters())

    # --- the card's matrix-product rate at the step's shapes ---------------------
    limit = MatmulLimit(model_args, batch * seq_len, START_LAYER, dtype=dtype, device=device)
    for i in range(warmup + steps):
        limit.step(record=i >= warmup)
    rate = limit.rate()
    del limit  # its operands would count in the peak memory below

    # --- training steps, without and with activation checkpointing --------------
    flops = train_step_flops(model_args, batch, seq_len, START_LAYER)
    rows = []
    for checkpointing in (False, True):
        seconds, peak, added = measure(model, tokens, steps, warmup, checkpointing)
        rows.append(["on" if checkpointing else "off", f"{seconds * 1e3:.0f}", f"{batch * seq_len / seconds:.0f}",
                     f"{flops / seconds / 1e12:.1f}", f"{flops / seconds / rate:.0%}",
                     f"{peak / 2**30:.1f}", f"{added / 2**30:.1f}"])

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    text = "\n".join([
        f"{name}; {n_params / 1e9:.2f}B parameters (LLaMA-2-7B shape), random weights in {str(dtype)[6:]}; "
        f"batch {batch} x {seq_len} tokens; Aligner N=10 on layers {START_LAYER}-{model_args.n_layers - 1}; "
        f"torch {torch.__version__}; median of {steps} steps after {warmup}.\n",
        f"{flops / 1e12:.1f} TFLOP per step; plain {str(dtype)[6:]} matrix products of the step's shapes: "
        f"{rate / 1e12:.0f} TFLOP/s.\n",
        table(["activation checkpointing", "ms / step", "tokens / s", "achieved TFLOP/s", "utilisation",
               "peak GPU memory (GiB)", "of which the step's (GiB)"], rows),
    ])
    print(text)
    return text


if __name__ == "__main__":
    cli.run(main)
