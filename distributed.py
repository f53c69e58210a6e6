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

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import cli
import llama


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
    --fsdp is refused outside torchrun, and with --compile, before any model loads."""
    if fsdp and compile:
        raise ValueError("--compile decodes with one model per process; it does not run under --fsdp")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if fsdp and world < 2:
        raise ValueError("--fsdp shards the base over the processes that torchrun starts; run it as "
                         "torchrun --nproc_per_node N <script> ... --fsdp, with N >= 2")
    if not dist.is_initialized() and world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), device, fsdp)
    return Dist(0, 1, device)


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
# FSDP: the frozen base, sharded


def local_rows(global_rows: int, rank: int, world: int) -> slice:
    """The rows of dim 0 that FSDP2's Shard(0) gives this rank: torch.chunk's split,
    ceil(rows / world) each, so the last ranks may hold fewer (or none)."""
    per_rank = -(-global_rows // world)
    return slice(min(rank * per_rank, global_rows), min((rank + 1) * per_rank, global_rows))


def load_sharded(ckpt_dir, device, dtype=torch.bfloat16, tokenizer_path=None,
                 max_seq_len: int = 2048, max_batch_size: int = 32):
    """llama.load under FSDP2: a frozen Transformer whose weights are sharded over the
    process group, each rank reading only its own rows of every weight, and its Tokenizer."""
    rank, world = dist.get_rank(), dist.get_world_size()
    ckpt = llama.open_checkpoint(ckpt_dir)
    tokenizer = llama.Tokenizer(tokenizer_path or ckpt.tokenizer_path)
    args = llama.model_args(ckpt, tokenizer, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    with torch.device("meta"):
        model = llama.Transformer(args).to(dtype)
    model.requires_grad_(False)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    llama.check_keys(ckpt, shapes)

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
            local.copy_(llama.checked_weight(ckpt, name, shapes[name], rows))
    model.freqs_cis = llama.precompute_freqs_cis(args.head_dim, args.max_seq_len, args.rope_theta).to(device)
    return model.eval(), tokenizer


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
