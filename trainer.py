"""
The training loop that train_sft.py and train_dpo.py share: only the Aligner's
few thousand parameters train, the base model stays frozen.

What it does, in the setting of the paper's experiments (Aligner, arXiv 2312.05503):
AdamW with weight decay, a global batch reached by gradient accumulation over
micro-batches, linear warmup then cosine decay, validation before training and
after every epoch, an Aligner file per epoch plus the best by validation loss.

What a run leaves in --out: settings.json, metrics.jsonl (one line per
optimizer step and per validation), epoch-E.pt and best.pt (Aligner files),
state.pt (everything --resume needs: Aligner, optimizer, step, RNG). The data
order is a pure function of (seed, epoch), so the step number alone says where
in the data a resumed run continues, and a stopped and resumed run ends with
the same Aligner, bit for bit on CPU, as one that never stopped. Every file is
written atomically (write beside, then rename), so a kill at any moment leaves
the last good checkpoint whole.

Several processes (torchrun): each rank takes its share of every global batch;
the Aligner's gradients are all-reduced by hand after backward. (DDP would hook
the wrapped module's forward, and the Aligner's forward is never called: the
base model reads its parameters.) The loss of a global batch is normalised by
its total count of loss units (response tokens for SFT, pairs for DPO) before
backward, so summing the ranks' gradients gives the one-process gradient.
"""

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from data import DEMO_CKPT, DEMO_DATA, check_demo
from files import atomic_save, atomic_write
from llama import load


# -----------------------------------------------------------------------------
# flags both scripts take; each script sets the paper's defaults for its run

def add_arguments(parser, *, n_tokens, lr, batch_size, epochs, warmup_epochs, max_seq_len, out):
    a = parser.add_argument
    a("--n-tokens", type=int, default=n_tokens, help="N, the number of Aligner tokens")
    a("--start-layer", type=int, default=2, help="the first layer that attends to the Aligner")
    a("--lr", type=float, default=lr, help="peak learning rate of AdamW")
    a("--weight-decay", type=float, default=0.02, help="AdamW's weight decay")
    a("--batch-size", type=int, default=batch_size, help="global batch: examples per optimizer step, all ranks together")
    a("--micro-batch-size", type=int, default=None,
      help="examples per forward on one rank; gradients accumulate up to --batch-size "
           "(default: 4096 // --max-seq-len on a GPU, the whole batch on CPU)")
    a("--epochs", type=int, default=epochs, help="passes over the training data")
    a("--warmup-epochs", type=float, default=warmup_epochs, help="linear warmup length, in epochs")
    a("--schedule", choices=tuple(SCHEDULES), default="cosine",
      help="after the warmup: cosine decay towards zero, or constant: the authors' finetune script, "
           "whose warmup starts from zero")
    a("--max-seq-len", type=int, default=max_seq_len, help="longer examples are cut to this many tokens (and counted)")
    a("--val", type=str, default="0.05", help="held-out validation split: a fraction (0.05) or a count (500)")
    a("--seed", type=int, default=0, help="seeds the Aligner's initialisation, the split and the data order")
    a("--grad-checkpointing", action="store_true", help="recompute activations in backward: less memory for long sequences")
    a("--out", type=Path, default=Path(out), help="folder for Aligner files, metrics.jsonl, settings.json and state.pt")
    a("--save-every", type=int, default=100, help="also save the resumable state every this many optimizer steps")
    a("--resume", action="store_true", help="continue the run in --out from its state.pt")
    a("--max-steps", type=int, default=None, help="stop (resumably) after this many optimizer steps in all; for tests")


def demo_note(demo_defaults: dict) -> str:
    """The --help line that says which defaults the built-in demo changes."""
    flags = ", ".join(f"--{name.replace('_', '-')} {value}" for name, value in demo_defaults.items())
    return f"With no --ckpt (the built-in demo) the defaults are instead: {flags}."


def parse_args(parser, argv, demo_defaults: dict, demo_data: str):
    """Parse argv. With no --ckpt, the run is on the built-in demo: its checkpoint, its file
    demo_data unless --data is given, and its own defaults, over which a flag given still wins."""
    args = parser.parse_args(argv)
    if args.ckpt is not None:
        if args.data is None:
            parser.error("--data is required with --ckpt")
        return args
    parser.set_defaults(**demo_defaults)
    args = parser.parse_args(argv)
    args.ckpt, args.data = str(DEMO_CKPT), args.data or str(DEMO_DATA / demo_data)
    check_demo(args.ckpt, args.data)
    return args


def load_base(args, d: "Dist"):
    """The frozen base model and its tokenizer: bf16 on a GPU, fp32 on CPU."""
    dtype = torch.bfloat16 if d.device.type == "cuda" else torch.float32
    model, tokenizer = load(args.ckpt, device=d.device, dtype=dtype, max_seq_len=args.max_seq_len)
    model.grad_checkpointing = args.grad_checkpointing
    return model, tokenizer


# -----------------------------------------------------------------------------
# processes and devices

@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device


def init_distributed() -> Dist:
    """Join torchrun's process group if there is one (NCCL on GPUs, Gloo on CPU); else a single process."""
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), device)
    return Dist(0, 1, device)


def close_distributed():
    """Leave the process group together: a rank that exits while its peers still hold
    connections to it can make them abort (SIGABRT) instead of ending cleanly."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def micro_batch_size(args, d: Dist) -> int:
    """--micro-batch-size, or its default: on a GPU memory bounds it (4096 tokens' worth: 8 examples
    of 512 for SFT, 4 pairs of 1024 for DPO); on CPU one big batch is fastest."""
    if args.micro_batch_size is not None:
        return args.micro_batch_size
    if d.device.type == "cuda":
        return max(1, 4096 // args.max_seq_len)
    return math.ceil(args.batch_size / d.world)


def all_reduce_sum(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# -----------------------------------------------------------------------------
# the data's order and the schedule: pure functions of (seed, epoch, step)

def split(n: int, val: str, seed: int):
    """Seeded (train, val) index lists; `val` is a fraction ('0.05') or a count ('500')."""
    n_val = round(float(val) * n) if "." in val else int(val)
    if not 0 <= n_val < n:
        raise ValueError(f"--val {val} leaves no training examples out of {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[n_val:]), sorted(order[:n_val])


def global_batches(train_idx: list, batch_size: int, seed: int, epoch: int) -> list:
    """This epoch's global batches: a reshuffle seeded by (seed, epoch); the last one may be smaller."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch + 1)
    order = [train_idx[i] for i in torch.randperm(len(train_idx), generator=g).tolist()]
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def my_micro_batches(batch: list, lengths: list, rank: int, world: int, micro_batch_size: int) -> list:
    """This rank's share of a global batch, in micro-batches of similar lengths (less padding).

    Sorting by length inside the global batch changes no gradient: the batch's
    loss is a sum over its examples. Dealing the sorted list out round-robin
    gives every rank a similar mix of lengths.
    """
    ordered = sorted(batch, key=lambda i: (lengths[i], i))
    mine = ordered[rank::world]
    return [mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]


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
    warmup lasts batch / micro-batch times as many epochs as it says. Alpaca SFT (2 epochs,
    64 / 8): 12,500 steps of a 6,250-step run, which ends at half the peak. DPO (0.5 epoch,
    64 / 2): 40,000 steps of 7,500. Both are --warmup-epochs 16 here.
    """
    if warmup_steps <= 0:
        return peak
    return peak * min(step, warmup_steps) / warmup_steps


SCHEDULES = {"cosine": learning_rate, "constant": constant_learning_rate}


# -----------------------------------------------------------------------------
# the loop

def evaluate(batch_loss, val_idx, lengths, units, d: Dist, micro_batch_size: int, stat_names) -> dict:
    """Validation loss (and the task's statistics) per unit, over all of val_idx, all ranks together."""
    if not val_idx:
        return {}
    sums = torch.zeros(1 + len(stat_names), dtype=torch.float64)
    with torch.no_grad():
        for micro in my_micro_batches(val_idx, lengths, d.rank, d.world, micro_batch_size):
            loss, stats = batch_loss(micro)
            sums += torch.tensor([loss.item()] + [float(stats[k]) for k in stat_names], dtype=torch.float64)
    sums = all_reduce_sum(sums.to(d.device), d.world).cpu() / sum(units[i] for i in val_idx)
    return {"val_loss": sums[0].item(), **{f"val_{k}": v.item() for k, v in zip(stat_names, sums[1:])}}


def train(args, aligner, batch_loss, train_idx: list, val_idx: list, lengths: list, units: list,
          d: Dist, stat_names=()) -> dict:
    """Train `aligner` in place; returns the last validation metrics.

    batch_loss(indices) -> (loss summed over the examples' units, {name: sum}):
    the task's whole forward. lengths[i] (tokens) groups micro-batches;
    units[i] (loss tokens or pairs) normalises a global batch's loss.
    """
    out = args.out
    params = [p for p in aligner.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(train_idx) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                if k not in ("resume", "max_steps")}

    # --- start, or continue from state.pt
    step, best, last_val = 0, math.inf, {}
    if args.resume:
        path = out / "state.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: nothing to resume (run without --resume to start)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        free = ("micro_batch_size", "save_every", "grad_checkpointing")  # change speed or memory, not the result
        changed = sorted(k for k in settings if k not in free and state["settings"].get(k) != settings[k])
        if changed:
            raise ValueError(f"{path}: the run was started with other settings for {changed}; "
                             "resume it with the same flags")
        aligner.load_state_dict(state["aligner"])
        optimizer.load_state_dict(state["optimizer"])
        step, best, last_val = state["step"], state["best"], state["last_val"]
        torch.set_rng_state(state["rng"])
        if d.rank == 0:
            keep = [line for line in (out / "metrics.jsonl").read_text().splitlines()
                    if json.loads(line)["step"] <= step] if (out / "metrics.jsonl").exists() else []
            atomic_write(out / "metrics.jsonl", lambda f: f.write("".join(l + "\n" for l in keep)), mode="w")
            print(f"resuming {out} at step {step} of {total_steps}")
    elif d.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        text = json.dumps(settings, indent=2) + "\n"
        atomic_write(out / "settings.json", lambda f: f.write(text), mode="w")
        (out / "metrics.jsonl").write_text("")

    def log(record):
        if d.rank == 0:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def save_state():
        if d.rank == 0:
            atomic_save({"aligner": aligner.state_dict(), "optimizer": optimizer.state_dict(),
                         "step": step, "best": best, "last_val": last_val,
                         "rng": torch.get_rng_state(), "settings": settings}, out / "state.pt")

    def validate(epoch):
        nonlocal best, last_val
        last_val = evaluate(batch_loss, val_idx, lengths, units, d, args.micro_batch_size, stat_names)
        log({"step": step, "epoch": epoch, **last_val})
        if d.rank == 0:
            if epoch > 0:
                aligner.save(out / f"epoch-{epoch}.pt")
            if last_val.get("val_loss", -math.inf) < best or not val_idx:
                best = last_val.get("val_loss", best)
                aligner.save(out / "best.pt")
            bar.write(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in last_val.items()))

    bar = tqdm(total=total_steps, initial=step, disable=d.rank != 0, dynamic_ncols=True, desc="train")
    if step == 0:
        validate(0)
        save_state()

    # --- optimizer steps
    last_saved = step
    while step < total_steps:
        epoch, i = divmod(step, steps_per_epoch)
        batch = global_batches(train_idx, args.batch_size, args.seed, epoch)[i]
        for group in optimizer.param_groups:
            group["lr"] = SCHEDULES[args.schedule](step, args.lr, warmup_steps, total_steps)
        batch_units = sum(units[j] for j in batch)
        sums = torch.zeros(2 + len(stat_names), dtype=torch.float64)  # loss, tokens, stats
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=False)
        for micro in my_micro_batches(batch, lengths, d.rank, d.world, args.micro_batch_size):
            loss, stats = batch_loss(micro)
            (loss / batch_units).backward()
            sums += torch.tensor([loss.item(), sum(lengths[j] for j in micro)]
                                 + [float(stats[k]) for k in stat_names], dtype=torch.float64)
        for p in params:
            if p.grad is None:  # a rank with no examples in this batch still joins the all-reduce
                p.grad = torch.zeros_like(p)
            all_reduce_sum(p.grad, d.world)
        sums = all_reduce_sum(sums.to(d.device), d.world).cpu()
        loss = sums[0].item() / batch_units
        if not math.isfinite(loss) or not all(torch.isfinite(p.grad).all() for p in params):
            bar.close()
            raise FloatingPointError(f"step {step + 1}: the loss is {loss}; stopping. The last good "
                                     f"checkpoint is {out / 'state.pt'} (step {last_saved})")
        optimizer.step()
        step += 1
        tokens_per_s = sums[1].item() / (time.perf_counter() - t0)
        record = {"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": loss,
                  "lr": optimizer.param_groups[0]["lr"], "tokens_per_s": round(tokens_per_s, 1),
                  **{k: v.item() / batch_units for k, v in zip(stat_names, sums[2:])}}
        log(record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{tokens_per_s:.0f}",
                        **{k.split("/")[-1]: f"{record[k]:.3f}" for k in stat_names})

        if step % steps_per_epoch == 0:
            validate(step // steps_per_epoch)
        if step % steps_per_epoch == 0 or step % args.save_every == 0 or step == args.max_steps:
            save_state()
            last_saved = step
        if args.max_steps is not None and step >= args.max_steps and step < total_steps:
            bar.close()
            if d.rank == 0:
                print(f"stopped at step {step} (--max-steps); continue with --resume")
            return last_val
    bar.close()
    return last_val
