"""Run by tests/test_distributed.py under torchrun: train_sft.py, with rank 1 failing as its
second step begins (as a rank does whose device or data fails mid-run), while rank 0 goes on
into that step's collectives."""

import torch.distributed as dist

from support import cli, trainer
import train_sft

real_optimizer_step = trainer.optimizer_step


def optimizer_step(run, progress):
    if dist.get_rank() == 1 and progress.step == 1:
        raise OSError("rank 1 lost its device at step 2")
    return real_optimizer_step(run, progress)


if __name__ == "__main__":
    trainer.optimizer_step = optimizer_step
    cli.run(train_sft.main)
