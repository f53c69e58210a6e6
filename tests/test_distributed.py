"""FSDP on CPU: two processes under torchrun with Gloo, against one process."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distributed
import evaluate
import generate
import llama
import train_dpo
import train_sft
from aligner import Aligner
from conftest import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def torchrun(script, *args, nproc=2, timeout=180, fails=False):
    """Run `script` under torchrun with Gloo on the CPU and return its stdout (its stderr where it
    `fails`, as expected); on a timeout (a hang is how a collective out of step shows) every
    process it started is killed with it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(script), *map(str, args)]
    with subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.terminate()  # torchrun ends the processes it started (each in a session of its own)
            try:
                process.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.communicate()
            raise AssertionError(f"{script.name} did not finish in {timeout} s: a collective out of step hangs")
    assert (process.returncode != 0) == fails, err[-3000:]
    return err if fails else out


@pytest.mark.parametrize("rows, world", [(5, 2), (3, 4), (10, 3), (8, 2)])
def test_each_rank_reads_the_rows_fsdp_gives_it(rows, world):
    """FSDP2's Shard(0) splits dim 0 as torch.chunk does: ceil(rows / world) each, the last ranks
    fewer or none. local_rows names those rows for every rank."""
    pieces = torch.arange(rows).chunk(world)
    for rank in range(world):
        expected = pieces[rank].tolist() if rank < len(pieces) else []
        assert list(range(rows))[distributed.local_rows(rows, rank, world)] == expected


def test_sharded_base_equals_the_whole_one_and_each_rank_holds_half(tmp_path):
    """Each rank reads only its own rows of every weight, holds about half the bytes, and the
    sharded model gives the whole model's logits and the Aligner's gradients (Meta shards: 2)."""
    make_checkpoint(tmp_path / "tiny", n_shards=2)
    torchrun(ROOT / "tests" / "fsdp_checks.py", tmp_path / "tiny", tmp_path / "report.json")
    reports = json.loads((tmp_path / "report.json").read_text())
    assert len(reports) == 2
    for r in reports:
        assert r["requests_within_own_rows"] and r["n_requests"] > 0
        assert 0.45 < r["local_bytes"] / r["whole_bytes"] <= 0.55
        assert r["base"] < 1e-5
        for n in (1, 3):
            assert max(r[f"N={n}"]) < 1e-5, r
            assert r[f"N={n} gates moved"] > 0


DEMO = ROOT / "demo"
SFT = ["--ckpt", DEMO / "llama-demo", "--data", DEMO / "data" / "alpaca.json", "--n-tokens", "2", "--val", "5",
       "--batch-size", "5", "--micro-batch-size", "2", "--max-steps", "3", "--lr", "0.05", "--max-seq-len", "64"]
DPO = ["--ckpt", DEMO / "llama-demo", "--data", DEMO / "data" / "pku_saferlhf.jsonl", "--val", "5",
       "--batch-size", "5", "--micro-batch-size", "2", "--max-steps", "2", "--lr", "0.05", "--max-seq-len", "64",
       "--beta", "1.0"]


def final_aligner(out):
    state = torch.load(out / "state.pt", weights_only=True)
    return state["aligner"], state["step"]


def same_run(a, b):
    """The Aligners in two runs' state.pt agree (float tolerance: ranks sum gradients in another
    order), at the same step, and so do the losses in their metrics.jsonl."""
    (one, step), (other, other_step) = final_aligner(a), final_aligner(b)
    assert step == other_step
    for key in ("prefix", "gates"):
        torch.testing.assert_close(other[key], one[key], rtol=1e-4, atol=1e-5)
    assert one["gates"].abs().sum() > 0  # it trained, so the comparison could fail
    records = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (a, b)]
    assert len(records[0]) == len(records[1])
    for x, y in zip(*records):
        for k in ("loss", "val_loss"):
            if k in x:
                assert y[k] == pytest.approx(x[k], rel=1e-4), (k, x, y)


def test_fsdp_training_gives_the_one_process_aligner(tmp_path):
    """DPO on two ranks under FSDP (Gloo) against one process: the same Aligner after a few steps. A
    global batch of 5 in micro-batches of 2 leaves rank 1 a micro-batch short, which it makes up with a
    filler; the validation split of 5 does the same."""
    flags = [str(f) for f in DPO + ["--precompute-ref"]]
    torch.set_num_threads(1)
    train_dpo.main([*flags, "--out", str(tmp_path / "one")])
    torchrun(ROOT / "train_dpo.py", *flags, "--out", tmp_path / "fsdp", "--fsdp")
    same_run(tmp_path / "one", tmp_path / "fsdp")


def test_a_one_process_run_resumes_under_fsdp(tmp_path):
    """SFT stopped after 2 steps in one process, resumed on two ranks under FSDP (the settings that
    change where and how a run computes, not its result, may change on resume), ends as the run that
    never stopped: state.pt and the Aligner files carry over between the two."""
    flags = [str(f) for f in SFT]
    torch.set_num_threads(1)
    train_sft.main([*flags, "--out", str(tmp_path / "whole")])
    stop_early = flags[:flags.index("--max-steps")] + ["--max-steps", "2"] + flags[flags.index("--max-steps") + 2:]
    train_sft.main([*stop_early, "--out", str(tmp_path / "moved")])
    torchrun(ROOT / "train_sft.py", *flags, "--out", tmp_path / "moved", "--fsdp", "--resume")
    same_run(tmp_path / "whole", tmp_path / "moved")


def test_an_error_on_one_rank_stops_every_rank_and_the_run_resumes(tmp_path):
    """Rank 1 fails as step 2 begins while rank 0 waits for it in a collective: torchrun stops both,
    with rank 1's one-line error and no hang; the run keeps what it had saved, and --resume under
    FSDP ends it as the run that never failed."""
    flags = [str(f) for f in SFT]
    torch.set_num_threads(1)
    train_sft.main([*flags, "--out", str(tmp_path / "whole")])
    err = torchrun(ROOT / "tests" / "fsdp_fault.py", *flags, "--out", tmp_path / "failed", "--fsdp", fails=True)
    errors = sorted(line[line.index("train_sft.py: error: "):] for line in err.splitlines() if " error: " in line)
    assert errors in (["train_sft.py: error: rank 1 lost its device at step 2"],  # rank 0 stopped by torchrun
                      ["train_sft.py: error: rank 0: another rank stopped, so this one stops too",
                       "train_sft.py: error: rank 1 lost its device at step 2"])
    assert "exitcode  : 1 (pid" in err  # torchrun's report: rank 1 exited with its code, not aborted
    assert (tmp_path / "failed" / "state.pt").exists()
    torchrun(ROOT / "train_sft.py", *flags, "--out", tmp_path / "failed", "--fsdp", "--resume")
    same_run(tmp_path / "whole", tmp_path / "failed")


@pytest.fixture(scope="module")
def demo_aligners(tmp_path_factory):
    """A one-token and a two-token Aligner on the demo model, with gates drawn so that they matter."""
    folder = tmp_path_factory.mktemp("aligners")
    args = llama.ModelArgs(**llama.read_params(DEMO / "llama-demo"))
    torch.manual_seed(0)
    paths = []
    for n_tokens in (1, 2):
        aligner = Aligner(args, n_tokens=n_tokens)
        with torch.no_grad():
            aligner.gates.normal_(0, 0.5)
        aligner.save(folder / f"n{n_tokens}.pt")
        paths.append(folder / f"n{n_tokens}.pt")
    return paths


def test_fsdp_evaluation_gives_the_one_process_results(tmp_path, demo_aligners):
    """All three tasks on the demo's data, the base and two Aligners, under FSDP on two ranks: each rank
    scores its share of the batches (3 and 2 of 5 per QA file) and rank 0 writes what one process writes."""
    flags = ["all", "--limit", "10", "--batch-size", "4", "--max-new-tokens", "12", "--shots", "2",
             "--aligner", "base", "--aligner", str(demo_aligners[0]), "--aligner", str(demo_aligners[1])]
    torch.set_num_threads(1)
    evaluate.main([*flags, "--out", str(tmp_path / "one")])
    torchrun(ROOT / "evaluate.py", *flags, "--out", tmp_path / "fsdp", "--fsdp")
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    assert json.loads((tmp_path / "fsdp" / "results.json").read_text()) == one
    for task in ("gsm8k", "mmlu", "qa"):
        assert (tmp_path / "fsdp" / f"{task}.jsonl").read_text() == (tmp_path / "one" / f"{task}.jsonl").read_text()
    outputs = [json.loads(line)["output"] for line in (tmp_path / "one" / "qa.jsonl").read_text().splitlines()]
    assert len(set(outputs)) > len(outputs) // 3  # answers differ by prompt and Aligner: the test can fail


def test_fsdp_generation_gives_the_one_process_answers(tmp_path, demo_aligners):
    """generate.py with Aligners of two shapes side by side: each rank answers its share of the prompts,
    rank 0 gathers them, and the file equals one process's (greedy decoding)."""
    prompts = tmp_path / "prompts.txt"
    names = ("Eskvormi", "Tavo", "Lirra", "Mokka", "Ansel")
    prompts.write_text("".join(f"What is the home of {name}?\n" for name in names))
    flags = ["--prompts-file", str(prompts), "--max-new-tokens", "16", "--aligner", "base",
             "--aligner", str(demo_aligners[0]), "--aligner", str(demo_aligners[1])]
    torch.set_num_threads(1)
    generate.main([*flags, "--out", str(tmp_path / "one.jsonl")])
    torchrun(ROOT / "generate.py", *flags, "--out", tmp_path / "fsdp.jsonl", "--fsdp")
    one = (tmp_path / "one.jsonl").read_text()
    assert (tmp_path / "fsdp.jsonl").read_text() == one
    outputs = [json.loads(line)["output"] for line in one.splitlines()]
    assert len(outputs) == 15 and len(set(outputs)) > 5  # the Aligners change the answers: the test can fail
