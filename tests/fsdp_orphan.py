"""Run by tests/test_distributed.py under torchrun (Gloo, CPU): each rank joins the process group
as the scripts do (distributed.init_distributed), writes its pid to <folder>/<rank>.pid, and
waits in a collective that never completes, as ranks do whose launcher was killed."""

import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from support import distributed

if __name__ == "__main__":
    d = distributed.init_distributed(torch.device("cpu"))
    (Path(sys.argv[1]) / f"{d.rank}.pid").write_text(str(os.getpid()))
    if d.rank == 0:
        dist.all_reduce(torch.ones(1))  # rank 1 never joins it: rank 0 blocks here, inside Gloo
    time.sleep(300)
