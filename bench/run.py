"""
How fast the Aligner trains, adds to a forward pass and decodes, beside Hugging
Face PEFT on transformers' LLaMA and beside the machine's own matrix-product rate.

    pip install -r bench/requirements.txt  # the peers (optional: without them their rows are skipped)
    python bench/run.py                    # the whole table on the CPU: about 4 minutes on 2 quiet cores
    python bench/run.py --threads 1        # steadier on a machine that others are using too

Protocol. One set of random weights is written once in Meta's layout
(formats.save); every contender reads that file (transformers' LlamaForCausalLM
through bench/hf.py, after a check that its logits match ours). All use the
same batch of random tokens, float32, the same thread count and the same
adapted layers (2 and up, as the Aligner's default start_layer), except the
pair of LoRA rows that set ours (lora.py) beside PEFT's with both in every
layer, as the paper's LoRA baseline is. Each round
runs one step of every contender, in turn, so that a busy machine slows them
alike; the first --warmup rounds are not timed; a row shows the median of the
timed rounds and its ratio to ours.

Peak memory: each training contender runs alone in a fresh process; the
figure is the growth of its resident set (VmHWM from /proc/self/status, reset
through /proc/self/clear_refs once the model is loaded) over three training
steps, so it counts activations, gradients and optimizer state, not weights.

The matrix-product limit: the same run times plain products of every shape a
training step multiplies (x W^T forward, g W backward, for each weight),
weighted by how often the step uses each. A training step's FLOPs are counted
by train_step_flops below: 2 per multiply-add for each weight and token forward,
the same again backward for layers start_layer and up (the base is frozen, so
backward computes input gradients only), and causal attention.

The decode rows compare generate.generate with transformers' generate (greedy,
its default KV cache): tokens generated per second, prefill included, with the
end-of-sequence token disabled on both sides so each makes every token.
"""

import gc
import importlib.util
import json
import re
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: llama, aligner, generate
import support.startup  # noqa: E402,F401  first of the project: Ctrl-C while torch loads ends in one line too

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from aligner import Aligner  # noqa: E402
from llama import ModelArgs, Transformer  # noqa: E402
from lora import LoRA  # noqa: E402
from support import cli  # noqa: E402
from support.formats import save  # noqa: E402

# the CPU configuration: a small LLaMA that trains a step in about a second on 2 cores
CPU_MODEL = dict(dim=512, n_layers=8, n_heads=8, vocab_size=4096, multiple_of=256)
START_LAYER = 2  # the Aligner's default; PEFT's adapters go on the same layers
LR, WEIGHT_DECAY = 9e-3, 0.02  # SFT: the paper's lr (Appendix C), the authors' finetune/aligner.py weight decay
DECODE_PROMPT, DECODE_NEW = 32, 64  # decode rows: prompt length, tokens generated

# -----------------------------------------------------------------------------
# FLOPs and the matrix-product limit


def layer_weights(args: ModelArgs) -> list:
    """(in, out) of one layer's weights: wq, wk, wv, wo, w1, w3, w2."""
    kv, hidden = args.n_kv_heads * args.head_dim, args.ffn_dim
    return [(args.dim, args.dim), (args.dim, kv), (args.dim, kv), (args.dim, args.dim),
            (args.dim, hidden), (args.dim, hidden), (hidden, args.dim)]


def attention_flops(args: ModelArgs, batch: int, seqlen: int) -> float:
    """One layer's causal attention forward: Q K^T and P V over the T(T+1)/2 visible pairs."""
    return 2 * 2 * args.dim * batch * seqlen * (seqlen + 1) / 2


def train_step_flops(args: ModelArgs, batch: int, seqlen: int, start_layer: int) -> float:
    """FLOPs of one training step of an adapter on layers start_layer and up, base frozen.

    Forward: 2 per multiply-add for every weight and token, and attention.
    Backward: only input gradients (the frozen weights get none), which cost as
    much as the forward again, only through layers start_layer and up and the
    output head; attention backward is twice its forward (dP, dV, dQ, dK).
    With start_layer 0 this is 4 x parameters x tokens plus 3 x attention.
    The Aligner's own prefix terms (N keys per query) are left out: under 1%
    at N = 10. The first adapted layer's backward is counted whole, though
    autograd skips its wq, wk, wv input gradients: an over-count of about 1%.
    """
    tokens = batch * seqlen
    per_layer = sum(i * o for i, o in layer_weights(args))
    head = args.dim * args.vocab_size
    attention = attention_flops(args, batch, seqlen)
    forward = args.n_layers * (2 * per_layer * tokens + attention) + 2 * head * tokens
    backward = (args.n_layers - start_layer) * (2 * per_layer * tokens + 2 * attention) + 2 * head * tokens
    return forward + backward


def matmul_products(args: ModelArgs, tokens: int, start_layer: int) -> list:
    """(m, k, n, count): the plain products of a training step, forward x W^T and backward g W."""
    products = {}

    def add(m, k, n, count):
        products[(m, k, n)] = products.get((m, k, n), 0) + count

    for i, o in layer_weights(args):
        add(tokens, i, o, args.n_layers)  # forward: (tokens, in) @ (in, out)
        add(tokens, o, i, args.n_layers - start_layer)  # backward: (tokens, out) @ (out, in)
    add(tokens, args.dim, args.vocab_size, 1)
    add(tokens, args.vocab_size, args.dim, 1)
    return [(m, k, n, c) for (m, k, n), c in products.items()]


def synchronize(device):
    """Wait for the GPU's queued work, so that a clock read afterwards covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def read_bandwidth(nbytes: int = 1 << 28) -> float:
    """Bytes per second this machine reads from memory: a sum over a 256 MiB tensor, median of five."""
    x = torch.ones(nbytes // 4)
    x.sum()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return x.nbytes / statistics.median(times)


class MatmulLimit:
    """Plain products of the step's shapes; rate() is their FLOP/s, weighted as the step uses them."""

    def __init__(self, args, tokens, start_layer, dtype=torch.float32, device="cpu"):
        self.products = [(torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device), c)
                         for m, k, n, c in matmul_products(args, tokens, start_layer)]
        self.times = [[] for _ in self.products]

    def step(self, record=True):
        for times, (a, b, _) in zip(self.times, self.products):
            synchronize(a.device)
            start = time.perf_counter()
            a @ b
            synchronize(a.device)
            if record:
                times.append(time.perf_counter() - start)

    def rate(self) -> float:
        flops = sum(2 * a.shape[0] * a.shape[1] * b.shape[1] * c for a, b, c in self.products)
        seconds = sum(statistics.median(t) * c for t, (_, _, c) in zip(self.times, self.products))
        return flops / seconds


# -----------------------------------------------------------------------------
# the contenders


def read_model(folder: Path):
    """ModelArgs and the state dict written by formats.save, read into memory.

    Not memory-mapped: a model whose weights stayed file-backed would page
    them in during its first steps, and that would count as its peak memory.
    """
    args = ModelArgs(**json.loads((folder / "params.json").read_text()), max_seq_len=512, max_batch_size=64)
    state = torch.load(folder / "consolidated.00.pth", map_location="cpu", weights_only=True)
    return args, state


def load_ours(folder: Path) -> Transformer:
    args, state = read_model(folder)
    model = Transformer(args)
    model.load_state_dict(state, strict=True)
    return model.requires_grad_(False).eval()


def load_theirs(folder: Path):
    from hf import load_hf  # needs transformers

    args, state = read_model(folder)
    return load_hf(state, args)


def lm_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: logits (B, T, V) predict tokens shifted by one; the last position predicts nothing."""
    targets = F.pad(tokens[:, 1:], (0, 1), value=-100)  # (B, T)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def peft_model(kind: str, folder: Path):
    """transformers' LLaMA with a PEFT adapter on layers START_LAYER and up."""
    import peft

    model = load_theirs(folder)
    n_layers = model.config.num_hidden_layers
    if kind == "adaption_prompt":
        config = peft.AdaptionPromptConfig(adapter_len=10, adapter_layers=n_layers - START_LAYER,
                                           task_type="CAUSAL_LM")
    elif kind == "lora":
        config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                 layers_to_transform=list(range(START_LAYER, n_layers)), task_type="CAUSAL_LM")
    else:  # "lora, every layer": the LoRA the paper compares with, as lora.py trains it
        config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                 task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


TRAINERS = {  # name in the table: how to build it
    "Aligner N=1": ("ours", 1),
    "Aligner N=10": ("ours", 10),
    "PEFT adaption_prompt (10 tokens)": ("peft", "adaption_prompt"),
    "PEFT LoRA r=8 (q, v)": ("peft", "lora"),
    # LoRA against LoRA, in every layer as the paper's baseline is (lora.py): ours beside PEFT's
    "LoRA r=8 (q, v), every layer": ("lora", 8),
    "PEFT LoRA r=8 (q, v), every layer": ("peft", "lora, every layer"),
    "Aligner N=10, torch.compile": ("compiled", 10),  # with --compile only: not the default path
}


def make_trainer(name: str, folder: Path, model=None):
    """A function that runs one training step (forward, backward, AdamW) on a batch of tokens."""
    kind, setting = TRAINERS[name]
    if kind in ("ours", "compiled", "lora"):
        model = model or load_ours(folder)
        if kind == "lora":  # dropout 0, as PEFT's row: the same arithmetic on both sides
            aligner = LoRA(model.args, rank=setting, alpha=16, dropout=0.0)
        else:
            aligner = Aligner(model.args, n_tokens=setting, start_layer=START_LAYER)
        params = list(aligner.parameters())

        def forward(tokens):
            return model(tokens, aligner)
        if kind == "compiled":
            forward = torch.compile(forward)  # compiles on the first (warm-up) step
    else:
        model = peft_model(setting, folder)
        params = [p for p in model.parameters() if p.requires_grad]

        def forward(tokens):
            return model(input_ids=tokens, use_cache=False).logits
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, foreach=True)

    def step(tokens):
        loss = lm_loss(forward(tokens), tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def peak_training_memory(name: str, folder: Path, tokens: torch.Tensor, threads: int) -> float:
    """MiB that three training steps add to the resident set, in this (fresh) process."""
    torch.set_num_threads(threads)
    step = make_trainer(name, folder)
    gc.collect()
    base = rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM, the peak resident set, to now
    for _ in range(3):
        step(tokens)
    return (rss_kib("VmHWM") - base) / 1024


# -----------------------------------------------------------------------------
# measuring


def interleaved(contenders: dict, rounds: int, warmup: int) -> dict:
    """Run each contender once per round, in turn; the median seconds of the timed rounds."""
    times = {name: [] for name in contenders}
    for r in range(warmup + rounds):
        order = list(contenders.items())
        order = order[r % len(order):] + order[:r % len(order)]  # rotate, so no one always goes first
        for name, run in order:
            start = time.perf_counter()
            run()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
        print(f"  round {r + 1}/{warmup + rounds}", file=sys.stderr, flush=True)
    return {name: statistics.median(t) for name, t in times.items()}


def precision(folder: Path, ours: Transformer, tokens: torch.Tensor, rounds: int, warmup: int,
              loss_steps: int = 10) -> str:
    """A training step and a forward with the base in bfloat16 against float32, timed
    interleaved, and the loss of an Aligner trained loss_steps steps on the same batch in
    each, from the same initialisation (the Aligner and AdamW stay float32 in both)."""
    models = {"float32": ours, "bfloat16": load_ours(folder).to(torch.bfloat16)}
    aligner = Aligner(ours.args, n_tokens=10, start_layer=START_LAYER)
    torch.nn.init.normal_(aligner.gates, std=0.1)
    steps = {name: make_trainer("Aligner N=10", folder, model=m) for name, m in models.items()}
    runs = {f"step {name}": (lambda s=s: s(tokens)) for name, s in steps.items()}
    with torch.inference_mode():
        forwards = interleaved({name: (lambda m=m: m(tokens, aligner)) for name, m in models.items()},
                               rounds, warmup)
    seconds = interleaved(runs, rounds, warmup)

    losses = {}
    for name, model in models.items():
        torch.manual_seed(0)
        trained = Aligner(ours.args, n_tokens=10, start_layer=START_LAYER)
        optimizer = torch.optim.AdamW(trained.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        losses[name] = []
        for _ in range(loss_steps):
            loss = lm_loss(model(tokens, trained), tokens)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses[name].append(loss.item())
    rows = [[name, f"{seconds[f'step {name}'] * 1e3:.0f}", f"{seconds['step float32'] / seconds[f'step {name}']:.2f}x",
             f"{forwards[name] * 1e3:.0f}", f"{forwards['float32'] / forwards[name]:.2f}x",
             f"{losses[name][0]:.4f}", f"{losses[name][-1]:.4f}"] for name in models]
    return "\n".join([
        "### Precision: the base in bfloat16 against float32\n",
        f"An Aligner N=10 training step and a forward; then {loss_steps} AdamW steps on the batch from the same "
        "initialisation, the loss at the first and the last.\n",
        table(["base", "ms / step", "speed-up", "forward ms", "speed-up", "loss, step 1", f"loss, step {loss_steps}"],
              rows)])


class IdTokenizer:
    """What generate.generate asks of a tokenizer, for random weights: an EOS that is never sampled."""
    bos_id, eos_id = 1, -1

    def decode(self, ids):
        return ""


def table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def main(argv=None):
    parser = cli.ArgumentParser(description="Benchmark the Aligner against PEFT on transformers' LLaMA (CPU).")
    parser.add_argument("--steps", type=cli.positive_int, default=5, help="timed rounds per measurement (the median is shown)")
    parser.add_argument("--warmup", type=cli.non_negative_int, default=2, help="untimed rounds before them")
    parser.add_argument("--batch", type=cli.positive_int, default=8, help="sequences per training step and forward")
    parser.add_argument("--seq-len", type=cli.positive_int, default=256, help="tokens per sequence")
    parser.add_argument("--threads", type=cli.positive_int, default=torch.get_num_threads(), help="torch threads, the same for all")
    parser.add_argument("--compile", action="store_true",
                        help="add a training row with our forward under torch.compile (about 2 minutes more)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = []

    # --- weights, once, in Meta's layout -----------------------------------------
    workdir = tempfile.TemporaryDirectory(prefix="aligner-bench-")
    folder = Path(workdir.name) / "model"
    torch.manual_seed(0)
    model_args = ModelArgs(**CPU_MODEL, max_seq_len=512, max_batch_size=64)
    save(Transformer(model_args), folder)
    ours = load_ours(folder)
    model_args = ours.args
    tokens = torch.randint(3, model_args.vocab_size, (args.batch, args.seq_len))
    n_tokens = args.batch * args.seq_len
    theirs, have_peft = None, importlib.util.find_spec("peft") is not None
    if importlib.util.find_spec("transformers") is None:
        print("bench: transformers is not installed, so its rows and PEFT's are skipped "
              "(pip install -r bench/requirements.txt)", file=sys.stderr)
    else:
        theirs = load_theirs(folder)
    if theirs is not None and not have_peft:
        print("bench: peft is not installed, so the PEFT rows are skipped "
              "(pip install -r bench/requirements.txt)", file=sys.stderr)
    if theirs is not None:
        with torch.no_grad():
            a, b = ours(tokens[:2]), theirs(input_ids=tokens[:2]).logits
        err = (a - b).abs().max().item() / a.abs().max().item()
        if err > 1e-4:
            sys.exit(f"bench: transformers' logits differ from ours by {err:.2e} (relative); the weight conversion in bench/hf.py is wrong")
        print(f"transformers' logits match ours (largest difference {err:.1e} of the largest logit)", file=sys.stderr)
    out.append(f"Model: dim {model_args.dim}, {model_args.n_layers} layers, {model_args.n_heads} heads, "
               f"vocab {model_args.vocab_size}; batch {args.batch} x {args.seq_len} tokens; float32; "
               f"{args.threads} threads; torch {torch.__version__}; adapters on layers {START_LAYER}-{model_args.n_layers - 1}; "
               f"median of {args.steps} rounds after {args.warmup} warm-up rounds.\n")

    # --- training step: speed, and the matrix-product limit ----------------------
    print("training steps", file=sys.stderr)
    wanted = {"ours", "lora", "compiled"} if args.compile else {"ours", "lora"}
    names = [n for n in TRAINERS if TRAINERS[n][0] in wanted or (TRAINERS[n][0] == "peft" and theirs is not None
                                                                  and have_peft)]
    steps = {name: make_trainer(name, folder, model=ours if TRAINERS[name][0] != "peft" else None) for name in names}
    limit = MatmulLimit(model_args, n_tokens, START_LAYER)
    runs = {name: (lambda s=step: s(tokens)) for name, step in steps.items()}
    runs["matmul"] = limit.step
    seconds = interleaved(runs, args.steps, args.warmup)
    del steps, runs
    gc.collect()

    # --- training step: peak memory, each contender alone in a fresh process ------
    print("peak memory", file=sys.stderr)
    memory = {}
    for name in names:
        if TRAINERS[name][0] == "compiled":
            continue  # compiling inside the measured steps would count the compiler's own memory
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            memory[name] = pool.submit(peak_training_memory, name, folder, tokens, args.threads).result()

    ref_name = "Aligner N=10"
    rows = []
    for name in names:
        speed = n_tokens / seconds[name]
        mem = memory.get(name)
        rows.append([name, f"{seconds[name] * 1e3:.0f}", f"{speed:.0f}", f"{seconds[name] / seconds[ref_name]:.2f}x",
                     "-" if mem is None else f"{mem:.0f}", "-" if mem is None else f"{mem / memory[ref_name]:.2f}x"])
    out.append("### Training step (forward + backward + AdamW)\n")
    out.append(table(["contender", "ms / step", "tokens / s", "Aligner N=10 is faster by",
                      "peak memory (MiB)", "vs Aligner N=10"], rows))
    flops = train_step_flops(model_args, args.batch, args.seq_len, START_LAYER)
    rate = limit.rate()
    rows = [[name, f"{flops / seconds[name] / 1e9:.0f}", f"{rate / 1e9:.0f}", f"{flops / seconds[name] / rate:.0%}"]
            for name in names if TRAINERS[name][0] in ("ours", "compiled")]  # the count is the Aligner's step
    out.append("\n### Training step against the machine's matrix-product rate\n")
    out.append(f"{flops / 1e9:.0f} GFLOP per step (bench/run.py, train_step_flops).\n")
    out.append(table(["contender", "achieved GFLOP/s", "plain matmul GFLOP/s, same shapes", "utilisation"], rows))

    # --- forward overhead of the Aligner over the bare base ---------------------
    print("forward passes", file=sys.stderr)
    aligners = {n: Aligner(model_args, n_tokens=n, start_layer=START_LAYER) for n in (1, 10, 100)}
    for a in aligners.values():
        torch.nn.init.normal_(a.gates, std=0.1)  # non-zero gates, as after training
    forwards = {"base model": lambda: ours(tokens)}
    forwards.update({f"Aligner N={n}": (lambda a=a: ours(tokens, a)) for n, a in aligners.items()})
    if theirs is not None:
        forwards["transformers LLaMA (base)"] = lambda: theirs(input_ids=tokens, use_cache=False).logits
    with torch.inference_mode():  # twice the rounds: the differences sought here are a few percent
        seconds = interleaved(forwards, 2 * args.steps, args.warmup)
    base = seconds["base model"]
    rows = [[name, f"{s * 1e3:.0f}", f"{n_tokens / s:.0f}", f"{s / base - 1:+.1%}"] for name, s in seconds.items()]
    out.append("\n### Forward pass (no gradients)\n")
    out.append(table(["model", "ms", "tokens / s", "time over the base model"], rows))

    # --- precision: the same Aligner step with the base in bfloat16 ----------------
    print("precision", file=sys.stderr)
    out.append("\n" + precision(folder, ours, tokens, args.steps, args.warmup))

    # --- decoding ---------------------------------------------------------------
    print("decoding", file=sys.stderr)
    try:
        from generate import generate
    except ImportError:
        generate = None
        print("bench: generate.py is not there yet; the decode rows are skipped", file=sys.stderr)
    rows = []
    if generate is not None:
        tokenizer = IdTokenizer()
        aligner = aligners[1]
        if theirs is not None:
            theirs.generation_config.eos_token_id = None  # make every token, as ours does
            theirs.generation_config.pad_token_id = 0
        # Each decode step reads every weight once (the embedding table only by row):
        # at small batches that, not arithmetic, bounds the speed.
        weight_bytes = sum(p.nbytes for name, p in ours.named_parameters() if not name.startswith("tok_"))
        bandwidth = read_bandwidth()
        for batch in (1, 16):
            prompts = torch.randint(3, model_args.vocab_size, (batch, DECODE_PROMPT))
            runs = {"ours": lambda p=prompts: generate(ours, tokenizer, p.tolist(), aligner,
                                                       max_new_tokens=DECODE_NEW),
                    "ours, base model": lambda p=prompts: generate(ours, tokenizer, p.tolist(),
                                                                   max_new_tokens=DECODE_NEW)}
            if theirs is not None:
                runs["transformers"] = lambda p=prompts: theirs.generate(
                    input_ids=p, attention_mask=torch.ones_like(p), max_new_tokens=DECODE_NEW,
                    do_sample=False)
            with torch.inference_mode():
                seconds = interleaved(runs, args.steps, 1)
            made = batch * DECODE_NEW
            ref = seconds["ours"]
            rows.append([batch, "Aligner N=1 (generate.py)", f"{made / ref:.0f}", "1.00x"])
            rows.append([batch, "base model (generate.py)", f"{made / seconds['ours, base model']:.0f}",
                         f"{seconds['ours, base model'] / ref:.2f}x"])
            if theirs is not None:
                rows.append([batch, "transformers generate (base)", f"{made / seconds['transformers']:.0f}",
                             f"{seconds['transformers'] / ref:.2f}x"])
            limit_speed = batch * bandwidth / weight_bytes
            rows.append([batch, "limit: the weights read once per step", f"{limit_speed:.0f}",
                         f"{made / ref / limit_speed:.0%} of it"])
        out.append(f"\n### Decoding: {DECODE_PROMPT}-token prompts, {DECODE_NEW} new tokens, greedy\n")
        out.append(f"The limit row: {weight_bytes / 2**20:.0f} MiB of weights at the measured read bandwidth, "
                   f"{bandwidth / 1e9:.1f} GB/s.\n")
        out.append(table(["batch", "decoder", "tokens / s", "Aligner N=1 is faster by"], rows))

    print("\n".join(out))
    workdir.cleanup()


if __name__ == "__main__":
    cli.run(main)
