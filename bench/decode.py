"""
Decode throughput of generate.py's loop on a tiny model on CPU, and what an
AlignerBank holds per Aligner.

    python bench/decode.py
    python bench/decode.py --steps 64 --repeats 15

Tokens per second of the decode steps alone (the prefill is not timed), greedy,
on a randomly initialised model of llama2.c's stories15M shape (dim 288, 6
layers, 6 heads, vocab 32000), for:
- batch 1 and batch 16, the base model against one Aligner with N = 1
  (target: the Aligner costs at most 3% of the throughput);
- batch 16 with 16 different Aligners (one AlignerRows) against 16 rows of one
  Aligner (target: 95% of its throughput or more).
The cases run interleaved, taking turns at every decode step, and each figure
comes from the median step time over all steps of all repeats, so other work on
a shared machine slows every case alike. The steps run under the attention
kernels that generate.generate chooses (generate.EAGER_ATTENTION).
"""

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import support.startup  # noqa: E402,F401  first of the project: Ctrl-C while torch loads ends in one line too

import torch  # noqa: E402

from aligner import Aligner, AlignerBank  # noqa: E402
from generate import EAGER_ATTENTION, attention_kernels, decode_one_token, prefill, rows_of  # noqa: E402
from llama import KVCache, ModelArgs, Transformer  # noqa: E402
from support import cli  # noqa: E402

STORIES15M = dict(dim=288, n_layers=6, n_heads=6, multiple_of=32, vocab_size=32000)
LLAMA_2_7B = dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000)


def decode_step_seconds(model, cases: dict, prompt_len: int, steps: int) -> dict:
    """Seconds of each greedy decode step of every case, after an untimed prefill.

    The cases take turns step by step (in a rotating order), so a slow moment
    of a shared machine falls on all of them alike. cases: name -> (aligner, batch size).
    """
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, (aligner, batch_size) in cases.items():
        cache = KVCache(model.args, batch_size, prompt_len + steps)
        tokens = torch.randint(3, model.args.vocab_size, (batch_size, prompt_len), generator=gen)
        state[name] = (cache, prefill(model, tokens, aligner, cache))
    seconds = {name: [] for name in cases}
    order = list(cases)
    for step in range(steps):
        for name in order[step % len(order):] + order[:step % len(order)]:
            (aligner, _), (cache, logits) = cases[name], state[name]
            start = time.perf_counter()
            logits = decode_one_token(model, logits.argmax(-1)[:, None], aligner, cache)
            seconds[name].append(time.perf_counter() - start)
            state[name] = (cache, logits)
    return seconds


def bank_bytes_per_aligner(dtype: torch.dtype, n_aligners: int = 1024) -> float:
    """Bytes an AlignerBank of one-token LLaMA-2-7B Aligners holds per Aligner, measured on a real bank."""
    args = ModelArgs(**LLAMA_2_7B)
    bank = AlignerBank([Aligner(args, n_tokens=1) for _ in range(n_aligners)]).to(dtype=dtype)
    return bank.nbytes() / n_aligners


def main(argv=None):
    parser = cli.ArgumentParser(description="Decode throughput with and without Aligners, on CPU.")
    parser.add_argument("--steps", type=cli.positive_int, default=64,
                        help="decode steps per repeat, after a 32-token prompt")
    parser.add_argument("--repeats", type=cli.positive_int, default=9,
                        help="rounds of --steps steps; the median step time over all of them is reported")
    parser.add_argument("--threads", type=cli.positive_int, default=1,
                        help="torch CPU threads (1: steadiest on a shared machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    # --- model and Aligners -------------------------------------------------------
    torch.manual_seed(0)
    model_args = ModelArgs(**STORIES15M, max_seq_len=256)
    model = Transformer(model_args).requires_grad_(False).eval()
    aligners = [Aligner(model_args, n_tokens=1) for _ in range(16)]
    for a in aligners:
        a.gates.data.normal_(std=0.1)  # non-zero, as after training
    one = rows_of(aligners[0], slice(None), "cpu")  # one Aligner, as generate passes it for every row
    sixteen = AlignerBank(aligners).select(list(range(16)))  # row b carries Aligner b
    cases = {
        "batch 1, base": (None, 1),
        "batch 1, Aligner": (one, 1),
        "batch 16, base": (None, 16),
        "batch 16, one Aligner": (one, 16),
        "batch 16, 16 Aligners": (sixteen, 16),
    }

    # --- measure, interleaved step by step -----------------------------------------------
    seconds = {name: [] for name in cases}
    with torch.inference_mode(), attention_kernels(EAGER_ATTENTION):  # the kernels generate.generate decodes with
        decode_step_seconds(model, cases, 32, 4)  # warm-up
        for _ in range(args.repeats):
            for name, times in decode_step_seconds(model, cases, 32, args.steps).items():
                seconds[name] += times
    step = {name: statistics.median(times) for name, times in seconds.items()}  # median seconds per step

    # --- report ---------------------------------------------------------------------
    print(f"decode on CPU, {cli.plural(args.threads, 'thread')}, stories15M shape, {args.steps} steps after a 32-token "
          f"prompt, {args.repeats} repeats, median step time")
    for name, (_, batch_size) in cases.items():
        print(f"  {name:<24} {batch_size / step[name]:8.1f} tokens/s")
    print("throughput ratios (target):")
    for label, case, baseline, target in (
            ("Aligner N=1 / base, batch 1", "batch 1, Aligner", "batch 1, base", 0.97),
            ("Aligner N=1 / base, batch 16", "batch 16, one Aligner", "batch 16, base", 0.97),
            ("16 Aligners / one Aligner, batch 16", "batch 16, 16 Aligners", "batch 16, one Aligner", 0.95)):
        print(f"  {label:<36} {step[baseline] / step[case]:6.3f}  (>= {target})")
    print("AlignerBank, one-token Aligners of LLaMA-2-7B's shape (1 x 4096 prefix + 30 x 32 gates = 5,056 values):")
    for dtype in (torch.float32, torch.bfloat16):
        per = bank_bytes_per_aligner(dtype)
        print(f"  {str(dtype).removeprefix('torch.'):<9} {per:,.0f} bytes per Aligner "
              f"(5,056 x {dtype.itemsize}); a million Aligners: {per * 1e6 / 1e9:.1f} GB")


if __name__ == "__main__":
    cli.run(main)
