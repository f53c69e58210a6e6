"""
Several processes under torchrun: FSDP for the frozen base model.

With --fsdp, PyTorch's own FSDP2 (`torch.distributed.fsdp.fully_shard`)
shards the frozen base: one unit per TransformerBlock, plus one for the
embeddings, the final norm and the output head. Each rank keeps 1/world of
the rows of every weight and gathers a block's whole weights only while that
block runs, so LLaMA-2-70B (138 GB in bf16) fits on GPUs of 80 GB. The model
is built on the meta device, and each rank reads from the checkpoint,
memory-mapped, only the rows it keeps: no rank ever holds the whole model, in
CPU or GPU memory. The Aligner stays replicated in float32 on every rank (its
gradients are all-reduced by the training loop), which is why the prefix keys
and values of Eq. 5 are computed inside each block's forward, where FSDP has
gathered that block's W_k and W_v.

Every sharded forward is a collective: all ranks must call the model the same
number of times, in the same order (their batches may differ in shape). The
training loop, evaluation and generation keep them in step.
"""

import ctypes
import datetime
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import llama
from support import cli, files, formats
from support.formats import meta


# -----------------------------------------------------------------------------
# the process group

@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device
    fsdp: bool = False  # the base is sharded: every forward is a collective


def init_distributed(device: torch.device, fsdp: bool = False, compile: bool = False) -> Dist:
    """Join torchrun's process group if there is one (NCCL on GPUs, Gloo on CPU); else a single process.
    --fsdp is refused outside torchrun, and with --compile, before any model loads.

    A rank ends with its launcher (end_with_launcher), and every collective of the group waits at
    most cli.collective_timeout() for the other ranks: a rank that never arrives ends the run with
    a line (cli.run), not a hang."""
    if fsdp and compile:
        raise ValueError("--compile decodes with one model per process; it does not run under --fsdp")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if fsdp and world < 2:
        raise ValueError("--fsdp shards the base over the processes that torchrun starts; run it as "
                         "torchrun --nproc_per_node N <script> ... --fsdp, with N >= 2")
    if not dist.is_initialized() and world > 1:
        end_with_launcher()
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=cli.collective_timeout()))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), device, fsdp)
    return Dist(0, 1, device)


LAUNCHER = os.getppid()  # the process that started this one: torchrun's, under torchrun
PR_SET_PDEATHSIG = 1  # prctl's option number, from <linux/prctl.h>


def end_with_launcher():
    """End this rank when the process that started it (torchrun) ends.

    torchrun starts each rank in a session of its own, so a torchrun that is killed
    outright (kill -9, the OOM killer) leaves its ranks running, each waiting on the
    others. On Linux, prctl(PR_SET_PDEATHSIG) has the kernel send this process SIGKILL
    when its parent dies. SIGKILL, not SIGTERM: a rank blocked in a collective runs no
    Python signal handler until the collective returns, which may take the whole timeout;
    and nothing is lost, since every file the run writes is whole at every moment (files.py)
    and --resume goes on from state.pt. Elsewhere (macOS), a daemon thread checks the
    parent once a second. A parent gone before this was asked for ends the rank at once.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        asked = sys.platform.startswith("linux") and libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL)) == 0
    except (OSError, AttributeError, TypeError):  # no C library to ask (Windows), or no prctl in it (macOS)
        asked = False
    if not asked:
        def watch():
            while os.getppid() == LAUNCHER:
                time.sleep(1)
            os._exit(1)
        threading.Thread(target=watch, daemon=True, name="launcher-watch").start()
    if os.getppid() != LAUNCHER:
        os._exit(1)


def exit_distributed():
    """Under torchrun, leave the process group together and end the process here: the
    barrier, because a rank that exits while its peers still hold connections to it can
    make them abort; the exit without finalizing Python, for cli.exit_at_once's reason."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        cli.exit_at_once(0)


def all_reduce_sum(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


# -----------------------------------------------------------------------------
# the same run on every rank

# Flags whose values may differ between ranks: each rank's own GPU, the --out that rank 0 alone
# writes (compared by its state.pt under --resume), whether errors show tracebacks.
RANK_OWN = ("device", "out", "debug")


def check_ranks_agree(d: Dist, args, inputs: tuple = ()):
    """Under torchrun, stop every rank, before the model loads, where the ranks were not given the
    same run: the same flags (but RANK_OWN), and the same content in --ckpt, --tokenizer, the
    flags named in `inputs` (files, folders or lists of them: --data, --aligner, ...) and, under
    --resume, the state.pt in --out (files.fingerprint; the paths themselves may differ). Ranks
    given other data or another checkpoint would otherwise train on other batches, or under FSDP
    make other numbers of forwards and wait on each other until the collective timeout.

    Every rank raises the same ValueError, one line that names the ranks and the inputs that
    differ from rank 0's, e.g. "rank 1's --data differs from rank 0's (sha256 3e1f... against 9a0b...)".
    """
    if d.world == 1:
        return
    everyone = [None] * d.world
    dist.all_gather_object(everyone, what_this_rank_runs(args, ("ckpt", "tokenizer", *inputs)))
    differences = disagreements(everyone)
    if differences:
        shown = "; ".join(differences[:3]) + (f"; and {len(differences) - 3} more" if len(differences) > 3 else "")
        raise ValueError(f"{shown}: every rank must be given the same flags and files")


def disagreements(everyone: list) -> list:
    """For each flag in which some ranks' runs (what_this_rank_runs, by rank) differ from rank 0's,
    a sentence per value they hold instead, that names those ranks and says how it differs."""
    differences = []
    for name in dict.fromkeys(k for run in everyone for k in run):  # in the order of the flags
        others = {}  # the value other than rank 0's -> the ranks that hold it
        for r in range(1, len(everyone)):
            if everyone[r].get(name) != everyone[0].get(name):
                others.setdefault(repr(everyone[r].get(name)), []).append(r)
        for ranks in others.values():
            detail = difference(everyone[ranks[0]].get(name), everyone[0].get(name))
            differences.append(f"{rank_names(ranks)} {name} differs from rank 0's ({detail})")
    return differences


def what_this_rank_runs(args, inputs: tuple) -> dict:
    """{flag: value} for every flag but RANK_OWN, with the files and folders of `inputs` (and
    --resume's state.pt) as their fingerprints; a file this rank cannot read, as the reason."""
    def content(value):
        if isinstance(value, (list, tuple)):
            return [content(v) for v in value]
        try:
            return files.fingerprint(value, formats.find_tokenizer)
        except OSError as e:
            return {"unreadable": e.strerror or str(e)}

    def plain(value):
        return [plain(v) for v in value] if isinstance(value, (list, tuple)) else \
            str(value) if isinstance(value, Path) else value

    run = {}
    for key, value in vars(args).items():
        flag = f"--{key.replace('_', '-')}"
        if key in inputs:
            run[flag] = content(value)
        elif key not in RANK_OWN:
            run[flag] = plain(value)
    if getattr(args, "resume", False):  # where --out lives may differ by rank; what it holds may not
        state = Path(args.out) / "state.pt"
        run["state.pt in --out"] = content(state) if state.exists() else None
    return run


def rank_names(ranks: list) -> str:
    """'rank 1's', 'ranks 1 and 3's', 'ranks 1, 2, 3 and 5's' (the first five, then a count)."""
    if len(ranks) == 1:
        return f"rank {ranks[0]}'s"
    named = [str(r) for r in ranks[:5]] + ([f"{len(ranks) - 5} more"] if len(ranks) > 5 else [])
    return f"ranks {', '.join(named[:-1])} and {named[-1]}'s"


def difference(a, b) -> str:
    """Where two fingerprints (or values) first differ, and how: 'params.json: sha256 3e1f... against 9a0b...'."""
    if isinstance(a, dict) and isinstance(b, dict) and "unreadable" not in a and "unreadable" not in b:
        key = next(k for k in [*a, *(k for k in b if k not in a)] if a.get(k) != b.get(k))  # in their order
        nested = any(isinstance(v, (dict, list)) for v in (a.get(key), b.get(key)))
        return f"{key}{':' if nested else ''} {difference(a.get(key), b.get(key))}"
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        return f"#{i + 1}: {difference(a[i], b[i])}"
    return f"{brief(a)} against {brief(b)}"


def brief(value) -> str:
    """A fingerprint or value in a few words."""
    if isinstance(value, dict):
        if "unreadable" in value:
            return f"unreadable ({value['unreadable']})"
        return f"a file of {value['bytes']} bytes" if "bytes" in value else "a folder"
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "..."  # a sha256
    if isinstance(value, list):
        return f"{len(value)} value{'s' * (len(value) != 1)}"
    if value is None:
        return "none"
    return str(value) if len(str(value)) <= 80 else str(value)[:77] + "..."


# -----------------------------------------------------------------------------
# FSDP: the frozen base, sharded


def local_rows(global_rows: int, rank: int, world: int) -> slice:
    """The rows of dim 0 that FSDP2's Shard(0) gives this rank: torch.chunk's split,
    ceil(rows / world) each, so the last ranks may hold fewer (or none)."""
    per_rank = -(-global_rows // world)
    return slice(min(rank * per_rank, global_rows), min((rank + 1) * per_rank, global_rows))


def load_sharded(ckpt_dir, device, dtype=torch.bfloat16, tokenizer_path=None,
                 max_seq_len: int = 2048, max_batch_size: int = 32):
    """formats.load under FSDP2: a frozen Transformer whose weights are sharded over the
    process group, each rank reading only its own rows of every weight, and its Tokenizer."""
    rank, world = dist.get_rank(), dist.get_world_size()
    ckpt = formats.open_checkpoint(ckpt_dir)
    tokenizer = formats.Tokenizer(tokenizer_path or ckpt.tokenizer_path)
    args = meta.model_args(ckpt, tokenizer, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    with torch.device("meta"):
        model = llama.Transformer(args).to(dtype)
    model.requires_grad_(False)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    meta.check_keys(ckpt, shapes)

    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)  # the root unit: embeddings, final norm, output head
    model.to_empty(device=device)
    with torch.no_grad():
        for name, param in model.named_parameters():
            local = param.to_local()  # (rows of this rank, ...)
            rows = local_rows(shapes[name][0], rank, world)
            if rows.stop - rows.start != local.shape[0]:
                raise RuntimeError(f"FSDP gave rank {rank} {local.shape[0]} rows of {name}; "
                                   f"expected {rows.stop - rows.start}")
            meta.finite_weight(ckpt, name, local.copy_(meta.checked_weight(ckpt, name, shapes[name], rows)))
    model.freqs_cis = llama.precompute_freqs_cis(args.head_dim, args.max_seq_len, args.rope_theta).to(device)
    meta.check_finite(model.eval(), tokenizer, ckpt_dir)  # a forward on every rank, in step
    model.reshard()  # the root unit keeps its weights gathered after a forward; give them back
    return model, tokenizer


def local_weight_bytes(model) -> int:
    """The bytes of weights this rank holds: its shards under FSDP, else the whole model."""
    return sum((p.to_local() if hasattr(p, "to_local") else p).nbytes for p in model.parameters())


# -----------------------------------------------------------------------------
# evaluation and generation under FSDP: each rank its own share, in step

class Lockstep:
    """Keeps the ranks' forwards through a sharded model in step.

    Under FSDP a forward gathers each block's weights from every rank, so all
    ranks must make the same number of forwards (of any shapes) in the same
    order. Work goes in rounds: before each forward of its own, a rank calls
    `turn()`; a rank with no work left calls `finish()`, which answers every
    round with a one-token filler forward until no rank has work. Each round
    costs one small all-reduce.
    """

    def __init__(self, model, d: Dist):
        self.model, self.d = model, d

    def share(self, items: list) -> list:
        """This rank's share of a list of work, dealt round-robin."""
        return items[self.d.rank::self.d.world]

    def turn(self, mine: bool = True) -> bool:
        """Whether any rank has a forward to make this round; a rank with none makes a filler."""
        flag = torch.tensor([int(mine)], device=self.d.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        anyone = bool(flag.item())
        if anyone and not mine:
            with torch.no_grad():
                self.model(torch.ones(1, 1, dtype=torch.long, device=self.d.device))
        return anyone

    def finish(self):
        """Make filler forwards until every rank has finished its share."""
        while self.turn(False):
            pass

    def gather(self, part: dict) -> dict:
        """The union of every rank's {index: result}, on every rank."""
        parts = [None] * self.d.world
        dist.all_gather_object(parts, part)
        return {k: v for p in parts for k, v in p.items()}
