"""Run by tests/test_distributed.py under torchrun (Gloo, CPU): the sharded base against the
whole one. Writes what it measured, per rank, to the JSON file named on the command line."""

import json
import sys

import torch
import torch.distributed as dist

from support import distributed, formats
from aligner import Aligner


def main(ckpt, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    requests = []
    real_get = formats.meta.MetaCheckpoint.get
    formats.meta.MetaCheckpoint.get = lambda self, key, rows=None: requests.append((key, rows)) or real_get(self, key, rows)
    sharded, _ = distributed.load_sharded(ckpt, "cpu", torch.float32, max_seq_len=64)
    formats.meta.MetaCheckpoint.get = real_get
    whole, _ = formats.load(ckpt, max_seq_len=64)

    report = {"rank": rank, "local_bytes": distributed.local_weight_bytes(sharded),
              "whole_bytes": distributed.local_weight_bytes(whole),
              "requests_within_own_rows": all(
                  rows == distributed.local_rows(whole.state_dict()[key].shape[0], rank, world)
                  for key, rows in requests),
              "n_requests": len(requests)}

    # the same batch on every rank: logits, and the Aligner's gradients through the sharded blocks
    torch.manual_seed(0)
    tokens = torch.randint(0, whole.args.vocab_size, (2, 9))
    for n_tokens in (1, 3):
        aligner = Aligner(whole.args, n_tokens=n_tokens, start_layer=1)
        with torch.no_grad():
            aligner.gates.normal_()
        grads = []
        for model in (sharded, whole):
            aligner.zero_grad()
            logits = model(tokens, aligner=aligner)
            logits.logsumexp(-1).mean().backward()
            grads.append((logits.detach(), aligner.prefix.grad.clone(), aligner.gates.grad.clone()))
        report[f"N={n_tokens}"] = [(a - b).abs().max().item() for a, b in zip(*grads)]
        report[f"N={n_tokens} gates moved"] = grads[1][2].abs().sum().item()
    with torch.no_grad():
        report["base"] = (sharded(tokens) - whole(tokens)).abs().max().item()
    reports = [None] * world
    dist.all_gather_object(reports, report)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(reports, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
