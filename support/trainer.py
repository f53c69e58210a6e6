"""
The training loop train_sft.py and train_dpo.py share.

The training loop that train_sft.py and train_dpo.py share: only the Aligner's
few thousand parameters train, the base model stays frozen. The baselines, a
LLaMA-Adapter or a LoRA (--lora), train through the same loop: wherever it says
the Aligner, read the module that trains, whose files are written by its own save.

What it does (Aligner, arXiv 2312.05503; each script's docstring says where its
defaults come from): AdamW with weight decay, a global batch reached by gradient
accumulation over micro-batches, linear warmup then cosine decay (ours) or the
authors' constant schedule, validation before training and after every epoch,
an Aligner file per epoch plus the best by validation loss. An epoch is one pass
over the training split, or with --epoch-size that many examples drawn with
replacement, as the authors' scripts draw them.

The Aligner trains in float32, or with --aligner-dtype bfloat16 in bf16 as the
authors' runs did (parameters and AdamW state); its files then hold the bf16
values as trained, which the readers widen to float32 without loss.

What a run leaves in --out: settings.json, metrics.jsonl (one line per
optimizer step and per validation), epoch-E.pt and best.pt (Aligner files),
state.pt (everything --resume needs: Aligner, optimizer, step, RNG). The data
order is a pure function of (seed, epoch), so the step number alone says where
in the data a resumed run continues, and a stopped and resumed run ends with
the same Aligner, bit for bit on CPU, as one that never stopped. Every file is
written atomically (write beside, then rename), and metrics.jsonl grows by one
whole line per write, so a kill at any moment leaves the last good checkpoint
whole and can cut only the metrics line being written, which --resume drops.
A kill -9 mid-write leaves the write's temporary file (.state.pt.<8 characters>)
beside it; the run removes those of its own files when it resumes or starts
again in that --out, and nothing else there. No input may be one of the run's
files (check_inputs_apart): the run would write over it.

A run is never destroyed unasked: into an --out that already holds one, a
script refuses unless --resume (continue it) or --overwrite (replace it). The
resumed run must be the same run: the same settings, and inputs (checkpoint,
data, initial Aligner) with the same content, wherever they now live
(files.fingerprint). --resume is the one way on from any stop: a run that
stopped before its first state.pt starts again from the beginning.

When a run stops, state.pt holds the last step it logged, and its last line
says which step that is: --max-steps saves where it stops; SIGINT (Ctrl-C) or
SIGTERM lets the step under way end and saves it; an error before a step's
update (a lost device or peer, a loss or gradient that is not finite) saves the
steps before it, and an update that leaves a parameter NaN, infinite or
exploded is undone first. Only SIGKILL, a second signal (which stops at once)
or an error while validating or writing files can leave state.pt behind the
log; --resume then drops the log's later lines.

Several processes (torchrun): each rank takes its share of every global batch;
the Aligner's gradients are all-reduced by hand after backward. (DDP would hook
the wrapped module's forward, and the Aligner's forward is never called: the
base model reads its parameters.) The loss of a global batch is normalised by
its total count of loss units (response tokens for SFT, pairs for DPO) before
backward, so summing the ranks' gradients gives the one-process gradient.
"""

import argparse
import copy
import fnmatch
import json
import math
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from tqdm import tqdm

from aligner import Aligner, authors_prefix
from support import cli
from support.data import DEMO_CKPT, DEMO_DATA, check_demo
from support.distributed import Dist, all_reduce_max, all_reduce_sum, load_sharded
from support.files import (FileError, append_line, atomic_save, atomic_text, bad_value, check_values,
                           check_writable, fingerprint, load_pt, read_text, refuse_clashes,
                           stray_temporaries)
from support.formats import checkpoint_inputs, find_tokenizer, load


# -----------------------------------------------------------------------------
# flags both scripts take; each script sets its run's defaults (its docstring says where each comes from)

def add_arguments(parser, *, n_tokens, lr, batch_size, epochs, warmup_epochs, max_seq_len, out, shape_from=None,
                  lora_note=""):
    """The flags both scripts take. shape_from: a flag naming an Aligner file that also sets
    --n-tokens and --start-layer (and --lora-rank, --lora-alpha); those then default to None (take
    the file's, or n_tokens, 2, 8 and 16 without one), and the script resolves them. lora_note:
    what --lora's --help adds, the defaults it changes (parse_args' lora_defaults)."""
    a = parser.add_argument
    if shape_from is None:
        a("--n-tokens", type=cli.positive_int, default=n_tokens, help="N, the number of Aligner tokens")
        a("--start-layer", type=cli.non_negative_int, default=2, help="the first layer that attends to the Aligner")
    else:
        a("--n-tokens", type=cli.positive_int, default=None,
          help=f"N, the number of Aligner tokens (default: {shape_from}'s, else {n_tokens})")
        a("--start-layer", type=cli.non_negative_int, default=None,
          help=f"the first layer that attends to the Aligner (default: {shape_from}'s, else 2)")
    a("--llama-adapter", action="store_true",
      help="train the paper's baseline, LLaMA-Adapter V1: a prefix of --n-tokens tokens in each adapted layer "
           "(lit-llama's adapter.py) instead of the Aligner's one shared prefix")
    a("--lora", action="store_true",
      help="train the paper's other baseline, LoRA (lora.py): a rank --lora-rank update of wq and wv in every "
           "layer, instead of an Aligner" + (f"; {lora_note}" if lora_note else ""))
    a("--lora-rank", type=cli.positive_int, default=8 if shape_from is None else None,
      help="r of --lora (Appendix C: 8; the value experiment's comparison, 4)"
           + (f" (default: {shape_from}'s, else 8)" if shape_from else ""))
    a("--lora-alpha", type=cli.positive_float, default=16.0 if shape_from is None else None,
      help="alpha of --lora: the update is scaled by alpha / r (the authors' finetune/lora.py, line 43: 16)"
           + (f" (default: {shape_from}'s, else 16)" if shape_from else ""))
    a("--lora-dropout", type=cli.dropout, default=0.05,
      help="dropout on the input of --lora's A path while training (the authors' finetune/lora.py, line 44)")
    a("--prefix-init", choices=("randn", "authors"), default="randn",
      help="the prefix's start: randn, N(0, 1) from torch's CPU generator seeded by --seed; authors, the "
           "draw all the authors' runs started from (seed 1337 on CUDA, reproduced on any device: "
           "aligner.authors_prefix), whatever --seed")
    a("--aligner-dtype", choices=("float32", "bfloat16"), default="float32",
      help="the Aligner's parameters and AdamW state; bfloat16 trains as the authors' runs did "
           "(bf16-true), where a step smaller than half a bf16 step is rounded away")
    a("--lr", type=cli.positive_float, default=lr, help="peak learning rate of AdamW")
    a("--weight-decay", type=cli.non_negative_float, default=0.02, help="AdamW's weight decay")
    a("--batch-size", type=cli.positive_int, default=batch_size,
      help="global batch: examples per optimizer step, all ranks together")
    a("--micro-batch-size", type=cli.positive_int, default=None,
      help="examples per forward on one rank; gradients accumulate up to --batch-size "
           "(default: 4096 // --max-seq-len on a GPU, the whole batch on CPU)")
    a("--epochs", type=cli.positive_int, default=epochs,
      help="passes over the training data (with --epoch-size, draws of that many examples)")
    a("--epoch-size", type=cli.positive_int, default=None,
      help="make an epoch this many examples drawn with replacement from the training split, each global "
           "batch drawn afresh, as the authors' finetune scripts draw them (their epoch_size); "
           "none: one pass, every example once")
    a("--warmup-epochs", type=cli.non_negative_float, default=warmup_epochs, help="linear warmup length, in epochs")
    a("--schedule", choices=tuple(SCHEDULES), default="cosine",
      help="after the warmup: cosine decay towards zero, or constant: the authors' finetune script, "
           "whose warmup starts from zero")
    a("--max-seq-len", type=cli.positive_int, default=max_seq_len,
      help="longer examples are cut to this many tokens (and counted); at most the checkpoint's context "
           "(see --beyond-context)")
    a("--val", type=cli.split_size, default="0.05",
      help="held-out validation split: a fraction (0.05) or a count (500)")
    a("--seed", type=cli.seed, default=0, help="seeds the Aligner's initialisation, the split and the data order")
    a("--grad-checkpointing", action="store_true",
      help="recompute activations in backward: less memory for long sequences")
    a("--out", type=cli.out_path, default=Path(out),
      help="folder for Aligner files, metrics.jsonl, settings.json and state.pt")
    a("--save-every", type=cli.positive_int, default=100,
      help="also save the resumable state every this many optimizer steps")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the run in --out from its state.pt")
    again.add_argument("--overwrite", action="store_true",
                       help="replace the run already in --out (its settings.json, metrics.jsonl, state.pt, "
                            "best.pt and epoch-*.pt; nothing else there)")
    a("--max-steps", type=cli.positive_int, default=None,
      help="stop (resumably) after this many optimizer steps in all, for tests; none: run every epoch")
    cli.add_common_flags(parser)


def make_parser(description: str, demo_defaults: dict, data_help: str):
    """The parser both training scripts begin with: --ckpt and --data, and a --help that says
    which defaults the built-in demo changes."""
    parser = cli.ArgumentParser(description=description, epilog=demo_note(demo_defaults))
    cli.add_checkpoint_flag(parser)
    parser.add_argument("--data", type=cli.path, default=None, help=data_help + "; none: the demo's")
    return parser


def demo_note(demo_defaults: dict) -> str:
    """The --help line that says which defaults the built-in demo changes, if it changes any."""
    if not demo_defaults:
        return "With no --ckpt (the built-in demo) the defaults are the same."
    flags = ", ".join(f"--{name.replace('_', '-')} {value}" for name, value in demo_defaults.items())
    return f"With no --ckpt (the built-in demo) the defaults are instead: {flags}."


def parse_args(parser, argv, demo_defaults: dict, demo_data: str, lora_defaults: dict = None):
    """Parse argv. With --lora, the defaults in lora_defaults replace the Aligner's. With no --ckpt,
    the run is on the built-in demo: its checkpoint, its file demo_data unless --data is given, and
    its own defaults, over which a flag given still wins. The device and dtype are settled here."""
    args = parser.parse_args(argv)
    if args.lora and args.llama_adapter:
        parser.error("--lora and --llama-adapter are two baselines; give one")
    if args.lora:
        for flag in given_flags(parser, argv, ("n_tokens", "start_layer")):
            parser.error(f"{flag} shapes an Aligner's prefix; a --lora run has none (its shape is --lora-rank)")
    if args.lora and lora_defaults:
        parser.set_defaults(**lora_defaults)
        args = parser.parse_args(argv)
    if args.ckpt is None:
        parser.set_defaults(**demo_defaults)
        args = parser.parse_args(argv)
        args.ckpt = str(DEMO_CKPT)
        check_demo(args.ckpt)
        if args.data is None:
            args.data = str(DEMO_DATA / demo_data)
            check_demo(args.data)
    elif args.data is None:
        parser.error("--data is required with --ckpt")
    baseline = ("LLaMA-Adapter" if args.llama_adapter else "LoRA" if args.lora
                else "Prompt Tuning" if getattr(args, "prompt_tuning", False) else None)
    if args.prefix_init == "authors" and baseline:
        parser.error(f"--prefix-init authors: the authors' draw is of the Aligner's one shared prefix; "
                     f"a {baseline} starts as its own module does")
    cli.place(args)
    return args


def given_flags(parser, argv, dests) -> list:
    """The flags of `dests` that the command line sets itself, not by their defaults."""
    unset = object()
    # argparse fills in a default only where the namespace it is handed lacks the name
    parsed = vars(parser.parse_args(argv, namespace=argparse.Namespace(**{dest: unset for dest in dests})))
    return [action.option_strings[0] for action in parser._actions
            if action.dest in dests and parsed[action.dest] is not unset]


def demo_line(ckpt, data, demo_data: str) -> str:
    """What a run on the built-in demo's model says it trains on: the demo, where the data is the
    demo's file `demo_data`; else the user's data on the demo's model."""
    if Path(data).resolve() == (DEMO_DATA / demo_data).resolve():
        return f"Training on the built-in demo ({ckpt}, {data})"
    return f"Training on {data}, with the built-in demo's model {ckpt} as the base (no --ckpt given)"


def new_aligner(args, model_args) -> Aligner:
    """A fresh Aligner (or LLaMA-Adapter) of the run's shape, its prefix started as --prefix-init
    says: N(0, 1) from torch's generator as the caller seeded it, or the authors' draw (widened to
    float32 unless --aligner-dtype bfloat16: the same values either way)."""
    aligner = Aligner(model_args, n_tokens=args.n_tokens, start_layer=args.start_layer,
                      layer_specific=args.llama_adapter)
    if args.prefix_init == "authors":
        with torch.no_grad():
            aligner.prefix.copy_(authors_prefix(args.n_tokens, model_args.dim))
    return aligner


def load_base(args, d: "Dist"):
    """The frozen base model and its tokenizer, on the device and in the dtype cli.place chose."""
    loader = load_sharded if d.fsdp else load
    model, tokenizer = loader(args.ckpt, device=d.device, dtype=getattr(torch, args.dtype),
                              tokenizer_path=args.tokenizer, max_seq_len=args.max_seq_len)
    if args.start_layer >= model.args.n_layers:
        raise ValueError(f"--start-layer {args.start_layer}: the model has {model.args.n_layers} layers, "
                         f"numbered 0 to {model.args.n_layers - 1}")
    model.grad_checkpointing = args.grad_checkpointing
    return model, tokenizer


def speaker(d: "Dist") -> Callable:
    """What a script says with: print on rank 0; nothing on the other ranks, which would repeat it."""
    return print if d.rank == 0 else (lambda *a, **k: None)


# -----------------------------------------------------------------------------
# micro-batches

def micro_batch_size(args, d: Dist) -> int:
    """--micro-batch-size, or its default: on a GPU memory bounds it (4096 tokens' worth: 8 examples
    of 512 for SFT, 4 pairs of 1024 for DPO); on CPU one big batch is fastest."""
    if args.micro_batch_size is not None:
        return args.micro_batch_size
    if d.device.type == "cuda":
        return max(1, 4096 // args.max_seq_len)
    return math.ceil(args.batch_size / d.world)


# -----------------------------------------------------------------------------
# the run in --out: what it is, so that it is never destroyed unasked and resumes only as itself

# Flags that say how to run this time, not what the run is: left out of settings.json.
NOT_SETTINGS = ("resume", "overwrite", "max_steps", "debug")
LORA_FLAGS = ("lora", "lora_rank", "lora_alpha", "lora_dropout")  # recorded in a --lora run only
# Settings a resumed run may change: where it runs, its speed and memory, not its result.
FREE = ("out", "device", "micro_batch_size", "save_every", "grad_checkpointing", "fsdp")
# Files and folders the run reads: compared on resume by their content (settings["inputs"]), not by path,
# so that a run whose folder or inputs moved still resumes.
INPUTS = ("ckpt", "tokenizer", "data", "init_aligner", "reference")
# Settings newer than some runs (and than some callers of train): the value a run lacking one ran with.
ADDED = {"prefix_init": "randn", "aligner_dtype": "float32"}


RUN_NAMES = ("settings.json", "metrics.jsonl", "state.pt", "best.pt")
EPOCH_FILES = "epoch-*.pt"


def run_files(out: Path) -> list:
    """The files of a run in `out`: what --overwrite removes, and all it removes."""
    if not out.is_dir():
        return []
    return sorted([out / n for n in RUN_NAMES if (out / n).exists()] + list(out.glob(EPOCH_FILES)))


def is_run_file(name: str) -> bool:
    return name in RUN_NAMES or fnmatch.fnmatchcase(name, EPOCH_FILES)


def check_inputs_apart(args, out: Path):
    """Refuse a --data, --init-aligner, --reference, --ckpt or --tokenizer that is one of the
    run's files in --out, which the run would write over (or --overwrite remove)."""
    inputs = checkpoint_inputs(getattr(args, "ckpt", None), getattr(args, "tokenizer", None))
    inputs += [(f"--{key.replace('_', '-')}", getattr(args, key)) for key in ("data", "init_aligner", "reference")
               if getattr(args, key, None) not in (None, "init", "base")]
    epochs = [out / f"epoch-{e}.pt" for e in range(getattr(args, "epochs", 0) + 1)]
    refuse_clashes(inputs, [("--out", path) for path in [out / n for n in RUN_NAMES] + epochs + run_files(out)])


def remove_strays(out: Path):
    """Remove the temporary files that a killed run left beside its files (files.stray_temporaries)."""
    strays = stray_temporaries(out, is_run_file)
    for path in strays:
        path.unlink()
    if strays:
        print(f"{out}: removed {cli.plural(len(strays), 'temporary file')} that a killed run left "
              f"({', '.join(p.name for p in strays)})")


def run_settings(args) -> dict:
    """What settings.json and state.pt record: every flag, and the content of every input. The LoRA
    flags only in a LoRA run, so that an Aligner run records what it did before they existed, and
    still resumes."""
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                if k not in NOT_SETTINGS and (getattr(args, "lora", False) or k not in LORA_FLAGS)}
    settings["inputs"] = {k: fingerprint(getattr(args, k), find_tokenizer) for k in INPUTS if hasattr(args, k)}
    return settings


def check_same_run(path, old: dict, new: dict):
    """Refuse to resume with settings or inputs that would change the result."""
    old, new = {**ADDED, **old}, {**ADDED, **new}
    keys = (old.keys() | new.keys()) - set(FREE) - set(INPUTS) - {"inputs"}
    changed = [f"--{k.replace('_', '-')} {old.get(k)} (now {new.get(k)})" for k in sorted(keys)
               if old.get(k) != new.get(k)]
    old_inputs, new_inputs = old.get("inputs", {}), new.get("inputs", {})
    changed += [f"--{k.replace('_', '-')}'s content" for k in sorted(old_inputs.keys() | new_inputs.keys())
                if old_inputs.get(k) != new_inputs.get(k)]
    if changed:
        raise ValueError(f"{path}: the run was started with other settings: {'; '.join(changed)}. "
                         "Resume it with the same flags and files, or start anew with --overwrite")


def read_state(path: Path) -> dict:
    """state.pt, checked: every key --resume needs, and an Aligner with usable values."""
    state = load_pt(path, "training state")
    needed = ("aligner", "optimizer", "step", "best", "last_val", "rng", "settings")
    missing = [k for k in needed if not isinstance(state, dict) or k not in state]
    if missing:
        raise FileError(f"{path}: not a training state (no {', '.join(missing)})")
    check_values(path, state["aligner"], "training state")
    return state


def open_run(args, settings: dict = None):
    """Check --data and --out before anything loads or is written; returns state.pt's contents
    under --resume, or None where the run starts from the beginning.

    A folder that already holds a run is refused unless --resume or --overwrite (whose old
    files start() removes first). --resume continues from state.pt, whose settings and inputs
    must match these. A run that stopped before its first save (a kill, Ctrl-C or an error
    during its first validation: settings.json and metrics.jsonl, no state.pt) has nothing to
    continue from, so --resume starts it again from the beginning, with the settings and
    inputs that settings.json records: --resume is the one way on from any stop.
    """
    data = getattr(args, "data", None)
    if data is not None and not Path(data).is_file():
        what = "a folder, not a file" if Path(data).is_dir() else "no such file"
        raise FileNotFoundError(f"--data {data}: {what}")
    out = Path(args.out)
    check_writable(out, "--out")
    check_inputs_apart(args, out)
    settings = settings or run_settings(args)
    existing = run_files(out)
    if args.resume:
        path = out / "state.pt"
        if path.is_file():
            state = read_state(path)
            check_same_run(path, state["settings"], settings)
            return state
        if not existing:
            raise FileNotFoundError(f"{path}: nothing to resume, no run was started in {out} "
                                    "(run without --resume to start one)")
        if (out / "settings.json").is_file():
            check_same_run(out / "settings.json", read_settings(out / "settings.json"), settings)
        return None
    if existing and not getattr(args, "overwrite", False):
        saved = "" if (out / "state.pt").is_file() else " that stopped before its first save"
        raise FileError(f"--out {out} already holds a run{saved} ({', '.join(p.name for p in existing)}); "
                        f"continue it with --resume{', which starts it from the beginning' if saved else ''}, "
                        "or replace it with --overwrite")
    return None


def read_settings(path: Path) -> dict:
    """settings.json of a run, as run_settings wrote it."""
    try:
        settings = json.loads(read_text(path, "run's settings"))
    except json.JSONDecodeError as e:
        raise FileError(f"{path}: not JSON ({e.msg}, line {e.lineno}); replace the run with --overwrite") from None
    if not isinstance(settings, dict):
        raise FileError(f"{path}: not a run's settings (a JSON object)")
    return settings


def trim_metrics(path: Path, step: int):
    """Keep metrics.jsonl's lines up to `step`, the step state.pt holds. A last line without
    its newline was cut by a kill while being written, and goes; so do lines past `step`."""
    if not path.is_file():
        atomic_text(path, "")
        return
    *complete, last = read_text(path, "metrics log").split("\n")
    keep = []
    for number, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise FileError(f"{path}, line {number}: not a metrics record; remove the line to resume")
        if record["step"] <= step:
            keep.append(line)
    atomic_text(path, "".join(line + "\n" for line in keep))


# -----------------------------------------------------------------------------
# the data's order and the schedule: pure functions of (seed, epoch, step)

class TrainingSet(NamedTuple):
    """A task's tokenized items (examples, or pairs) as the loop reads them: lengths[i] (tokens)
    groups micro-batches, units[i] (loss tokens or pairs) normalises a global batch's loss."""
    items: list
    lengths: list
    units: list
    train_idx: list
    val_idx: list


def split(n: int, val: str, seed: int):
    """Seeded (train, val) index lists; `val` is a fraction ('0.05') or a count ('500')."""
    n_val = round(float(val) * n) if "." in val else int(val)
    if not 0 <= n_val < n:
        raise ValueError(f"--val {val} leaves no training examples out of {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[n_val:]), sorted(order[:n_val])


def global_batches(train_idx: list, batch_size: int, seed: int, epoch: int, epoch_size: int | None = None) -> list:
    """This epoch's global batches, seeded by (seed, epoch); the last one may be smaller.

    epoch_size None: a reshuffle, every example once. Otherwise epoch_size
    examples drawn uniformly with replacement, as the authors' get_batch draws
    torch.randint(len(data), ...) for every micro-batch: an example may come
    twice in one batch, and some never.
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch + 1)
    if epoch_size is None:
        drawn = torch.randperm(len(train_idx), generator=g)
    else:
        drawn = torch.randint(len(train_idx), (epoch_size,), generator=g)
    order = [train_idx[i] for i in drawn.tolist()]
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def make_schedule(n_train: int, batch_size: int, epochs: int, warmup_epochs: float,
                  epoch_size: int | None = None) -> "Schedule":
    """Optimizer steps per epoch, in all, and of warmup. An epoch is one pass over the n_train
    examples, or epoch_size examples drawn with replacement (global_batches)."""
    steps_per_epoch = math.ceil((n_train if epoch_size is None else epoch_size) / batch_size)
    return Schedule(steps_per_epoch, steps_per_epoch * epochs, round(warmup_epochs * steps_per_epoch), epoch_size)


def my_micro_batches(batch: list, lengths: list, rank: int, world: int, micro_batch_size: int) -> list:
    """This rank's share of a global batch, in micro-batches of similar lengths (less padding).

    Sorting by length inside the global batch changes no gradient: the batch's
    loss is a sum over its examples. Dealing the sorted list out round-robin
    gives every rank a similar mix of lengths.
    """
    ordered = sorted(batch, key=lambda i: (lengths[i], i))
    mine = ordered[rank::world]
    return [mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]


def fillers(batch: list, lengths: list, d: Dist, micro_batch_size: int) -> list:
    """Under FSDP every forward and backward is a collective, so every rank must make as many as
    the rank with the most micro-batches: a rank with fewer makes up the difference with fillers,
    micro-batches of the global batch's shortest example, whose loss counts zero."""
    if not d.fsdp or not batch:
        return []
    counts = [len(my_micro_batches(batch, lengths, rank, d.world, micro_batch_size)) for rank in range(d.world)]
    shortest = min(batch, key=lambda i: (lengths[i], i))
    return [[shortest]] * (max(counts) - counts[d.rank])


def learning_rate(step: int, peak: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to `peak` over warmup_steps, then cosine decay towards zero at total_steps.

    Counted so that the first step already moves (lr > 0), the last warmup step
    is the peak, and the last step still moves.
    """
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps + 1) / (total_steps - warmup_steps + 1)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def constant_learning_rate(step: int, peak: float, warmup_steps: int, total_steps: int) -> float:
    """The Aligner authors' schedule (finetune/aligner.py, finetune/alignerDPO.py): optimizer step
    `step` (from 0) runs at peak * step / warmup_steps, so the first at zero, then at `peak` for good.

    Their warmup_iters counts micro-batches but is compared with optimizer steps, so their
    warmup lasts batch / micro-batch times as many epochs as it says. Alpaca SFT (2 epochs of
    epoch_size 50,000, 64 / 8): 12,500 steps of a 6,250-step run, which ends at half the peak.
    DPO (0.5 epoch of 80,000 pairs, 64 / 2): 40,000 steps of 7,500. With their epochs
    (--epoch-size 50000 and 80000, batches of 64 and 32 pairs) both are --warmup-epochs 16.
    """
    if warmup_steps <= 0:
        return peak
    return peak * min(step, warmup_steps) / warmup_steps


SCHEDULES = {"cosine": learning_rate, "constant": constant_learning_rate}


# -----------------------------------------------------------------------------
# the loop, in named steps: start (or resume), an optimizer step, validate, save

@dataclass
class Schedule:
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    epoch_size: int | None = None  # examples drawn with replacement per epoch; None: one pass


@dataclass
class Run:
    """What stays fixed while a run trains: its flags and recorded settings, the Aligner and
    its optimizer, the task's loss and its examples' sizes, the processes and the schedule;
    and the order of the epoch under way, drawn once (batch_at)."""
    args: object
    settings: dict
    aligner: torch.nn.Module
    params: list
    optimizer: torch.optim.Optimizer
    batch_loss: Callable
    train_idx: list
    val_idx: list
    lengths: list
    units: list
    stat_names: tuple
    d: Dist
    schedule: Schedule
    order: dict = field(default_factory=dict)  # {epoch: its global batches}, the epoch under way alone

    @property
    def out(self) -> Path:
        return Path(self.args.out)


@dataclass
class Progress:
    """What changes as a run trains; state.pt records it."""
    step: int = 0  # optimizer steps taken
    best: float = math.inf  # the best validation loss so far
    last_val: dict = field(default_factory=dict)  # the last validation's metrics
    last_saved: int | None = None  # the step state.pt holds; None until it is first written


def evaluate(batch_loss, val_idx, lengths, units, d: Dist, micro_batch_size: int, stat_names) -> dict:
    """Validation loss (and the task's statistics) per unit, over all of val_idx, all ranks together."""
    if not val_idx:
        return {}
    sums = torch.zeros(1 + len(stat_names), dtype=torch.float64)
    with torch.no_grad():
        for micro in my_micro_batches(val_idx, lengths, d.rank, d.world, micro_batch_size):
            loss, stats = batch_loss(micro)
            sums += torch.tensor([loss.item()] + [float(stats[k]) for k in stat_names], dtype=torch.float64)
        for filler in fillers(val_idx, lengths, d, micro_batch_size):
            batch_loss(filler)
    sums = all_reduce_sum(sums.to(d.device), d.world).cpu() / sum(units[i] for i in val_idx)
    return {"val_loss": sums[0].item(), **{f"val_{k}": v.item() for k, v in zip(stat_names, sums[1:])}}


def start(run: Run) -> Progress:
    """Resume from state.pt, or begin: clear an old run that --overwrite replaces, write settings.json."""
    out, d = run.out, run.d
    if not run.args.resume and d.rank != 0:
        return Progress()  # rank 0 alone checks and prepares --out: the others could see its new files
    state = open_run(run.args, run.settings)
    if state is not None:
        run.aligner.load_state_dict(state["aligner"])
        run.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        progress = Progress(state["step"], state["best"], state["last_val"], last_saved=state["step"])
        if d.rank == 0:
            remove_strays(out)
            trim_metrics(out / "metrics.jsonl", progress.step)
            print(f"resuming {out} at step {progress.step} of {run.schedule.total_steps}")
        return progress
    if d.rank == 0:
        if run.args.resume:
            print(f"{out}: the run stopped before its first save; starting it again from the beginning")
        for path in run_files(out):  # --overwrite: the old run's files, and nothing else in the folder
            path.unlink()
        remove_strays(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_text(out / "settings.json", json.dumps(run.settings, indent=2) + "\n")
        atomic_text(out / "metrics.jsonl", "")
    return Progress()


def log(run: Run, record: dict):
    if run.d.rank == 0:
        append_line(run.out / "metrics.jsonl", json.dumps(record))


def batch_at(run: Run, step: int) -> list:
    """The global batch of optimizer step `step` (from 0). Each epoch's order is drawn once, by its
    first step (global_batches), and kept while the epoch lasts: a draw orders the whole split."""
    epoch, i = divmod(step, run.schedule.steps_per_epoch)
    if epoch not in run.order:
        run.order.clear()  # a finished epoch's order is never read again
        run.order[epoch] = global_batches(run.train_idx, run.args.batch_size, run.args.seed, epoch,
                                          run.schedule.epoch_size)
    return run.order[epoch][i]


def optimizer_step(run: Run, progress: Progress) -> dict:
    """One optimizer step over the global batch at progress.step; returns its metrics record.

    Whatever it raises, the Aligner and its optimizer are still those of progress.step: a
    FloatingPointError where the loss or a gradient is not finite stops before the update, and
    one where the update leaves a parameter NaN, infinite or exploded (files.EXPLODED) undoes it.
    """
    args, d, schedule, step = run.args, run.d, run.schedule, progress.step
    batch = batch_at(run, step)
    for group in run.optimizer.param_groups:
        group["lr"] = SCHEDULES[args.schedule](step, args.lr, schedule.warmup_steps, schedule.total_steps)
    batch_units = sum(run.units[j] for j in batch)
    sums = torch.zeros(2 + len(run.stat_names), dtype=torch.float64)  # loss, tokens, stats
    t0 = time.perf_counter()
    run.optimizer.zero_grad(set_to_none=False)
    for micro in my_micro_batches(batch, run.lengths, d.rank, d.world, args.micro_batch_size):
        loss, stats = run.batch_loss(micro)
        (loss / batch_units).backward()
        sums += torch.tensor([loss.item(), sum(run.lengths[j] for j in micro)]
                             + [float(stats[k]) for k in run.stat_names], dtype=torch.float64)
    for filler in fillers(batch, run.lengths, d, args.micro_batch_size):
        (run.batch_loss(filler)[0] * 0).backward()  # its collectives, and a zero gradient
    for p in run.params:
        if p.grad is None:  # a rank with no examples in this batch still joins the all-reduce
            p.grad = torch.zeros_like(p)
        all_reduce_sum(p.grad, d.world)
    sums = all_reduce_sum(sums.to(d.device), d.world).cpu()
    loss = sums[0].item() / batch_units
    if not math.isfinite(loss) or not all(torch.isfinite(p.grad).all() for p in run.params):
        raise FloatingPointError(f"step {step + 1}: the loss is {loss}")
    before = copy.deepcopy((run.aligner.state_dict(), run.optimizer.state_dict()))  # a few KiB to MiB
    run.optimizer.step()
    problem = bad_value({name: p for name, p in run.aligner.named_parameters() if p.requires_grad})
    if problem is not None:
        run.aligner.load_state_dict(before[0])  # undone: the Aligner is again the one of the last good step
        run.optimizer.load_state_dict(before[1])
        raise FloatingPointError(f"step {step + 1}: after the update the Aligner's {problem} (a smaller --lr "
                                 "may help)")
    tokens_per_s = sums[1].item() / (time.perf_counter() - t0)
    return {"step": step + 1, "epoch": round((step + 1) / schedule.steps_per_epoch, 4), "loss": loss,
            "lr": run.optimizer.param_groups[0]["lr"], "tokens_per_s": round(tokens_per_s, 1),
            **{k: v.item() / batch_units for k, v in zip(run.stat_names, sums[2:])}}


def validate(run: Run, progress: Progress, epoch: int) -> Progress:
    """Validation after `epoch` (0: before training): log it, save epoch-E.pt, and best.pt where
    the loss is the best so far (every epoch where there is no validation split)."""
    args, d = run.args, run.d
    run.aligner.eval()  # a LoRA's dropout is for training steps only
    last_val = evaluate(run.batch_loss, run.val_idx, run.lengths, run.units, d, args.micro_batch_size,
                        run.stat_names)
    run.aligner.train()
    log(run, {"step": progress.step, "epoch": epoch, **last_val})
    best = progress.best
    if d.rank == 0:
        if epoch > 0:
            run.aligner.save(run.out / f"epoch-{epoch}.pt")
        if last_val.get("val_loss", -math.inf) < best or not run.val_idx:
            best = last_val.get("val_loss", best)
            run.aligner.save(run.out / "best.pt")
        tqdm.write(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in last_val.items()))
    return replace(progress, best=best, last_val=last_val)


def save_state(run: Run, progress: Progress) -> Progress:
    """Write state.pt, everything --resume needs; returns the progress with this step as the last saved."""
    if run.d.rank == 0:
        atomic_save({"aligner": run.aligner.state_dict(), "optimizer": run.optimizer.state_dict(),
                     "step": progress.step, "best": progress.best, "last_val": progress.last_val,
                     "rng": torch.get_rng_state(), "settings": run.settings}, run.out / "state.pt")
    return replace(progress, last_saved=progress.step)


def show(bar, record: dict, stat_names):
    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}",
                    **{k.split("/")[-1]: f"{record[k]:.3f}" for k in stat_names})
    bar.update(1)


# -----------------------------------------------------------------------------
# stopping: every step that a run reports as done is in state.pt when it stops

@contextmanager
def stop_requests(speak: bool):
    """While a run trains, SIGINT (Ctrl-C; torchrun passes it on to every rank) and SIGTERM
    (torchrun's, a scheduler's) ask it to stop after the step under way, once state.pt holds
    that step; a second signal stops it at once (KeyboardInterrupt). Yields the list of the
    signals received. `speak`: say so on stderr (rank 0)."""
    asked = []

    def ask(signum, frame):
        if asked:
            raise KeyboardInterrupt
        asked.append(signum)
        if speak:  # one write; print() could re-enter the output that the signal interrupted
            os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step, once it is saved "
                        "(again to stop at once)\n".encode())

    if threading.current_thread() is not threading.main_thread():  # only the main thread takes signals
        yield asked
        return
    previous = {s: signal.signal(s, ask) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield asked
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def stop_reason(run: Run, progress: Progress, asked: list):
    """Why the run stops before step progress.step + 1, or None: --max-steps reached, or a signal
    to any rank, which every rank learns here (one small all-reduce), so that all stop together."""
    if run.args.max_steps is not None and progress.step >= run.args.max_steps:
        return f"--max-steps {run.args.max_steps}"
    received = all_reduce_max(torch.tensor([max(asked, default=0)], device=run.d.device), run.d.world).item()
    return signal.Signals(received).name if received else None


def keep_steps_done(run: Run, progress: Progress, error: Exception) -> Exception:
    """After an error that came before step progress.step + 1 changed anything (optimizer_step's
    promise): bring state.pt to progress.step, so that every step the run logged is kept, and
    return the error to raise, ours saying which step state.pt holds."""
    held = progress.last_saved
    if progress.step != held:
        try:
            held = save_state(run, progress).last_saved
        except Exception:  # a full disk, say: state.pt stays as it was, and the first error is the one to report
            pass
    if isinstance(error, FloatingPointError):
        return FloatingPointError(f"{error}; stopping. The last good checkpoint is {run.out / 'state.pt'} "
                                  f"(step {held})")
    return error


def interrupted(run: Run, progress: Progress) -> str:
    """Where a run stopped at once (a second signal) stands."""
    if progress.last_saved is None:
        return "stopped before the run's first save; --resume starts it from the beginning"
    return (f"stopped during step {progress.step + 1}; {run.out / 'state.pt'} holds step {progress.last_saved}: "
            "continue with --resume")


def after_step(run: Run, progress: Progress, record: dict, bar) -> Progress:
    """Log a step, validate where it ends an epoch, save every --save-every steps and at each epoch."""
    progress = replace(progress, step=record["step"])
    log(run, record)
    show(bar, record, run.stat_names)
    epoch_done = progress.step % run.schedule.steps_per_epoch == 0
    if epoch_done:
        progress = validate(run, progress, epoch=progress.step // run.schedule.steps_per_epoch)
    if epoch_done or progress.step % run.args.save_every == 0:
        progress = save_state(run, progress)
    return progress


def train(args, aligner, batch_loss, train_idx: list, val_idx: list, lengths: list, units: list,
          d: Dist, stat_names=()) -> dict:
    """Train `aligner` in place; returns the last validation metrics.

    batch_loss(indices) -> (loss summed over the examples' units, {name: sum}):
    the task's whole forward. lengths[i] (tokens) groups micro-batches;
    units[i] (loss tokens or pairs) normalises a global batch's loss.

    However it stops (--max-steps, a signal, an error), the run says which step state.pt
    holds, and that is the last step it logged, except where a second signal stopped it at once.
    """
    params = [p for p in aligner.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    schedule = make_schedule(len(train_idx), args.batch_size, args.epochs, args.warmup_epochs,
                             getattr(args, "epoch_size", None))  # settings made by hand may lack it
    run = Run(args, run_settings(args), aligner, params, optimizer, batch_loss, train_idx, val_idx, lengths, units,
              tuple(stat_names), d, schedule)

    progress = start(run)
    bar = cli.progress(schedule.total_steps, "train", initial=progress.step, disable=d.rank != 0)
    reason = None
    with stop_requests(speak=d.rank == 0) as asked:
        try:
            if progress.last_saved is None:  # a new run: the initial Aligner, validated and saved
                progress = save_state(run, validate(run, progress, epoch=0))
            while progress.step < schedule.total_steps:
                try:
                    reason = stop_reason(run, progress, asked)
                    record = None if reason else optimizer_step(run, progress)
                except Exception as e:
                    error = keep_steps_done(run, progress, e)
                    if error is e:
                        raise
                    raise error from None
                if reason is not None:
                    if progress.last_saved != progress.step:
                        progress = save_state(run, progress)
                    break
                progress = after_step(run, progress, record, bar)
        except KeyboardInterrupt:  # a second signal: at once, wherever the run was
            raise KeyboardInterrupt(interrupted(run, progress)) from None
        finally:
            bar.close()
    if reason is not None:
        where = f"stopped at step {progress.step} ({reason}); {run.out / 'state.pt'} holds it: continue with --resume"
        if not reason.startswith("--max-steps"):
            raise KeyboardInterrupt(where)
        if d.rank == 0:
            tqdm.write(where)
    return progress.last_val
