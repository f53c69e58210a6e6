"""
LLaMA-2-7B's shape on one GPU: Aligner training (tokens per second, model FLOP
utilisation against the card's own bf16 matrix-product rate, peak memory with
and without activation checkpointing), and decoding (generate.py eager and
compiled, and transformers' generate, against the card's weight-read limit).

    python bench/gpu.py                  # both tables, LLaMA-2-7B shape, bf16: about 5 minutes on an H100 (estimate)
    python bench/gpu.py --table decode   # the decode table alone
    python bench/gpu.py --batch 4        # a card with less memory (the training batch)

The weights are random (the speed does not depend on their values), built
straight on the GPU in bf16. A training step is forward + backward + AdamW on
an Aligner with N = 10 tokens on layers 2-31, the base frozen. Its FLOPs are
counted as in bench/run.py (train_step_flops), and the utilisation divides
the achieved rate by the rate of plain bf16 products of the very shapes the
step multiplies, timed in the same run. Peak memory is
torch.cuda.max_memory_allocated during the steps: in all, and less what was
allocated before them (the weights, the batch, the Aligner).

Decoding is greedy, 64 new tokens, one generation at a time; each generation
draws new prompt lengths (32 to 128 tokens; at batch 16 each row its own, so
rows are left-padded), since repeating one length would hide what a new length
costs. Each row is measured alone, in turn: one untimed generation (for
--compile, the one that compiles), then --generations timed ones; the time of
a whole generate call, prefill included, over the tokens it made. Rows: the
base model against a one-token Aligner at batch 1; at batch 16 one Aligner for
every row against 16 different Aligners drawn from a bank of a million
(--bank) one-token Aligners; transformers' generate (optional; its rows are
left out without it) on the same weights, converted by bench/hf.py and checked
to give our logits first. The limit: every weight read once per step (the
embedding table only by row) at the read bandwidth of the card, measured in the
same run by summing a 4 GiB tensor.
"""

import functools
import importlib.util
import random
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root
import support.startup  # noqa: E402,F401  first of the project: Ctrl-C while torch loads ends in one line too

import torch  # noqa: E402

from aligner import Aligner, AlignerBank  # noqa: E402
from generate import generate  # noqa: E402
from llama import ModelArgs, Transformer, precompute_freqs_cis  # noqa: E402
from run import START_LAYER, IdTokenizer, MatmulLimit, lm_loss, synchronize, table, train_step_flops  # noqa: E402
from support import cli  # noqa: E402

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
    parser = cli.ArgumentParser(
        description="Aligner training and decoding speed at LLaMA-2-7B's shape on one GPU.")
    parser.add_argument("--table", choices=["train", "decode", "both"], default="both", help="which table to measure")
    parser.add_argument("--batch", type=cli.positive_int, default=8, help="training: sequences per step")
    parser.add_argument("--seq-len", type=cli.positive_int, default=512, help="training: tokens per sequence")
    parser.add_argument("--steps", type=cli.positive_int, default=5, help="training: timed steps (the median is shown)")
    parser.add_argument("--warmup", type=cli.non_negative_int, default=2, help="training: untimed steps before them")
    parser.add_argument("--generations", type=cli.positive_int, default=3, help="decoding: timed generations per row")
    parser.add_argument("--bank", type=cli.positive_int, default=1_000_000,
                        help="decoding: one-token Aligners in the bank")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/gpu.py: no CUDA device here; for the CPU tables run bench/run.py and bench/decode.py")
    device, dtype = torch.device("cuda"), torch.bfloat16
    model_args = ModelArgs(**LLAMA_2_7B, max_seq_len=max(args.seq_len, 512), max_batch_size=max(args.batch, 16))
    torch.manual_seed(0)
    model = random_model(model_args, device, dtype)
    if args.table in ("train", "both"):
        run(model_args, device, dtype, args.batch, args.seq_len, args.steps, args.warmup, model=model)
        torch.cuda.empty_cache()
    if args.table in ("decode", "both"):
        decode_run(model, device, batches=(1, 16), bank_size=args.bank, generations=args.generations)


def run(model_args, device, dtype, batch, seq_len, steps, warmup, model=None) -> str:
    """Measure, print and return the training table (a function so a test can run it small on the CPU)."""
    # --- model and batch --------------------------------------------------------
    if model is None:
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


# -----------------------------------------------------------------------------
# decoding

EAGER, COMPILED, TRANSFORMERS = "generate.py", "generate.py --compile", "transformers generate"
BASE, ONE, BANK = "base model", "one Aligner", "a different Aligner per row"


class DecodeCase(NamedTuple):
    batch: int
    decoder: str  # EAGER, COMPILED or TRANSFORMERS
    aligner: str  # BASE, ONE or BANK


def decode_cases(batches) -> list:
    """The rows of the decode table: the base against one Aligner at batch 1; one
    Aligner for every row against one Aligner per row at larger batches."""
    cases = []
    for batch in batches:
        kinds = (BASE, ONE) if batch == 1 else (ONE, BANK)
        cases += [DecodeCase(batch, decoder, kind) for decoder in (EAGER, COMPILED) for kind in kinds]
        cases.append(DecodeCase(batch, TRANSFORMERS, BASE))
    return cases


def draw_prompts(rng: random.Random, batch: int, lengths: tuple, vocab_size: int) -> list:
    """`batch` prompts of random tokens (BOS first), each of a length drawn from [lengths[0], lengths[1]]."""
    return [[1] + [rng.randrange(3, vocab_size) for _ in range(rng.randint(*lengths) - 1)] for _ in range(batch)]


def random_bank(model_args: ModelArgs, size: int, device, dtype) -> AlignerBank:
    """A bank of `size` one-token Aligners with random prefixes and gates, built as two
    tensors (a million Aligner objects would take longer to make than to measure)."""
    bank = AlignerBank([Aligner(model_args, n_tokens=1, start_layer=START_LAYER)])
    n_adapted = model_args.n_layers - START_LAYER
    bank.prefix = torch.randn(size, 1, model_args.dim, device=device, dtype=dtype)  # (K, N, dim)
    bank.gates = 0.1 * torch.randn(size, n_adapted, model_args.n_heads, device=device, dtype=dtype)  # (K, layers, H)
    return bank


def read_bandwidth(device, nbytes: int) -> float:
    """Bytes per second the device reads: a sum over an nbytes tensor, median of five after one."""
    x = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
    times = []
    for i in range(6):
        synchronize(device)
        start = time.perf_counter()
        x.sum()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return x.nbytes / statistics.median(times[1:])


def transformers_twin(model, dtype, tolerance: float):
    """transformers' LlamaForCausalLM on the very same weights, or None and the reason why not."""
    if importlib.util.find_spec("transformers") is None:
        return None, "transformers is not installed (pip install -r bench/requirements.txt): its rows are left out"
    import hf

    theirs = hf.load_hf(model.state_dict(), model.args, dtype)
    theirs.generation_config.eos_token_id = None  # make every token, as ours does with an EOS never sampled
    theirs.generation_config.pad_token_id = 0
    tokens = torch.randint(3, model.args.vocab_size, (2, 24), device=model.output.weight.device)
    with torch.inference_mode():
        ours, their = model(tokens), theirs(input_ids=tokens).logits.float()
    err = ((ours - their).abs().max() / ours.abs().max()).item()
    if err > tolerance:
        return None, f"transformers' logits differ from ours by {err:.1e} of the largest: its rows are left out"
    return theirs, f"transformers {importlib.import_module('transformers').__version__}; its logits match ours " \
                   f"(largest difference {err:.1e} of the largest logit)"


def left_padded(prompts: list, device):
    """transformers' inputs for prompts of different lengths: input_ids and attention_mask (B, T)."""
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, longest - len(p):] = torch.tensor(p)
        mask[b, longest - len(p):] = 1
    return ids.to(device), mask.to(device)


def decoder_for(case: DecodeCase, model, theirs, one, bank, rng: random.Random, new_tokens: int):
    """A function that makes one generation of `new_tokens` tokens for these prompts, as the case says."""
    device = model.output.weight.device
    if case.decoder == TRANSFORMERS:
        def run(prompts):
            ids, mask = left_padded(prompts, device)
            theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
        return run

    def run(prompts):
        aligner = {BASE: None, ONE: one}.get(case.aligner)
        if case.aligner == BANK:  # new Aligners for every generation
            aligner = bank.select([rng.randrange(len(bank)) for _ in prompts])
        generate(model, IdTokenizer(), prompts, aligner, max_new_tokens=new_tokens, compile=case.decoder == COMPILED)
    return run


def time_generations(run, draw, generations: int, device) -> tuple:
    """(seconds of the untimed first generation, seconds of each timed one), each on newly drawn prompts."""
    seconds = []
    for _ in range(1 + generations):
        prompts = draw()
        synchronize(device)
        start = time.perf_counter()
        run(prompts)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds[0], seconds[1:]


def decode_run(model, device, batches=(1, 16), bank_size=1_000_000, generations=3, new_tokens=64,
               prompt_lengths=(32, 128), bandwidth_bytes=4 << 30, tolerance=0.1) -> str:
    """Measure, print and return the decode table (a function so a test can run it small on the CPU).

    tolerance: the largest difference of transformers' logits from ours, as a
    share of the largest logit, that still counts as the same weights. Other
    weights differ by about the logits' own size; bf16 rounding alone gave under
    1e-2 on small bf16 models. (With random weights attention barely moves the
    logits, so this check does not see the rotary conversion; tests/test_bench.py
    checks that in float32.)
    """
    # --- the limit, the Aligners and transformers ------------------------------------
    model_args, dtype = model.args, model.output.weight.dtype
    weight_bytes = sum(p.nbytes for name, p in model.named_parameters() if not name.startswith("tok_"))
    bandwidth = read_bandwidth(device, bandwidth_bytes)
    torch.manual_seed(0)
    one = Aligner(model_args, n_tokens=1, start_layer=START_LAYER)
    torch.nn.init.normal_(one.gates, std=0.1)  # non-zero, as after training
    one = one.to(device)
    bank = random_bank(model_args, bank_size, device, dtype)
    theirs, note = transformers_twin(model, dtype, tolerance)
    print(f"decode: {note}", file=sys.stderr)

    # --- each row alone, one generation at a time ---------------------------------------
    rng = random.Random(0)
    step, first = {}, {}
    for case in decode_cases(batches):
        if case.decoder == TRANSFORMERS and theirs is None:
            continue
        run = decoder_for(case, model, theirs, one, bank, rng, new_tokens)
        draw = functools.partial(draw_prompts, rng, case.batch, prompt_lengths, model_args.vocab_size)
        with torch.inference_mode():
            first[case], seconds = time_generations(run, draw, generations, device)
        step[case] = sum(seconds) / (generations * new_tokens)  # seconds per decode step (a token for each row)
        print(f"  {case.batch:>2} {case.decoder:<22} {case.aligner:<28} {case.batch / step[case]:9.1f} tokens/s "
              f"(first generation {first[case]:.1f} s)", file=sys.stderr, flush=True)

    # --- the table -----------------------------------------------------------------------
    def ratio(case, reference):
        return step[reference] / step[case] if case in step and reference in step else None

    rows, verdicts = [], []
    for batch in batches:
        limit = batch * bandwidth / weight_bytes  # tokens per second
        for case in [c for c in decode_cases([batch]) if c in step]:
            compared = comparison(case, ratio)
            rows.append([batch, case.decoder, aligner_label(case, bank_size), f"{batch / step[case]:.1f}",
                         f"{step[case] * 1e3:.1f}", f"{batch / step[case] / limit:.0%}",
                         "" if compared is None else f"{compared[0]:.2f}x {compared[1]}", f"{first[case]:.1f}"])
            verdicts += targets(case, ratio, batch / step[case] / limit)
        rows.append([batch, "limit: every weight read once per step", "", f"{limit:.1f}",
                     f"{batch / limit * 1e3:.1f}", "100%", "", ""])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    text = "\n".join([
        f"{name}; {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, random weights in "
        f"{str(dtype)[6:]}; greedy, {new_tokens} new tokens, prompts of {prompt_lengths[0]}-{prompt_lengths[1]} "
        f"tokens drawn anew for every generation (and every row); {generations} timed generations per row after "
        f"one untimed; torch {torch.__version__}. {note}. The limit: {weight_bytes / 2**30:.1f} GiB of weights "
        f"at the measured read bandwidth, {bandwidth / 1e9:.0f} GB/s.\n",
        table(["batch", "decoder", "Aligner", "tokens / s", "ms / step", "of the limit", "compared with",
               "first generation (s)"], rows),
        "\nTargets:\n",
        *verdicts,
    ])
    print(text)
    return text


def aligner_label(case: DecodeCase, bank_size: int) -> str:
    if case.aligner == BANK:
        return f"{case.batch} different, from a bank of {bank_size:,} (N=1)"
    return "one for every row (N=1)" if case.aligner == ONE else "none (base model)"


def comparison(case: DecodeCase, ratio):
    """(throughput ratio, what it is against) for the table's "compared with" column, or None."""
    batch, against = case.batch, None
    if case.decoder == EAGER and case.aligner == (BASE if batch == 1 else ONE):
        against = (DecodeCase(batch, TRANSFORMERS, BASE), "transformers generate")
    elif case.aligner == ONE and batch == 1:
        against = (DecodeCase(1, case.decoder, BASE), "the base model")
    elif case.aligner == BANK:
        against = (DecodeCase(batch, case.decoder, ONE), "one Aligner")
    elif case.decoder == COMPILED and case.aligner == ONE:
        against = (DecodeCase(1, COMPILED, ONE), "itself at batch 1")
    if against is None or ratio(case, against[0]) is None:
        return None
    if against[1] == "itself at batch 1":  # tokens per second, not time per step, against batch 1
        return ratio(case, against[0]) * batch, against[1]
    return ratio(case, against[0]), against[1]


def targets(case: DecodeCase, ratio, of_limit: float) -> list:
    """Lines saying whether this row meets the targets that concern it."""
    lines = []

    def check(what, value, target, shown):
        met = "met" if value >= target else "NOT met"
        lines.append(f"- {what}: {shown(value)} (target {shown(target)}): {met}")

    compared = comparison(case, ratio)
    label = f"{case.decoder}, batch {case.batch}, {case.aligner}"
    if case.decoder == COMPILED and case.batch == 1:
        check(f"{label}, share of the weight-read limit", of_limit, 0.60, lambda v: f"{v:.0%}")
    if compared is None:
        return lines
    value, against = compared
    target = {"transformers generate": 1.5, "the base model": 0.97, "one Aligner": 0.95,
              "itself at batch 1": 8.0}[against]
    if against != "transformers generate" or case.batch == 1:
        check(f"{label}, against {against}", value, target, lambda v: f"{v:.2f}x")
    return lines


if __name__ == "__main__":
    cli.run(main)
