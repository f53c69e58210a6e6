"""FSDP on CPU: two processes under torchrun with Gloo, against one process."""

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from support import cli, distributed, formats
import evaluate
import generate
import llama
import train_dpo
import train_sft
from aligner import Aligner
from conftest import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def torchrun_command(script, *args, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            str(script), *map(str, args)]


def torchrun_env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", **extra}


def torchrun(script, *args, nproc=2, timeout=180, fails=False, env=None):
    """Run `script` under torchrun with Gloo on the CPU and return its stdout (its stderr where it
    `fails`, as expected); on a timeout (a hang is how a collective out of step shows) every
    process it started is killed with it."""
    env = env or torchrun_env()
    cmd = torchrun_command(script, *args, nproc=nproc)
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


def test_what_differs_between_ranks_is_named_with_the_ranks(tmp_path, monkeypatch):
    """The sentences of distributed.check_ranks_agree, from what each rank would send: a setting, a
    file of other content, a file that one rank cannot read, a checkpoint whose params.json differs
    (named before its weights), the state.pt that --resume reads; ranks that agree are not named."""
    for name, text in (("a.json", "[1]"), ("b.json", "[2]"), ("c.json", "[1]")):
        (tmp_path / name).write_text(text)
    make_checkpoint(tmp_path / "four" / "tiny")
    make_checkpoint(tmp_path / "two" / "tiny", n_layers=2)
    real_sha256 = distributed.files.sha256

    def sha256(path):
        if Path(path).name == "c.json":
            raise PermissionError(13, "Permission denied")
        return real_sha256(path)

    monkeypatch.setattr(distributed.files, "sha256", sha256)

    def sent(lr, data, ckpt, out):
        args = argparse.Namespace(lr=lr, data=str(tmp_path / data), ckpt=str(tmp_path / ckpt / "tiny"),
                                  device="cuda:3", out=str(tmp_path / out), resume=True)
        return distributed.what_this_rank_runs(args, ("ckpt", "data"))

    (tmp_path / "run").mkdir()
    torch.save({"step": 3}, tmp_path / "run" / "state.pt")
    everyone = [sent(0.1, "a.json", "four", "run"), sent(0.1, "a.json", "four", "elsewhere"),
                sent(0.2, "b.json", "two", "run"), sent(0.1, "c.json", "four", "run")]
    sha = lambda name: hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()[:12]
    assert distributed.disagreements(everyone) == [
        "rank 2's --lr differs from rank 0's (0.2 against 0.1)",
        f"rank 2's --data differs from rank 0's (sha256 {sha('b.json')}... against {sha('a.json')}...)",
        "rank 3's --data differs from rank 0's (unreadable (Permission denied) against a file of 3 bytes)",
        f"rank 2's --ckpt differs from rank 0's (params.json: sha256 {sha('two/tiny/params.json')}... against "
        f"{sha('four/tiny/params.json')}...)",
        "rank 1's state.pt in --out differs from rank 0's (none against a file "
        f"of {(tmp_path / 'run' / 'state.pt').stat().st_size} bytes)"]
    assert distributed.rank_names(list(range(1, 9))) == "ranks 1, 2, 3, 4, 5 and 3 more's"
    # --out may live elsewhere on each node: two ranks whose --out holds no state.pt yet agree
    assert distributed.disagreements([sent(0.1, "a.json", "four", "new"), sent(0.1, "a.json", "four", "other")]) == []


def test_the_collective_timeout_is_600_s_or_the_variable(monkeypatch):
    assert cli.collective_timeout() == 600
    monkeypatch.setenv("ALIGNER_COLLECTIVE_TIMEOUT", "2.5")
    assert cli.collective_timeout() == 2.5
    for bad in ("0", "-1", "soon", "nan"):
        monkeypatch.setenv("ALIGNER_COLLECTIVE_TIMEOUT", bad)
        with pytest.raises(ValueError, match=f"ALIGNER_COLLECTIVE_TIMEOUT={bad}: not a number of seconds"):
            cli.collective_timeout()


def test_sharded_base_equals_the_whole_one_and_each_rank_holds_half(tmp_path):
    """Each rank reads only its own rows of every weight, holds about half the bytes, and the
    sharded model gives the whole model's logits and the Aligner's gradients (Meta shards: 2).
    RoPE's theta is LLaMA-3's 500000, not the default 10000, which the sharded model must read too."""
    make_checkpoint(tmp_path / "tiny", n_shards=2, rope_theta=500000.0)
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


def test_fsdp_trains_the_one_process_lora(tmp_path):
    """A LoRA (dropout 0: each rank's masks would differ from one process's) trained by SFT on two
    ranks under FSDP ends as the one trained in one process; its B left zero, and it trained."""
    at = SFT.index("--n-tokens")  # an Aligner's shape, which a LoRA has not
    flags = [str(f) for f in SFT[:at] + SFT[at + 2:] + ["--lora", "--lora-rank", "2", "--lora-dropout", "0",
                                                         "--lr", "0.01"]]
    torch.set_num_threads(1)
    train_sft.main([*flags, "--out", str(tmp_path / "one")])
    torchrun(ROOT / "train_sft.py", *flags, "--out", tmp_path / "fsdp", "--fsdp")
    (one, step), (other, other_step) = final_aligner(tmp_path / "one"), final_aligner(tmp_path / "fsdp")
    assert step == other_step == 3
    for key in ("a_q", "b_q", "a_v", "b_v"):
        torch.testing.assert_close(other[key], one[key], rtol=1e-4, atol=1e-5)
    assert one["b_v"].abs().sum() > 0


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
    with rank 1's one-line error and no hang; rank 0, caught in the step, brings state.pt to step 1
    (--save-every is 100), and --resume under FSDP ends the run as the run that never failed."""
    flags = [str(f) for f in SFT]
    torch.set_num_threads(1)
    train_sft.main([*flags, "--out", str(tmp_path / "whole")])
    err = torchrun(ROOT / "tests" / "fsdp_fault.py", *flags, "--out", tmp_path / "failed", "--fsdp", fails=True)
    errors = sorted(line for line in err.splitlines() if " error: " in line)  # each a line of its own
    assert errors in (["train_sft.py: error: rank 1 lost its device at step 2"],  # rank 0 stopped by torchrun
                      ["train_sft.py: error: rank 0: another rank stopped, so this one stops too",
                       "train_sft.py: error: rank 1 lost its device at step 2"])
    assert "exitcode  : 1 (pid" in err  # torchrun's report: rank 1 exited with its code, not aborted
    assert final_aligner(tmp_path / "failed")[1] == 1
    torchrun(ROOT / "train_sft.py", *flags, "--out", tmp_path / "failed", "--fsdp", "--resume")
    same_run(tmp_path / "whole", tmp_path / "failed")


def test_ranks_given_different_runs_stop_together_with_one_line(tmp_path):
    """Each rank given its own file ({rank} in a path), in one launch: rank 1's --data of other
    content (train_sft.py --fsdp), a checkpoint with another layer count (train_dpo.py --fsdp), a
    damaged Aligner file (evaluate.py), a prompts file that is not there (generate.py). Every rank
    stops before the model loads, and the one line that names rank 1 and the input is printed once.
    Then rank 1 never arrives: rank 0 gives up after ALIGNER_COLLECTIVE_TIMEOUT, with its line."""
    for rank, n_layers in ((0, 4), (1, 2)):
        make_checkpoint(tmp_path / f"ckpt-{rank}" / "tiny", n_layers=n_layers)
    data = [tmp_path / f"data-{rank}.json" for rank in (0, 1)]
    text = (DEMO / "data" / "alpaca.json").read_text()
    data[0].write_text(text)
    data[1].write_text(text.replace("a", "e", 1))  # the same size
    Aligner(llama.ModelArgs(**formats.read_params(DEMO / "llama-demo")), n_tokens=1).save(tmp_path / "aligner-0.pt")
    (tmp_path / "aligner-1.pt").write_bytes((tmp_path / "aligner-0.pt").read_bytes()[:100])
    (tmp_path / "prompts-0.txt").write_text("Name a bird.\n")
    sha = lambda path: hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
    params = [tmp_path / f"ckpt-{rank}" / "tiny" / "params.json" for rank in (0, 1)]
    sft = ["--data", tmp_path / "data-{rank}.json", "--out", tmp_path / "sft"] + SFT[4:]
    plan = {"report": str(tmp_path / "codes"), "cases": [
        {"script": "train_sft", "argv": [*SFT[:2], *sft, "--fsdp"]},
        {"script": "train_dpo", "argv": ["--ckpt", tmp_path / "ckpt-{rank}" / "tiny", *DPO[2:], "--fsdp",
                                         "--out", tmp_path / "dpo"]},
        {"script": "evaluate", "argv": ["qa", "--aligner", tmp_path / "aligner-{rank}.pt", "--limit", "2"]},
        {"script": "generate", "argv": ["--prompts-file", tmp_path / "prompts-{rank}.txt"]}],
        "last": {"script": "train_sft", "argv": [*SFT, "--out", tmp_path / "last"]}}
    plan = json.loads(json.dumps(plan, default=str))
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    began = time.perf_counter()
    err = torchrun(ROOT / "tests" / "fsdp_lockstep.py", tmp_path / "plan.json", fails=True,
                   env=torchrun_env(ALIGNER_COLLECTIVE_TIMEOUT="10"))
    assert time.perf_counter() - began < 60
    same = ": every rank must be given the same flags and files"
    expected = [
        f"train_sft.py: error: rank 1's --data differs from rank 0's (sha256 {sha(data[1])}... against "
        f"{sha(data[0])}...){same}",
        f"train_dpo.py: error: rank 1's --ckpt differs from rank 0's (params.json: sha256 {sha(params[1])}... "
        f"against {sha(params[0])}...){same}",
        f"evaluate.py: error: rank 1's --aligner differs from rank 0's (#1: bytes 100 against "
        f"{(tmp_path / 'aligner-0.pt').stat().st_size}){same}",
        f"generate.py: error: rank 1's --prompts-file differs from rank 0's ({tmp_path / 'prompts-1.txt'} against "
        f"a file of 13 bytes){same}",
        "train_sft.py: error: rank 0: waited 10 s for another rank that never came (ALIGNER_COLLECTIVE_TIMEOUT "
        "sets the wait), so this one stops"]
    assert [line for line in err.splitlines() if ".py: error: " in line] == expected, err[-3000:]
    for rank in (0, 1):
        assert json.loads((tmp_path / f"codes.{rank}").read_text()) == [1, 1, 1, 1]
    assert not (tmp_path / "sft").exists() and not (tmp_path / "dpo").exists()


def test_no_rank_outlives_its_launcher(tmp_path):
    """torchrun killed outright (kill -9) while rank 0 waits inside a collective and rank 1 sleeps: both
    end within seconds (each runs in a session of its own, so nothing else would end them)."""
    process = subprocess.Popen(torchrun_command(ROOT / "tests" / "fsdp_orphan.py", tmp_path), env=torchrun_env(),
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    pids = []
    try:
        deadline = time.monotonic() + 90
        while len(list(tmp_path.glob("*.pid"))) < 2:
            assert time.monotonic() < deadline and process.poll() is None, "the ranks did not start"
            time.sleep(0.2)
        time.sleep(1)  # rank 0 into its all-reduce
        pids = [int(p.read_text()) for p in tmp_path.glob("*.pid")]
        process.kill()
        process.wait()
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(pid) for pid in pids)
    finally:
        for pid in [process.pid, *pids]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    """Whether a process runs (a zombie, dead but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.fixture(scope="module")
def demo_aligners(tmp_path_factory):
    """A one-token and a two-token Aligner on the demo model, with gates drawn so that they matter."""
    folder = tmp_path_factory.mktemp("aligners")
    args = llama.ModelArgs(**formats.read_params(DEMO / "llama-demo"))
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
    records = [json.loads(line) for line in (tmp_path / "one" / "qa.jsonl").read_text().splitlines()]
    outputs = [r["output"] for r in records if r["data"].endswith("_ordinary.jsonl")]  # the refusals repeat
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
