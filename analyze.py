"""
What trained Aligners learned, measured as the paper measures it, and what they cost (Table 1).

    python analyze.py gates A.pth B.pth ...                   # gate std and mean per layer, per head; the trend
    python analyze.py gates A.pth B.pth --json gates.json --plots figs   # the same as JSON; Figs. 7-11 as PNG
    python analyze.py compare alpaca.pth metamath.pth         # prefix values exactly equal, and the differences
    python analyze.py compare A.pth B.pth C.pth --plots figs  # ... and a t-SNE of all their prefix tokens, Fig. 16
    python analyze.py params                                  # Table 1's counts for LLaMA-2-7B
    python analyze.py params --ckpt llama-2-13b               # ... for another base

Any Aligner or LLaMA-Adapter file goes: this project's, the paper's authors' released Aligners and
lit-llama's Adapters, all read by support.formats.read_aligner without the base model.

Reference: Zhou, Wu, Zhu, Terzopoulos, "Aligner: One Global Token is Worth Millions of Parameters
When Aligning Large Language Models", arXiv 2312.05503.
- `gates`: Section 4.4 and Appendix D.1. For each file, the gates beta (adapted layers x heads):
  the standard deviation and mean over the heads of each layer (Figs. 6a, 7, 8), over the layers
  of each head position (Figs. 9, 10), and all of them (Fig. 11). The paper's one consistent
  pattern is that "the standard deviation of gating factors in a layer is increasing as layer goes
  from bottom to top"; it shows it as curves. Here it is a number too: the mean of the per-layer
  std over the bottom third of the adapted layers and over the top third, their ratio, and
  Spearman's rank correlation between layer index and std.
- `compare`: Section 4.4 and Appendix D.2. "Out of 4096 numbers in Aligner 1 Token embedding, there
  are 2408 numbers exactly the same" between the Aligners trained on Alpaca and on MetaMath, and
  for the LLaMA-Adapters "on average 2502.16 numbers that are the same for every token ... with
  standard deviation of 310.4, ranging from 1342 to 3321"; Fig. 16 is the histogram of the
  absolute differences, Figs. 6b and 12-15 t-SNE maps of the prefix tokens. In the authors'
  files the equal values are their runs' common starting draw, which bf16 steps left unmoved
  (aligner.authors_prefix; docs/analysis.md, "Why values are exactly equal").
- `params`: Table 1, the parameters of each method for LLaMA-2-7B and how many adapters fit in a
  24 GB GPU beside the base model; LoRA (lora.py) at r = 8 and at Appendix C's r = 4.
  `gates` and `compare` refuse a LoRA file: it has neither gates nor prefix tokens.

Our choices where the paper says nothing:
- std is the population standard deviation (numpy's default, ddof 0). The trend's ratio and
  Spearman's rho are the same under either choice, since all layers have the same number of heads.
- The bottom and top thirds are the first and last n // 3 of the n adapted layers (at least one
  each), so the middle third takes the remainder. With a single adapted layer there is no trend.
- What `compare` compares is defined at `compare` below; its summary is printed with the table.
- The plots (optional: matplotlib, and scikit-learn for the t-SNE; requirements-analysis.txt)
  overlay all the given files in one figure each, where the paper puts Alpaca and MetaMath side
  by side.
"""

import support.startup  # noqa: F401  first: Ctrl-C while torch loads ends in one line too (startup.py)

import argparse
import importlib
import itertools
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch

import lora
from aligner import Aligner
from llama import ModelArgs, Transformer
from prompt_tuning import PromptTuning
from support import cli
from support.files import (atomic_text, atomic_write, check_writable, refuse_clashes, refuse_existing,
                           short_names)
from support.formats import Tokenizer, checkpoint_inputs, find_tokenizer, hf, is_lora, read_aligner, read_params

INSTALL = "pip install -r requirements-analysis.txt"
CHUNK = 1 << 24  # values of differences held at a time when every token pair is compared (64 MB in float32)


# -----------------------------------------------------------------------------
# the files

class Loaded(NamedTuple):
    label: str  # "[1]", "[2]", ...: how the tables name the file
    path: Path
    aligner: Aligner
    name: str = ""  # how legends and trend lines name it: 'sft10-best' for runs/sft10/best.pt (files.short_names)


def read_files(paths) -> list:
    """Each file through formats.read_aligner, which names the file in its error when it is no Aligner.
    A LoRA (lora.py) has neither gates nor prefix tokens: refused."""
    for p in paths:
        if is_lora(p):
            raise ValueError(f"{p}: a LoRA, which has no gates or prefix tokens to analyze; gates and compare "
                             "read Aligners and LLaMA-Adapters")
    names = short_names([str(p) for p in paths], alone=())
    return [Loaded(f"[{i}]", Path(p), read_aligner(p), name) for i, (p, name) in enumerate(zip(paths, names), 1)]


def short_name(f: Loaded) -> str:
    return f.name or f.path.stem


def file_list(files) -> str:
    return "\n".join(f"  {f.label} {f.path}  ({f.aligner.describe()})" for f in files)


def table(header: list, rows: list, left: int = 1) -> str:
    """Plain text columns: the first `left` aligned left (names), the others right (numbers)."""
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in cells).replace(" \n", "\n").rstrip()


def num(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.4g}"


def fixed(x: float) -> str:
    """Gates (about 0.01 to 0.5 in trained files) with their decimal points aligned in a column."""
    return f"{x:.6f}"


# -----------------------------------------------------------------------------
# the gates (Appendix D.1; Figs. 6a, 7-11)

@dataclass
class GateStats:
    layers: list  # the model's index of each adapted layer: start_layer, ..., n_layers - 1
    layer_std: list  # per adapted layer, over its heads (Figs. 6a, 7)
    layer_mean: list  # (Fig. 8)
    head_std: list  # per head position, over the adapted layers (Fig. 9)
    head_mean: list  # (Fig. 10)


def gate_stats(gates: np.ndarray, start_layer: int) -> GateStats:
    """The paper's four views of the gates (n_adapted, n_heads), in float64."""
    return GateStats(layers=list(range(start_layer, start_layer + gates.shape[0])),
                     layer_std=gates.std(axis=1).tolist(), layer_mean=gates.mean(axis=1).tolist(),
                     head_std=gates.std(axis=0).tolist(), head_mean=gates.mean(axis=0).tolist())


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of the values of x; tied values share the mean of the ranks they span."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    _, group, count = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(group, weights=ranks) / count)[group]


def spearman(x, y) -> Optional[float]:
    """Spearman's rank correlation: Pearson's correlation of the (tie-averaged) ranks. None where
    it is undefined: fewer than two values, or all of x or all of y the same."""
    rx, ry = average_ranks(np.asarray(x, dtype=float)), average_ranks(np.asarray(y, dtype=float))
    dx, dy = rx - rx.mean(), ry - ry.mean()
    norm = np.sqrt((dx * dx).sum() * (dy * dy).sum())
    return None if len(rx) < 2 or norm == 0 else float((dx * dy).sum() / norm)


@dataclass
class Trend:
    bottom_layers: list  # [first, last] model layer index of the bottom third
    top_layers: list
    bottom_std: float  # the mean of the per-layer std over the bottom third
    top_std: float
    ratio: Optional[float]  # top_std / bottom_std; None where bottom_std is 0
    spearman: Optional[float]  # between layer index and per-layer std
    rises: bool  # top_std > bottom_std


def layer_trend(layers: list, layer_std: list) -> Optional[Trend]:
    """How the per-layer gate std changes from the bottom third of the adapted layers to the top
    third; None with a single adapted layer."""
    n = len(layers)
    if n < 2:
        return None
    third = max(1, n // 3)
    bottom, top = float(np.mean(layer_std[:third])), float(np.mean(layer_std[-third:]))
    return Trend(bottom_layers=[layers[0], layers[third - 1]], top_layers=[layers[-third], layers[-1]],
                 bottom_std=bottom, top_std=top, ratio=top / bottom if bottom > 0 else None,
                 spearman=spearman(layers, layer_std), rises=top > bottom)


def trend_line(f: Loaded, trend: Optional[Trend]) -> str:
    """The one summary line of a file: whether its gate std rises from the bottom third to the top third."""
    if trend is None:
        return f"{f.label} one adapted layer only: no trend ({short_name(f)})"
    def span(first, last):
        return f"layer {first}" if first == last else f"layers {first}-{last}"

    verdict = "rises" if trend.rises else "does not rise"
    rho = "-" if trend.spearman is None else f"{trend.spearman:.3f}"
    return (f"{f.label} gate std {verdict} from the bottom third ({span(*trend.bottom_layers)}, mean std "
            f"{trend.bottom_std:.4f}) to the top third ({span(*trend.top_layers)}, {trend.top_std:.4f}): "
            f"ratio {num(trend.ratio)}, Spearman {rho}   {short_name(f)}")


def gates_report(files) -> tuple:
    """(text, figures for --json) of the gates of every file."""
    parts, figures, trends = [f"files\n{file_list(files)}"], [], []
    for f in files:
        gates = f.aligner.gates.detach().double().numpy()  # (n_adapted, n_heads)
        stats = gate_stats(gates, f.aligner.start_layer)
        trend = layer_trend(stats.layers, stats.layer_std)
        trends.append(trend)
        figures.append({"path": str(f.path), "kind": f.aligner.kind, "n_tokens": f.aligner.n_tokens,
                        "start_layer": f.aligner.start_layer, **asdict(stats), "gates": gates.tolist(),
                        "trend": None if trend is None else asdict(trend)})
        by_layer = table(["layer", "std", "mean"], [[layer, fixed(s), fixed(m)] for layer, s, m in
                                                    zip(stats.layers, stats.layer_std, stats.layer_mean)])
        by_head = table(["head", "std", "mean"], [[h, fixed(s), fixed(m)] for h, (s, m) in
                                                  enumerate(zip(stats.head_std, stats.head_mean))])
        parts.append(f"{f.label} {f.path}\n{f.aligner.describe()}\n\ngates per adapted layer, over its "
                     f"{gates.shape[1]} heads\n{by_layer}\n\ngates per head position, over the "
                     f"{gates.shape[0]} adapted layers\n{by_head}")
    rising = sum(t is not None and t.rises for t in trends)
    summary = "\n".join(trend_line(f, t) for f, t in zip(files, trends))
    parts.append(f"the layer trend (the mean of the per-layer std over the bottom and top thirds of the adapted "
                 f"layers; Spearman's rho between layer and std)\n{summary}\n"
                 f"the gate std rises in {rising} of {cli.plural(len(files), 'file')}")
    return "\n\n".join(parts), figures


# -----------------------------------------------------------------------------
# two prefixes side by side (Section 4.4, Appendix D.2, Fig. 16)

class CountStats(NamedTuple):
    """Mean, std (ddof 0), min and max of the exactly equal values per token comparison."""
    mean: float
    std: float
    min: int
    max: int


@dataclass
class Comparison:
    first: str  # labels, "[1]"
    second: str
    how: str  # "element by element", "every token pair", or why the two cannot be compared
    comparisons: int = 0  # token comparisons: corresponding tokens, or every pair
    values: int = 0  # numbers compared, dim in each token comparison
    equal: int = 0  # of them exactly equal
    max_abs: Optional[float] = None  # the largest absolute difference
    median_abs: Optional[float] = None  # the median absolute difference (the lower middle one, as torch.median)
    per_token: Optional[CountStats] = None  # the equal values of each token comparison


def tokens(aligner: Aligner) -> torch.Tensor:
    """The prefix as rows of dim values: (N, dim) for an Aligner, (n_adapted * N, dim) for a
    LLaMA-Adapter, layer by layer."""
    return aligner.prefix.detach().float().reshape(-1, aligner.prefix.shape[-1])


def count_stats(counts: torch.Tensor) -> CountStats:
    c = counts.double()
    return CountStats(c.mean().item(), c.std(correction=0).item(), int(counts.min()), int(counts.max()))


def compare(a: Loaded, b: Loaded) -> Comparison:
    """What `compare` reports for two files. Exactly equal means equal as float32 numbers (the
    authors' bf16 values convert exactly).

    - Same prefix shape (two one-token Aligners, two Adapters of one shape): element by element,
      value i of one against value i of the other; per token, each token against the token in the
      same place (the same layer and position for an Adapter). This is our reading of Appendix D.2's
      per-token figures for two LLaMA-Adapters (mean 2502.16, std 310.4, range 1342 to 3321); the
      paper does not say which tokens it paired.
    - Different shapes of one width (a one-token Aligner against ten tokens, or against an
      Adapter's tokens of every layer): every token of the first against every token of the
      second, value i against value i; the counts per pair and the differences of all pairs.
    - Different widths (a 7B file against a 13B one): nothing to compare.
    """
    ta, tb = tokens(a.aligner), tokens(b.aligner)
    if ta.shape[1] != tb.shape[1]:
        return Comparison(a.label, b.label, f"not comparable: widths {ta.shape[1]} and {tb.shape[1]}")
    if a.aligner.prefix.shape == b.aligner.prefix.shape:
        diff = (ta - tb).abs()  # (T, dim)
        per_token = (ta == tb).sum(dim=1)  # (T,)
        return Comparison(a.label, b.label, "element by element", len(ta), ta.numel(), int(per_token.sum()),
                          diff.max().item(), diff.flatten().median().item(), count_stats(per_token))
    return compare_token_pairs(a.label, b.label, ta, tb)


def pair_blocks(ta: torch.Tensor, tb: torch.Tensor):
    """Every pair of rows of ta (Ta, dim) and tb (Tb, dim), a few rows of ta at a time:
    (those rows of ta, |ta[i] - tb[j]| of shape (rows, Tb, dim))."""
    for block in ta.split(max(1, CHUNK // tb.numel())):
        yield block, (block[:, None, :] - tb[None, :, :]).abs()  # (rows, 1, dim) - (1, Tb, dim) -> (rows, Tb, dim)


def compare_token_pairs(first: str, second: str, ta: torch.Tensor, tb: torch.Tensor) -> Comparison:
    """Every token of ta (Ta, dim) against every token of tb (Tb, dim), without holding all
    Ta * Tb * dim differences at once."""
    counts, largest = [], 0.0
    for block, diff in pair_blocks(ta, tb):
        counts.append((block[:, None, :] == tb[None, :, :]).sum(dim=2).flatten())  # (rows * Tb,), row-major pairs
        largest = max(largest, diff.max().item())
    counts = torch.cat(counts)  # (Ta * Tb,)
    values = ta.shape[0] * tb.numel()
    median = streamed_median(lambda: (diff for _, diff in pair_blocks(ta, tb)), values)
    return Comparison(first, second, "every token pair", len(counts), values, int(counts.sum()), largest,
                      median, count_stats(counts))


def streamed_median(chunks, total: int) -> float:
    """The lower median of `total` non-negative float32 values that chunks() yields, the value
    torch.median would return, in two counting passes instead of a sort of all of them.

    Non-negative floats order as their bit patterns do as integers, so the median's upper 16 bits
    are found by counting the values per upper-16-bit pattern, and its lower 16 bits by counting,
    within that pattern, per lower-16-bit pattern."""
    k = (total - 1) // 2  # the rank (from 0) of the lower median
    high = torch.zeros(1 << 15, dtype=torch.int64)  # the sign bit is 0: 15 bits above the lower 16
    for chunk in chunks():
        high += torch.bincount(chunk.flatten().view(torch.int32) >> 16, minlength=1 << 15)
    cumulative = high.cumsum(0)
    top = int(torch.searchsorted(cumulative, k, right=True))
    below = int(cumulative[top - 1]) if top else 0
    low = torch.zeros(1 << 16, dtype=torch.int64)
    for chunk in chunks():
        bits = chunk.flatten().view(torch.int32)
        low += torch.bincount(bits[(bits >> 16) == top] & 0xFFFF, minlength=1 << 16)
    bottom = int(torch.searchsorted(low.cumsum(0), k - below, right=True))
    return torch.tensor([(top << 16) | bottom], dtype=torch.int32).view(torch.float32).item()


def compare_report(files) -> tuple:
    """(text, figures for --json) of every pair of files."""
    pairs = [compare(a, b) for a, b in itertools.combinations(files, 2)]
    rows = []
    for c in pairs:
        if c.per_token is None:
            rows.append([f"{c.first} {c.second}", c.how] + ["-"] * 9)
            continue
        s = c.per_token
        rows.append([f"{c.first} {c.second}", c.how, f"{c.comparisons:,}", f"{c.values:,}", f"{c.equal:,}",
                     f"{100 * c.equal / c.values:.1f}", num(c.max_abs), num(c.median_abs),
                     f"{s.mean:.2f}", f"{s.std:.2f}", f"{s.min:,}-{s.max:,}"])
    header = ["pair", "compared", "tokens", "values", "equal", "%", "max |diff|", "median |diff|",
              "equal/token", "std", "range"]
    shared = [f"{c.first} and {c.second} share {c.equal:,} of {c.values:,} prefix values exactly"
              for c in pairs if c.how == "element by element"]
    text = (f"files\n{file_list(files)}\n\n{table(header, rows, left=2)}\n\n"
            "element by element: two prefixes of one shape, value against value; tokens counts the\n"
            "  corresponding tokens (an Adapter's layer by layer). every token pair: prefixes of one width\n"
            "  but different shapes, each token of the first against each token of the second; tokens counts\n"
            "  the pairs. equal/token, std and range: the exactly equal values per token compared (std ddof 0).")
    if shared:
        text += "\n\n" + "\n".join(shared)
    return text, [{**asdict(c), "per_token": c.per_token and c.per_token._asdict()} for c in pairs]


# -----------------------------------------------------------------------------
# Table 1: parameters, and adapters per 24 GB GPU

# Meta's LLaMA-2-7B params.json, with the vocabulary of its tokenizer (params.json says -1)
LLAMA2_7B = dict(dim=4096, n_layers=32, n_heads=32, multiple_of=256, norm_eps=1e-5, vocab_size=32000)
START_LAYER = 2  # the paper's (Appendix A: "starting from Layer 2")
# LoRA as the authors ran it: lora_r = 8 (their finetune/lora.py, line 42; Appendix C: "the rank is commonly
# chosen to be 8"), on the query and value projections (their lit_llama/lora.py, line 434:
# enable_lora=[True, False, True]); and r = 4, the LoRA Appendix C meant to set beside the value
# experiment's 2-million-parameter Adapter ("We intended to compare with LoRA with rank 4")
LORA_RANK = 8
LORA_RANK_VALUE = 4
GPU_BYTES = 24 * 2**30  # a "24GB" card holds 24 GiB
BF16 = 2  # bytes per value: the base and the adapters served in bf16 (generate.py casts an Aligner to the base's dtype)
# Table 1 as printed. Its "4.19K" for Aligner 10 drops a digit: 10 x 4096 + 30 x 32 = 41,920 (Section 4.1: "42K").
PAPER_TABLE1 = {"Aligner, N = 1": ("5.06K", "1.25M"), "Aligner, N = 10": ("4.19K", "125K"),
                "LLaMA-Adapter, N = 10": ("1.23M", "4.17K"), f"LoRA, r = {LORA_RANK} on wq, wv": ("4.19M", "1.2K")}


class Method(NamedTuple):
    name: str
    params: int
    formula: str  # how the count comes about, in this shape's numbers
    fit: int  # how many fit in the GPU beside the base, all in bf16


def table1(args: ModelArgs) -> tuple:
    """(the base's parameter count, the methods of Table 1), from the model's shape alone: every
    module is built on the meta device, which has shapes and no data."""
    with torch.device("meta"):
        base = sum(p.numel() for p in Transformer(args).parameters())
        loras = {rank: lora.LoRA(args, rank=rank).num_params() for rank in (LORA_RANK, LORA_RANK_VALUE)}
        aligner = {(n, ls): Aligner(args, n_tokens=n, start_layer=START_LAYER, layer_specific=ls).num_params()
                   for n, ls in ((1, False), (10, False), (10, True))}
    free = GPU_BYTES - BF16 * base
    adapted, dim, heads = args.n_layers - START_LAYER, args.dim, args.n_heads
    wq, wv = dim, args.n_kv_heads * args.head_dim  # the output widths of wq and wv
    methods = [
        ("Aligner, N = 1", aligner[1, False], f"1 x {dim} + {adapted} x {heads}"),
        ("Aligner, N = 10", aligner[10, False], f"10 x {dim} + {adapted} x {heads}"),
        ("LLaMA-Adapter, N = 10", aligner[10, True], f"{adapted} x (10 x {dim} + {heads})"),
        *((f"LoRA, r = {rank} on wq, wv", count, f"{args.n_layers} x {rank} x ({dim} + {wq} + {dim} + {wv})")
          for rank, count in loras.items()),
        # not in Table 1: the input-only baseline of prompt_tuning.py, N soft tokens of width dim
        ("Prompt Tuning, N = 1", PromptTuning(args, 1).num_params(), f"1 x {dim}"),
        ("Prompt Tuning, N = 10", PromptTuning(args, 10).num_params(), f"10 x {dim}"),
    ]
    return base, [Method(name, n, formula, max(0, free // (BF16 * n))) for name, n, formula in methods]


def is_llama2_7b(args: ModelArgs) -> bool:
    """Whether the model has LLaMA-2-7B's shape, from Meta's params.json or Hugging Face's config.json."""
    def shape(a):
        return a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.vocab_size, a.ffn_dim
    return shape(args) == shape(ModelArgs(**LLAMA2_7B))


def params_report(args: ModelArgs, where: str) -> tuple:
    base, methods = table1(args)
    paper = is_llama2_7b(args)
    header = ["method", "count", "parameters", "fit in 24 GiB"] + ["Table 1", "Table 1 fit"] * paper
    rows = [[m.name, m.formula, f"{m.params:,}", f"{m.fit:,}"] + list(PAPER_TABLE1.get(m.name, ("–", "–"))) * paper
            for m in methods]
    free = GPU_BYTES - BF16 * base
    text = (f"Table 1 for {where}: dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads "
            f"({args.n_kv_heads} key/value), vocabulary {args.vocab_size:,}; adapters from layer {START_LAYER}\n\n"
            f"{table(header, rows, left=2)}\n\n"
            f"fit: (24 GiB - the base in bf16) / (the adapter in bf16), rounded down, nothing else counted\n"
            f"  = ({GPU_BYTES:,} - {BF16} x {base:,} bytes) / ({BF16} x parameters) = {free:,} / ({BF16} x parameters)")
    if paper:
        text += ("\n\nTable 1 prints 4.19K for Aligner 10, whose count is 41,920 (Section 4.1: \"42K\").\n"
                 "Its fit row differs from ours. It equals 5e9 / (4K, 40K, 1.2M, 4.19M) = 1.25M, 125K, 4.17K and\n"
                 "1.19K (printed 1.2K): 10 GB (24 GB less 14 GB for 7B parameters in bf16) at 2 bytes a parameter,\n"
                 "over counts rounded down, the Aligners' and the Adapter's without their gates (N x 4,096 as N x 4K,\n"
                 "30 x 10 x 4,096 = 1,228,800 as 1.2M) and LoRA's 4,194,304 as 4.19M. This is our reading; the paper\n"
                 "does not state its rule.")
    figures = {"shape": args.params(), "base_params": base, "gpu_bytes": GPU_BYTES, "bytes_per_param": BF16,
               "methods": [m._asdict() for m in methods]}
    return text, figures


def shape_from(ckpt: Optional[str], params_file: Optional[str]) -> tuple:
    """(ModelArgs, a few words naming it) from --ckpt or --params; LLaMA-2-7B's without either. A
    vocab_size of -1 (Meta's params.json) is read from the tokenizer in the folder or beside it."""
    if ckpt is None and params_file is None:
        return ModelArgs(**LLAMA2_7B), "LLaMA-2-7B"
    if ckpt is not None:
        folder = Path(ckpt)
        if not folder.is_dir():
            raise FileNotFoundError(f"--ckpt {ckpt}: no checkpoint folder here")
        if hf.is_hf_folder(folder):
            return ModelArgs(**hf.read_config(folder / "config.json")), str(folder)
    else:
        path = Path(params_file)
        if path.name != "params.json":
            raise ValueError(f"--params {params_file}: give the params.json of a Meta checkpoint "
                             "(or its folder with --ckpt)")
        if not path.is_file():
            raise FileNotFoundError(f"--params {params_file}: no such file")
        folder = path.parent
    params = read_params(folder)
    if params.get("vocab_size", -1) == -1:
        params["vocab_size"] = Tokenizer(find_tokenizer(folder)).n_words
    return ModelArgs(**params), str(folder / "params.json")


# -----------------------------------------------------------------------------
# pictures (optional: matplotlib; scikit-learn for the t-SNE)

CURVES = {  # file name: (the paper's figure, the x axis, the GateStats field drawn, the y label)
    "fig07-gate-std-per-layer.png": ("Fig. 7", "layers", "layer_std", "std of the gates over the heads"),
    "fig08-gate-mean-per-layer.png": ("Fig. 8", "layers", "layer_mean", "mean of the gates over the heads"),
    "fig09-gate-std-per-head.png": ("Fig. 9", "heads", "head_std", "std of the gates over the layers"),
    "fig10-gate-mean-per-head.png": ("Fig. 10", "heads", "head_mean", "mean of the gates over the layers"),
}
ALL_GATES = "fig11-all-gates.png"
HISTOGRAM = "fig16-abs-diff.png"


def optional_module(name: str):
    """The module, or None where it is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def pyplot():
    """matplotlib.pyplot drawing to files (no display needed), or None without matplotlib."""
    matplotlib = optional_module("matplotlib")
    if matplotlib is None:
        return None
    matplotlib.use("Agg")
    return optional_module("matplotlib.pyplot")


def skipped(what: str, package: str):
    print(f"analyze.py: skipped {what}: {package} is not installed ({INSTALL})", file=sys.stderr)


def legend_name(f: Loaded) -> str:
    name = short_name(f)
    return f"{f.label} {name if len(name) <= 48 else name[:45] + '...'}"


def save_png(plt, fig, path: Path) -> Path:
    atomic_write(path, lambda out: fig.savefig(out, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    print(f"wrote {path}")
    return path


def new_axes(plt, title: str, xlabel: str, ylabel: str):
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def draw_gates(plt, files, figures, folder: Path):
    """Figs. 7-10, a curve per file in each, and Fig. 11, a panel per file."""
    for name, (paper, x, field, ylabel) in CURVES.items():
        fig, ax = new_axes(plt, f"{ylabel} ({paper} of the Aligner paper)",
                           "layer" if x == "layers" else "head position", ylabel)
        for f, stats in zip(files, figures):
            xs = stats["layers"] if x == "layers" else range(len(stats[field]))
            ax.plot(xs, stats[field], marker="o", markersize=3, label=legend_name(f))
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
        save_png(plt, fig, folder / name)
    fig, axes = plt.subplots(len(files), 1, figsize=(8, 0.5 + 1.7 * len(files)), squeeze=False,
                             layout="constrained")
    for ax, f, stats in zip(axes[:, 0], files, figures):
        gates = np.asarray(stats["gates"])  # (n_adapted, n_heads), drawn layer by layer, head by head
        ax.plot(stats["start_layer"] + np.arange(gates.size) / gates.shape[1], gates.flatten(), linewidth=0.7)
        ax.set_title(legend_name(f), fontsize=8, loc="left")
        ax.grid(alpha=0.3)
    fig.suptitle("all gates, layer by layer and head by head within a layer (Fig. 11 of the Aligner paper)",
                 fontsize=10)
    axes[-1, 0].set_xlabel("layer (its heads spread over the unit that follows)")
    save_png(plt, fig, folder / ALL_GATES)


def tsne_groups(files) -> dict:
    """The files by prefix width, for one t-SNE map per width: {file name of the map: files}."""
    groups = {}
    for f in files:
        groups.setdefault(f.aligner.prefix.shape[-1], []).append(f)
    return {f"tsne-dim{width}.png": group for width, group in groups.items()}


def draw_tsne(plt, manifold, files, path: Path):
    """Figs. 6b, 12-15: every prefix token of every file in one t-SNE map, drawn in the order given."""
    points = torch.cat([tokens(f.aligner) for f in files]).numpy()
    n = len(points)
    if n < 4:
        print(f"analyze.py: skipped {path.name}: {cli.plural(n, 'token')} in all, too few for a t-SNE map",
              file=sys.stderr)
        return
    # perplexity must stay below the number of points; 30 is scikit-learn's default
    embedded = manifold.TSNE(n_components=2, perplexity=min(30.0, (n - 1) / 3), init="pca",
                             random_state=0).fit_transform(points)
    fig, ax = new_axes(plt, f"t-SNE of the prefix tokens ({n} tokens of width {points.shape[1]})", "", "")
    start = 0
    for f in files:
        count = len(tokens(f.aligner))
        ax.scatter(*embedded[start:start + count].T, s=40 if count <= 10 else 8, label=legend_name(f))
        start += count
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    save_png(plt, fig, path)


def draw_histogram(plt, files, path: Path):
    """Fig. 16: the absolute differences of each pair of files of one prefix shape."""
    fig, ax = new_axes(plt, "absolute difference of two prefixes, element by element (Fig. 16)",
                       "|difference|", "values")
    diffs = {f"{a.label} {b.label}": (tokens(a.aligner) - tokens(b.aligner)).abs().flatten().numpy()
             for a, b in itertools.combinations(files, 2) if a.aligner.prefix.shape == b.aligner.prefix.shape}
    bins = np.linspace(0, max(d.max() for d in diffs.values()) or 1, 101)  # the same bins for every pair
    for label, diff in diffs.items():
        ax.hist(diff, bins=bins, histtype="step", label=label)
    ax.legend(fontsize=7)
    save_png(plt, fig, path)


def same_shape_pairs(files) -> bool:
    return any(a.aligner.prefix.shape == b.aligner.prefix.shape for a, b in itertools.combinations(files, 2))


def plot_names(command: str, files) -> list:
    if command == "gates":
        return [*CURVES, ALL_GATES]
    return list(tsne_groups(files)) + [HISTOGRAM] * same_shape_pairs(files)


def draw(command: str, files, figures, folder: Path):
    """The figures of `command` into folder, as far as the installed packages allow; a line on
    stderr for each thing skipped."""
    plt = pyplot()
    if plt is None:
        skipped(f"the plots for --plots {folder}", "matplotlib")
        return
    folder.mkdir(parents=True, exist_ok=True)
    if command == "gates":
        draw_gates(plt, files, figures, folder)
        return
    manifold = optional_module("sklearn.manifold")
    if manifold is None:
        skipped("the t-SNE maps", "scikit-learn")
    else:
        for name, group in tsne_groups(files).items():
            draw_tsne(plt, manifold, group, folder / name)
    if same_shape_pairs(files):
        draw_histogram(plt, files, folder / HISTOGRAM)


# -----------------------------------------------------------------------------
# the command line

def make_parser():
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{gates,compare,params}")

    def outputs(sub, plots: Optional[str] = None):
        sub.add_argument("--json", metavar="OUT", help="also write every figure to this JSON file")
        if plots:
            sub.add_argument("--plots", metavar="DIR", help=f"draw {plots} as PNG files into DIR ({INSTALL})")
        sub.add_argument("--overwrite", action="store_true",
                         help="replace files already at --json" + " or in --plots" * bool(plots))
        sub.add_argument("--debug", action="store_true", help="on an error, show Python's traceback")

    gates = commands.add_parser("gates", help="gate std and mean per layer and per head; the layer trend")
    gates.add_argument("files", nargs="+", metavar="FILE", help="Aligner or LLaMA-Adapter files")
    outputs(gates, "Figs. 7-11 (needs matplotlib)")
    compare_ = commands.add_parser("compare", help="exactly equal prefix values and differences, for each pair")
    compare_.add_argument("files", nargs="+", metavar="FILE", help="two or more Aligner or LLaMA-Adapter files")
    outputs(compare_, "a t-SNE map of all the prefix tokens (Figs. 6b, 12-15; needs matplotlib and "
                      "scikit-learn) and the histogram of Fig. 16 (needs matplotlib)")
    params = commands.add_parser("params", help="Table 1: parameters, and adapters per 24 GB GPU")
    where = params.add_mutually_exclusive_group()
    where.add_argument("--ckpt", help="the base's checkpoint folder (Meta's or Hugging Face's layout; "
                                      "only its settings are read) (default: LLaMA-2-7B's shape)")
    where.add_argument("--params", metavar="params.json", help="a Meta params.json")
    outputs(params)
    return parser


def check_outputs(args, files):
    """Refuse, before anything is written, a --json or --plots that would fail, replace one of the
    inputs, or replace a file unasked."""
    if args.json:
        check_writable(args.json, "--json", folder=False)
    plots = getattr(args, "plots", None)
    if plots:
        check_writable(plots, "--plots")
    if args.command == "params":
        inputs = checkpoint_inputs(args.ckpt) if args.ckpt else [("--params", args.params)] * bool(args.params)
    else:
        inputs = [("input", f.path) for f in files]
    outputs = [("--json", args.json)] * bool(args.json)
    outputs += [("--plots", Path(plots) / name) for name in plot_names(args.command, files)] if plots else []
    refuse_clashes(inputs, outputs)
    if not args.overwrite:
        if args.json:
            refuse_existing([args.json], "--json")
        if plots:
            refuse_existing([Path(plots) / name for name in plot_names(args.command, files)], "--plots")


class Report(NamedTuple):
    """What a command found: the files it read (none for params), its text, its figures for --json."""
    files: list
    text: str
    figures: object


def read_and_analyze(args) -> Report:
    """Read the command's inputs, check its outputs before anything is written, and analyse."""
    if args.command == "compare" and len(args.files) < 2:
        raise ValueError(f"compare needs two files or more, got one: {args.files[0]}")
    if args.command == "params":
        check_outputs(args, [])
        return Report([], *params_report(*shape_from(args.ckpt, args.params)))
    files = read_files(args.files)
    check_outputs(args, files)
    return Report(files, *(gates_report if args.command == "gates" else compare_report)(files))


def report(args, found: Report):
    """Print the text; write --json and draw --plots where asked."""
    print(found.text)
    if args.json:
        atomic_text(args.json, json.dumps(found.figures, indent=1) + "\n")
        print(f"wrote {args.json}")
    if getattr(args, "plots", None):
        draw(args.command, found.files, found.figures, Path(args.plots))


def main(argv=None):
    args = make_parser().parse_args(argv)
    report(args, read_and_analyze(args))


if __name__ == "__main__":
    cli.run(main)
