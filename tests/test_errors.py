"""A user's mistake never costs them a run and never shows a traceback.

Each case feeds one of the four scripts a bad input through the same path as
`python <script>.py` (cli.run around main, in this process: a subprocess pays
seconds importing torch; a few cases below do run the real `__main__`). Each
asserts that the script fails (exit code not 0), that stderr holds no
traceback and ends in one line that names the culprit (the flag, file, key or
line), and that every file which existed beforehand, the checkpoint included,
is unchanged, and that no file was added.
"""

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from support import build_demo, cli, distributed, formats, trainer
import run_demo
import evaluate
import generate
import llama
import train_dpo
import train_sft
from aligner import Aligner
from support.data import read_sft

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import decode as bench_decode  # noqa: E402
import gpu as bench_gpu  # noqa: E402
import memory as bench_memory  # noqa: E402
import run as bench_run  # noqa: E402

SCRIPTS = {"train_sft": train_sft, "train_dpo": train_dpo, "generate": generate, "evaluate": evaluate,
           "build_demo": build_demo, "run_demo": run_demo, "run": bench_run, "gpu": bench_gpu, "decode": bench_decode,
           "memory": bench_memory}


# -----------------------------------------------------------------------------
# what every case checks

def snapshot(*folders) -> dict:
    """Every file under these folders and its sha256."""
    return {p: hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def run_script(module, argv, capsys):
    """(exit code, stdout, stderr) of `python <module>.py argv`, run in this process."""
    try:
        cli.run(module.main, [str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(err: str) -> str:
    """The last line of stderr: the one that explains the failure."""
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip()]
    assert lines, "nothing on stderr"
    return lines[-1]


def check_failure(code, err, script, culprits, expected_code=None):
    assert code != 0, err
    if expected_code is not None:
        assert code == expected_code, err
    assert "Traceback" not in err
    line = error_line(err)
    assert line.startswith(f"{script}.py: error: "), line
    assert sum(": error: " in l for l in err.splitlines()) == 1, err
    for culprit in culprits:
        assert str(culprit) in line, (culprit, line)
    return line


def fails(script, argv, capsys, *culprits, watch=(), code=None):
    """Run `script` on argv, which is wrong: one line naming each culprit, and the watched
    folders (beside the checkpoint, always watched) left exactly as they were."""
    before = snapshot(*watch)
    status, _, err = run_script(SCRIPTS[script], argv, capsys)
    line = check_failure(status, err, script, culprits, code)
    assert snapshot(*watch) == before, "a file changed, appeared or went"
    return line


# -----------------------------------------------------------------------------
# a tiny world: checkpoint, data and runs

@pytest.fixture
def ckpt(tiny_ckpt, tmp_path):
    """A private copy of the tiny checkpoint that a case may damage; tokenizer.model beside it."""
    folder = tmp_path / "ckpt" / "tiny"
    shutil.copytree(tiny_ckpt, folder)
    shutil.copy(tiny_ckpt.parent / "tokenizer.model", folder.parent / "tokenizer.model")
    return folder


@pytest.fixture(scope="module")
def model_args(tiny_ckpt):
    return llama.ModelArgs(**formats.read_params(tiny_ckpt))


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def sft_data(folder, n=6):
    return write_jsonl(Path(folder) / "sft.jsonl", [{"prompt": f"Question: fox {i}? Answer:",
                                                     "response": " A robin is a bird."} for i in range(n)])


def dpo_data(folder, n=6):
    return write_jsonl(Path(folder) / "dpo.jsonl", [{"prompt": f"Question: fox {i}? Answer:", "chosen": " A bird.",
                                                     "rejected": " A fish, a fox, a dog."} for i in range(n)])


def sft_args(ckpt, data, out, *extra):
    return [str(a) for a in ("--ckpt", ckpt, "--data", data, "--out", out, "--n-tokens", "1", "--val", "2",
                             "--batch-size", "2", "--epochs", "2", "--max-seq-len", "64", *extra)]


def dpo_args(ckpt, data, out, *extra):
    return [str(a) for a in ("--ckpt", ckpt, "--data", data, "--out", out, "--val", "2", "--batch-size", "2",
                             "--epochs", "1", "--max-seq-len", "64", *extra)]


@pytest.fixture(scope="module")
def finished(tiny_ckpt, tmp_path_factory):
    """A finished SFT run: its data and its --out, to be copied before a case touches them."""
    folder = tmp_path_factory.mktemp("finished")
    data = sft_data(folder)
    train_sft.main(sft_args(tiny_ckpt, data, folder / "run"))
    return data, folder / "run"


@pytest.fixture
def run(finished, tmp_path):
    """A private copy of the finished run and its data: (data, out)."""
    data, out = finished
    shutil.copy(data, tmp_path / "sft.jsonl")
    shutil.copytree(out, tmp_path / "run")
    return tmp_path / "sft.jsonl", tmp_path / "run"


def aligner_file(path, args, **change):
    """An Aligner file of this project, with some entries of its dict replaced."""
    torch.manual_seed(0)
    aligner = Aligner(args, n_tokens=1)
    state = {"n_tokens": 1, "start_layer": 2, "base": aligner.base, "prefix": aligner.prefix.detach(),
             "gates": aligner.gates.detach() + 0.1}
    state.update(change)
    torch.save(state, path)
    return path


# -----------------------------------------------------------------------------
# 1. numbers are range-checked as the flags are parsed, before anything loads

SFT_FLAGS = [
    ("--n-tokens", "0"), ("--n-tokens", "-1"), ("--n-tokens", "two"), ("--start-layer", "-1"),
    ("--lr", "0"), ("--lr", "-1e-3"), ("--lr", "nan"), ("--lr", "inf"), ("--lr", "fast"),
    ("--weight-decay", "-0.1"), ("--batch-size", "0"), ("--batch-size", "-4"), ("--batch-size", "2.5"),
    ("--micro-batch-size", "0"), ("--epochs", "0"), ("--epochs", "-1"), ("--warmup-epochs", "-1"),
    ("--warmup-epochs", "nan"), ("--max-seq-len", "0"), ("--val", "abc"), ("--val", "1.5"), ("--val", "-3"),
    ("--val", "1.0"), ("--seed", "-1"), ("--seed", "x"), ("--seed", str(2 ** 32)), ("--save-every", "0"),
    ("--max-steps", "0"),
    ("--device", "gpu"), ("--device", "cuda:x"), ("--dtype", "float64"),
]


@pytest.mark.parametrize("flag, value", SFT_FLAGS)
def test_train_sft_refuses_an_out_of_range_flag(flag, value, capsys, tmp_path):
    fails("train_sft", ["--out", tmp_path / "run", flag, value], capsys, f"argument {flag}", watch=[tmp_path],
          code=2)


@pytest.mark.parametrize("flag, value", [("--beta", "0"), ("--beta", "-1"), ("--label-smoothing", "0.5"),
                                         ("--label-smoothing", "-0.1"), ("--label-smoothing", "1"),
                                         ("--loss", "kto"), ("--pair", "worse"), ("--epochs", "0"),
                                         ("--batch-size", "0"), ("--n-tokens", "0"), ("--max-response-len", "0"),
                                         ("--max-response-len", "-2"), ("--max-response-len", "1.5")])
def test_train_dpo_refuses_an_out_of_range_flag(flag, value, capsys, tmp_path):
    fails("train_dpo", ["--out", tmp_path / "run", flag, value], capsys, f"argument {flag}", watch=[tmp_path],
          code=2)


@pytest.mark.parametrize("flag, value", [("--temperature", "-1"), ("--temperature", "nan"), ("--top-k", "-3"),
                                         ("--top-p", "0"), ("--top-p", "1.5"), ("--top-p", "-0.1"),
                                         ("--max-new-tokens", "-5"), ("--max-new-tokens", "0"),
                                         ("--max-seq-len", "0"), ("--seed", "-1"), ("--template", "chat"),
                                         ("--device", "tpu"), ("--device", "meta"), ("--dtype", "int8")])
def test_generate_refuses_an_out_of_range_flag(flag, value, capsys, tmp_path):
    fails("generate", ["--prompt", "Hi.", "--out", tmp_path / "a.jsonl", flag, value], capsys,
          f"argument {flag}", watch=[tmp_path], code=2)


@pytest.mark.parametrize("flag, value", [("--limit", "0"), ("--limit", "-2"), ("--shots", "-1"),
                                         ("--batch-size", "0"), ("--max-new-tokens", "0"), ("--max-seq-len", "0"),
                                         ("--seed", "x"), ("--shots", "many")])
def test_evaluate_refuses_an_out_of_range_flag(flag, value, capsys, tmp_path):
    fails("evaluate", ["qa", "--out", tmp_path / "eval", flag, value], capsys, f"argument {flag}",
          watch=[tmp_path], code=2)


@pytest.mark.parametrize("script, flag, value", [
    ("build_demo", "--steps", "0"), ("build_demo", "--seed", "-1"), ("run_demo", "--jobs", "0"), ("run", "--steps", "0"), ("run", "--batch", "-1"),
    ("run", "--seq-len", "0"), ("run", "--threads", "0"), ("run", "--warmup", "-1"), ("gpu", "--batch", "0"),
    ("gpu", "--seq-len", "x"), ("decode", "--steps", "0"), ("decode", "--repeats", "0"), ("decode", "--threads", "-2"),
    ("memory", "--batch", "0"), ("memory", "--n-tokens", "0"), ("memory", "--start-layer", "-1")])
def test_the_other_scripts_refuse_an_out_of_range_flag(script, flag, value, capsys, tmp_path):
    fails(script, [flag, value], capsys, f"argument {flag}", watch=[tmp_path], code=2)


def test_build_demo_never_writes_among_other_files(run, capsys, tmp_path, monkeypatch):
    """A world written into a training run's folder would mix with it: refused before any work."""
    monkeypatch.setattr(build_demo, "build", lambda *a, **k: pytest.fail("the build started"))
    _, out = run
    fails("build_demo", ["--out", out], capsys, "--out", str(out), "other files", watch=[tmp_path])
    (tmp_path / "file").write_text("mine")
    fails("build_demo", ["--out", tmp_path / "file" / "world"], capsys, "--out", "is a file", watch=[tmp_path])


def test_build_demo_knowledge_needs_a_world_to_add_to(capsys, tmp_path):
    """--knowledge writes beside a world's tokenizer: into a folder without one, nothing is written."""
    (tmp_path / "empty").mkdir()
    fails("build_demo", ["--knowledge", "--out", tmp_path / "empty"], capsys, "--out", "tokenizer.model",
          watch=[tmp_path])


def test_run_demo_never_replaces_runs_unasked(capsys, tmp_path, monkeypatch):
    """The demo's pipeline into a runs/ that already holds one of its runs: refused before any command starts."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run_demo, "run_steps", lambda *a, **k: pytest.fail("a command started"))
    (tmp_path / "runs" / "sft1").mkdir(parents=True)
    fails("run_demo", [], capsys, "runs/sft1", "--overwrite", watch=[tmp_path])


def test_run_demo_names_a_results_file_it_cannot_read(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "eval-qa").mkdir(parents=True)
    (tmp_path / "runs" / "eval-qa" / "results.json").write_text('{"ckpt": "x"}')
    fails("run_demo", ["--table"], capsys, "runs/eval-qa/results.json", "not an evaluate.py results file",
          watch=[tmp_path])


def test_evaluate_refuses_an_unknown_task(capsys):
    fails("evaluate", ["arithmetic"], capsys, "argument task", code=2)


def test_evaluate_refuses_no_room_for_a_prompt(capsys, tiny_ckpt):
    fails("evaluate", ["qa", "--ckpt", tiny_ckpt, "--max-new-tokens", "300", "--max-seq-len", "256"], capsys,
          "--max-new-tokens 300", "--max-seq-len 256", code=2)


def test_fsdp_without_torchrun_is_refused(tiny_ckpt, capsys):
    fails("generate", ["--ckpt", tiny_ckpt, "--prompt", "Hi.", "--fsdp"], capsys, "--fsdp", "torchrun")


def test_resume_and_overwrite_together_are_refused(capsys, tmp_path):
    fails("train_sft", ["--out", tmp_path, "--resume", "--overwrite"], capsys, "--overwrite", "--resume",
          watch=[tmp_path], code=2)


def test_a_cuda_device_on_a_machine_without_one_is_refused(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fails("generate", ["--device", "cuda", "--prompt", "Hi."], capsys, "argument --device", "no CUDA", code=2)


def test_a_device_this_machine_lacks_is_refused(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert cli.device("cuda:1") == "cuda:1"
    fails("generate", ["--device", "cuda:2", "--prompt", "Hi."], capsys, "argument --device", "2 CUDA devices",
          code=2)
    fails("generate", ["--device", "mps", "--prompt", "Hi."], capsys, "argument --device", "no MPS device", code=2)


def test_a_checkpoint_without_data_is_refused(capsys, tiny_ckpt):
    fails("train_sft", ["--ckpt", tiny_ckpt], capsys, "--data is required with --ckpt", code=2)


def test_place_defaults_to_float32_on_cpu_and_bfloat16_on_each_ranks_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = argparse.Namespace()
    assert cli.place(args) == (torch.device("cpu"), torch.float32)
    assert (args.device, args.dtype) == ("cpu", "float32")  # recorded as the run's settings
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert cli.place(argparse.Namespace()) == (torch.device("cuda", 3), torch.bfloat16)
    assert cli.place(argparse.Namespace(device="cuda:1")) == (torch.device("cuda", 1), torch.bfloat16)
    assert cli.place(argparse.Namespace(device="cpu", dtype="bfloat16")) == (torch.device("cpu"), torch.bfloat16)


def test_the_flag_types_accept_their_whole_range():
    assert cli.split_size("0.05") == "0.05" and cli.split_size("0") == "0" and cli.split_size("500") == "500"
    assert cli.smoothing("0") == 0 and cli.smoothing("0.49") == 0.49
    assert cli.probability("1") == 1.0 and cli.probability("1e-9") == 1e-9
    assert cli.non_negative_int("0") == 0 and cli.positive_int("7") == 7
    assert cli.seed("0") == 0 and cli.seed(str(2 ** 32 - 1)) == 2 ** 32 - 1
    assert cli.non_negative_float("0") == 0.0 and cli.positive_float("1e-4") == 1e-4


# -----------------------------------------------------------------------------
# 2. a finished run is never destroyed

@pytest.mark.parametrize("script", ["train_sft", "train_dpo"])
def test_a_finished_run_is_refused_without_resume_or_overwrite(script, run, tiny_ckpt, capsys, tmp_path):
    data, out = run
    args = sft_args(tiny_ckpt, data, out) if script == "train_sft" else dpo_args(tiny_ckpt, dpo_data(tmp_path), out)
    fails(script, args, capsys, str(out), "--resume", "--overwrite", watch=[tmp_path, tiny_ckpt.parent])


def test_an_unfinished_run_without_state_is_refused_too(tmp_path, tiny_ckpt, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 0, "epoch": 0, "val_loss": 3.0}\n')
    fails("train_sft", sft_args(tiny_ckpt, sft_data(tmp_path), tmp_path / "run"), capsys, "--overwrite",
          watch=[tmp_path])


def test_overwrite_removes_the_old_run_and_nothing_else(run, tiny_ckpt, capsys):
    data, out = run
    (out / "epoch-7.pt").write_bytes(b"from a longer run")
    (out / "notes.txt").write_text("mine")
    (out / "keep").mkdir()
    (out / "keep" / "best.pt").write_bytes(b"not the run's")
    code, _, err = run_script(train_sft, sft_args(tiny_ckpt, data, out, "--epochs", "1", "--overwrite"), capsys)
    assert code == 0, err
    assert not (out / "epoch-7.pt").exists() and not (out / "epoch-2.pt").exists()
    assert (out / "notes.txt").read_text() == "mine" and (out / "keep" / "best.pt").read_bytes() == b"not the run's"
    assert (out / "epoch-1.pt").is_file() and (out / "best.pt").is_file()
    assert json.loads((out / "settings.json").read_text())["epochs"] == 1


def test_resume_without_state_names_state_pt(tmp_path, tiny_ckpt, capsys):
    fails("train_sft", sft_args(tiny_ckpt, sft_data(tmp_path), tmp_path / "run", "--resume"), capsys,
          "state.pt", "nothing to resume", watch=[tmp_path])


@pytest.mark.parametrize("flag, value", [("--lr", "0.5"), ("--seed", "3"), ("--n-tokens", "2"), ("--val", "3"),
                                         ("--dtype", "bfloat16")])
def test_resume_with_other_settings_names_them(flag, value, run, tiny_ckpt, capsys, tmp_path):
    data, out = run
    fails("train_sft", sft_args(tiny_ckpt, data, out, "--resume", flag, value), capsys, "state.pt", flag,
          watch=[tmp_path])


@pytest.mark.parametrize("word", ["crow", "raven"], ids=["another size", "the same size"])
def test_resume_with_other_data_names_data(word, run, tiny_ckpt, capsys, tmp_path):
    data, out = run
    data.write_text(data.read_text().replace("robin", word))
    fails("train_sft", sft_args(tiny_ckpt, data, out, "--resume"), capsys, "--data's content", watch=[tmp_path])


def test_resume_with_another_checkpoint_names_ckpt(run, ckpt, capsys, tmp_path):
    data, out = run
    params = json.loads((ckpt / "params.json").read_text())
    (ckpt / "params.json").write_text(json.dumps({**params, "norm_eps": 1e-6}))
    fails("train_sft", sft_args(ckpt, data, out, "--resume"), capsys, "--ckpt's content", watch=[tmp_path])


def test_a_moved_run_resumes_to_the_same_aligner(finished, tiny_ckpt, tmp_path, capsys, monkeypatch):
    """Stopped, then moved with its data and checkpoint, then resumed: the Aligner of the run that never stopped."""
    data, reference = finished
    first = tmp_path / "first"
    shutil.copy(data, tmp_path / "sft.jsonl")
    assert run_script(train_sft, sft_args(tiny_ckpt, tmp_path / "sft.jsonl", first / "run", "--max-steps", "3"),
                      capsys)[0] == 0
    moved = tmp_path / "elsewhere"
    shutil.move(first, moved)
    shutil.copytree(tiny_ckpt.parent, tmp_path / "ckpt-copy")
    (tmp_path / "data").mkdir()
    shutil.move(tmp_path / "sft.jsonl", tmp_path / "data" / "sft.jsonl")
    monkeypatch.chdir(tmp_path)  # paths spelled relative this time
    code, _, err = run_script(train_sft, sft_args("ckpt-copy/tiny", "data/../data/sft.jsonl", "elsewhere/run",
                                                  "--resume"), capsys)
    assert code == 0, err
    for name in ("best.pt", "epoch-2.pt"):
        a, b = torch.load(moved / "run" / name, weights_only=True), torch.load(reference / name, weights_only=True)
        assert torch.equal(a["prefix"], b["prefix"]) and torch.equal(a["gates"], b["gates"]), name


def test_a_torn_metrics_line_is_dropped_on_resume(finished, tiny_ckpt, tmp_path, capsys):
    data, reference = finished
    out = tmp_path / "run"
    assert run_script(train_sft, sft_args(tiny_ckpt, data, out, "--max-steps", "3"), capsys)[0] == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "epoch": 2.0, "lo')  # a kill in the middle of a write
    code, _, err = run_script(train_sft, sft_args(tiny_ckpt, data, out, "--resume"), capsys)
    assert code == 0, err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [r["step"] for r in expected]
    assert [r.get("loss") for r in records] == [r.get("loss") for r in expected]


def test_a_run_whose_metrics_log_is_gone_resumes_with_a_new_one(finished, tiny_ckpt, tmp_path, capsys):
    data, _ = finished
    out = tmp_path / "run"
    assert run_script(train_sft, sft_args(tiny_ckpt, data, out, "--max-steps", "3"), capsys)[0] == 0
    (out / "metrics.jsonl").unlink()
    code, _, err = run_script(train_sft, sft_args(tiny_ckpt, data, out, "--resume"), capsys)
    assert code == 0, err
    assert [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()] == [4, 4]


def test_lines_past_the_saved_step_are_dropped_on_resume(finished, tiny_ckpt, tmp_path, capsys):
    data, _ = finished
    out = tmp_path / "run"
    assert run_script(train_sft, sft_args(tiny_ckpt, data, out, "--max-steps", "3"), capsys)[0] == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 9, "epoch": 4.5, "loss": 1.0}) + "\n")  # logged, then killed before a save
    trainer.trim_metrics(out / "metrics.jsonl", 3)
    assert max(json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()) == 3


def test_a_damaged_metrics_line_before_the_last_is_named(run, tiny_ckpt, capsys, tmp_path):
    data, out = run
    lines = (out / "metrics.jsonl").read_text().splitlines()
    lines[1] = "garbage"
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    fails("train_sft", sft_args(tiny_ckpt, data, out, "--resume"), capsys, "metrics.jsonl, line 2", watch=[tmp_path])


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "not a state"])
def test_an_unreadable_state_pt_is_named(damage, run, tiny_ckpt, capsys, tmp_path):
    data, out = run
    damage_file(out / "state.pt", damage)
    fails("train_sft", sft_args(tiny_ckpt, data, out, "--resume"), capsys, "state.pt", watch=[tmp_path])


def test_a_state_pt_holding_nan_is_refused(run, tiny_ckpt, capsys, tmp_path):
    data, out = run
    state = torch.load(out / "state.pt", weights_only=True)
    state["aligner"]["prefix"][0, 0] = math.nan
    torch.save(state, out / "state.pt")
    fails("train_sft", sft_args(tiny_ckpt, data, out, "--resume"), capsys, "state.pt", "prefix", "NaN",
          watch=[tmp_path])


def test_the_demo_pipeline_in_the_docs_never_writes_into_one_folder_twice():
    """Following the README's quick start and then the demo pipeline of docs/demo.md: every training run
    has its own --out, and DPO starts from one of the pipeline's SFT runs: a one-token Aligner's, or a LoRA's."""
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start")[1].split("##")[0]
    demo = (ROOT / "docs" / "demo.md").read_text()
    pipeline = demo.split("The pipeline, as `python run_demo.py` runs it")[1].split("```bash\n")[1].split("```")[0]
    commands = [line.split("#")[0].split("&&")[-1].split() for block in (quick, pipeline)
                for line in block.splitlines() if re.match(r".*python train_(sft|dpo)\.py", line)]
    defaults = {"train_sft.py": "runs/sft", "train_dpo.py": "runs/dpo"}
    outs, sft_outs = [], {}
    for words in commands:
        script = next(w for w in words if w.startswith("train_"))
        out = words[words.index("--out") + 1] if "--out" in words else defaults[script]
        outs.append(out)
        if script == "train_sft.py":
            n_tokens = words[words.index("--n-tokens") + 1] if "--n-tokens" in words else "10"
            kind = "lora" if "--lora" in words else "prompt" if "--prompt-tuning" in words else "aligner"
            sft_outs[out] = "lora" if kind == "lora" else f"{kind} {n_tokens}"
        else:  # an Aligner's DPO from a one-token Aligner, a LoRA's from a LoRA
            assert words[words.index("--init-aligner") + 1] in {
                f"{o}/best.pt" for o, what in sft_outs.items() if o != "runs/sft" and what in ("aligner 1", "lora")}
    assert len(commands) == 17 and len(set(outs)) == len(outs), outs


def test_ci_runs_the_readmes_test_command():
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start")[1].split("```")[1]
    test_command = quick.splitlines()[2].split("#")[0].strip()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command == "python -m pytest -q" and ci[-1] == test_command
    assert "torch==2.13.0" in quick and any("pip install -q torch==2.13.0" in line for line in ci)


# -----------------------------------------------------------------------------
# 3. unreadable files are named

def damage_file(path, damage):
    path = Path(path)
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00garbage\xff" * 50)
    elif damage == "not a state":
        torch.save({"weights": torch.ones(2)}, path)
    elif damage == "a list":
        torch.save([torch.ones(2)], path)
    elif damage == "a pickled object":
        torch.save({"x": torch.ones(1), "f": Path("x")}, path)  # weights_only refuses the object
    else:
        raise ValueError(damage)


SHARD_DAMAGE = ["empty", "truncated", "garbage", "a list", "a pickled object"]


@pytest.mark.parametrize("damage", SHARD_DAMAGE)
def test_generate_names_a_damaged_shard(damage, ckpt, capsys, tmp_path):
    damage_file(ckpt / "consolidated.00.pth", damage)
    fails("generate", ["--ckpt", ckpt, "--prompt", "Hi."], capsys, "consolidated.00.pth", watch=[tmp_path])


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_train_sft_names_a_damaged_shard_and_writes_nothing(damage, ckpt, capsys, tmp_path):
    damage_file(ckpt / "consolidated.00.pth", damage)
    fails("train_sft", sft_args(ckpt, sft_data(tmp_path), tmp_path / "run"), capsys, "consolidated.00.pth",
          watch=[tmp_path])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage", ["empty", "garbage"])
def test_evaluate_names_a_damaged_shard(damage, ckpt, capsys, tmp_path):
    damage_file(ckpt / "consolidated.00.pth", damage)
    data = write_jsonl(tmp_path / "qa.jsonl", [{"instruction": "Hi?", "output": "Hello."}])
    fails("evaluate", ["qa", "--ckpt", ckpt, "--data", data], capsys, "consolidated.00.pth", watch=[tmp_path])


@pytest.mark.parametrize("damage", ["empty", "garbage", "truncated"])
@pytest.mark.parametrize("script", ["generate", "evaluate"])
def test_a_damaged_tokenizer_is_named(damage, script, ckpt, capsys, tmp_path):
    damage_file(ckpt.parent / "tokenizer.model", damage)
    data = write_jsonl(tmp_path / "qa.jsonl", [{"instruction": "Hi?", "output": "Hello."}])
    argv = ["--ckpt", ckpt, "--prompt", "Hi."] if script == "generate" else ["qa", "--ckpt", ckpt, "--data", data]
    fails(script, argv, capsys, "tokenizer.model", watch=[tmp_path])


def test_a_checkpoint_folder_that_is_not_there_is_named(capsys, tmp_path):
    fails("generate", ["--ckpt", tmp_path / "llama-2-7b", "--prompt", "Hi."], capsys, "llama-2-7b")


def test_a_checkpoint_without_shards_is_named(ckpt, capsys):
    (ckpt / "consolidated.00.pth").unlink()
    fails("generate", ["--ckpt", ckpt, "--prompt", "Hi."], capsys, "consolidated.*.pth")


PARAMS = [({"dim": "128"}, "'dim'"), ({"n_layers": 0}, "'n_layers'"), ({"n_heads": 3.5}, "'n_heads'"),
          ({"norm_eps": "1e-5"}, "'norm_eps'"), ({"dim": None}, "'dim'"), ({"n_layers": True}, "'n_layers'"),
          ({"vocab_size": 0}, "'vocab_size'"), ({"rope_theta": -1}, "'rope_theta'"),
          ({"n_kv_heads": 3}, "n_kv_heads"), ({"multiple_of": [32]}, "'multiple_of'"),
          ({"use_scaled_rope": True}, "'use_scaled_rope'")]


@pytest.mark.parametrize("change, key", PARAMS)
def test_a_wrong_params_json_value_names_the_file_and_key(change, key, ckpt, capsys, tmp_path):
    path = ckpt / "params.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    fails("generate", ["--ckpt", ckpt, "--prompt", "Hi."], capsys, "params.json", key, watch=[tmp_path])


def test_a_vocab_size_that_is_not_the_tokenizers_is_named(ckpt, capsys):
    path = ckpt / "params.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "vocab_size": 999}))
    fails("generate", ["--ckpt", ckpt, "--prompt", "Hi."], capsys, "vocab_size 999", "tokenizer.model", "384")


@pytest.mark.parametrize("text", ["[1, 2]", "{\"dim\": 64,", "", "\xff\xfe{}"])
def test_a_params_json_that_is_not_an_object_is_named(text, ckpt, capsys):
    (ckpt / "params.json").write_bytes(text.encode("latin-1"))
    fails("generate", ["--ckpt", ckpt, "--prompt", "Hi."], capsys, "params.json")


@pytest.fixture
def hf_ckpt(tiny_ckpt, tmp_path):
    """The tiny checkpoint as a Hugging Face folder (config.json, model.safetensors, tokenizer.model)."""
    from hf_layout import write_hf

    model, _ = formats.load(tiny_ckpt)
    return write_hf(model.state_dict(), model.args, tmp_path / "hf", tokenizer=tiny_ckpt.parent / "tokenizer.model")


@pytest.mark.parametrize("change, culprit", [({"hidden_size": "64"}, "hidden_size"), ({"num_hidden_layers": 0},
                                             "num_hidden_layers"), ({"rms_norm_eps": None}, "rms_norm_eps")])
def test_a_wrong_config_json_value_names_the_file_and_key(change, culprit, hf_ckpt, capsys, tmp_path):
    path = hf_ckpt / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    fails("generate", ["--ckpt", hf_ckpt, "--prompt", "Hi."], capsys, "config.json", culprit, watch=[tmp_path])


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_a_damaged_safetensors_file_is_named(damage, hf_ckpt, capsys, tmp_path):
    damage_file(hf_ckpt / "model.safetensors", damage)
    fails("generate", ["--ckpt", hf_ckpt, "--prompt", "Hi."], capsys, "model.safetensors", watch=[tmp_path])


ALIGNER_DAMAGE = ["empty", "truncated", "garbage", "not a state", "a list", "a pickled object"]


@pytest.mark.parametrize("damage", ALIGNER_DAMAGE)
def test_generate_names_a_damaged_aligner_file(damage, tiny_ckpt, model_args, capsys, tmp_path):
    path = aligner_file(tmp_path / "sft.pt", model_args)
    damage_file(path, damage)
    fails("generate", ["--ckpt", tiny_ckpt, "--aligner", path, "--prompt", "Hi."], capsys, "sft.pt",
          watch=[tmp_path])


@pytest.mark.parametrize("damage", ["empty", "garbage", "truncated"])
def test_evaluate_names_a_damaged_aligner_file(damage, tiny_ckpt, model_args, capsys, tmp_path):
    path = aligner_file(tmp_path / "sft.pt", model_args)
    damage_file(path, damage)
    data = write_jsonl(tmp_path / "qa.jsonl", [{"instruction": "Hi?", "output": "Hello."}])
    fails("evaluate", ["qa", "--ckpt", tiny_ckpt, "--data", data, "--aligner", "base", "--aligner", path], capsys,
          "sft.pt", watch=[tmp_path])


@pytest.mark.parametrize("flag", ["--init-aligner", "--reference"])
@pytest.mark.parametrize("damage", ["empty", "garbage"])
def test_train_dpo_names_a_damaged_aligner_file_before_the_base_loads(flag, damage, tiny_ckpt, model_args,
                                                                      capsys, tmp_path, monkeypatch):
    path = aligner_file(tmp_path / "sft.pt", model_args)
    damage_file(path, damage)
    monkeypatch.setattr(trainer, "load", lambda *a, **k: pytest.fail("the base model loaded"))
    fails("train_dpo", dpo_args(tiny_ckpt, dpo_data(tmp_path), tmp_path / "run", flag, path), capsys, "sft.pt",
          watch=[tmp_path])


@pytest.mark.parametrize("script", ["generate", "evaluate"])
def test_a_damaged_aligner_file_is_named_before_the_model_loads(script, tiny_ckpt, model_args, capsys, tmp_path,
                                                                 monkeypatch):
    path = aligner_file(tmp_path / "sft.pt", model_args)
    damage_file(path, "garbage")
    monkeypatch.setattr(SCRIPTS[script], "load", lambda *a, **k: pytest.fail("the model loaded"))
    data = write_jsonl(tmp_path / "qa.jsonl", [{"instruction": "Hi?", "output": "Hello."}])
    argv = {"generate": ["--prompt", "Hi."], "evaluate": ["qa", "--data", data]}[script]
    fails(script, [*argv, "--ckpt", tiny_ckpt, "--aligner", path], capsys, "sft.pt", watch=[tmp_path])


@pytest.mark.parametrize("script", ["generate", "evaluate"])
def test_compile_under_fsdp_is_refused_before_the_model_loads(script, tiny_ckpt, capsys, monkeypatch):
    monkeypatch.setattr(SCRIPTS[script], "load", lambda *a, **k: pytest.fail("the model loaded"))
    argv = {"generate": ["--prompt", "Hi."], "evaluate": ["qa"]}[script]
    fails(script, [*argv, "--ckpt", tiny_ckpt, "--compile", "--fsdp"], capsys, "--compile", "--fsdp")


NON_FINITE = [("prefix", math.nan, "NaN"), ("prefix", math.inf, "infinite"), ("gates", -math.inf, "infinite"),
              ("gates", math.nan, "NaN"), ("prefix", 1e37, "exploded"), ("gates", -3e12, "exploded")]


@pytest.mark.parametrize("key, value, word", NON_FINITE)
def test_an_aligner_file_with_non_finite_or_exploded_values_is_refused(key, value, word, tiny_ckpt, model_args,
                                                                       capsys, tmp_path):
    torch.manual_seed(0)
    tensor = torch.randn(1, model_args.dim) if key == "prefix" else torch.zeros(model_args.n_layers - 2,
                                                                                model_args.n_heads)
    tensor[0, 1] = value
    path = aligner_file(tmp_path / "bad.pt", model_args, **{key: tensor})
    fails("generate", ["--ckpt", tiny_ckpt, "--aligner", path, "--prompt", "Hi."], capsys, "bad.pt", key, word,
          watch=[tmp_path])


@pytest.mark.parametrize("script", ["evaluate", "train_dpo"])
def test_a_nan_aligner_is_refused_by_every_script(script, tiny_ckpt, model_args, capsys, tmp_path):
    prefix = torch.full((1, model_args.dim), math.nan)
    path = aligner_file(tmp_path / "bad.pt", model_args, prefix=prefix)
    if script == "evaluate":
        data = write_jsonl(tmp_path / "qa.jsonl", [{"instruction": "Hi?", "output": "Hello."}])
        argv = ["qa", "--ckpt", tiny_ckpt, "--data", data, "--aligner", path]
    else:
        argv = dpo_args(tiny_ckpt, dpo_data(tmp_path), tmp_path / "run", "--init-aligner", path)
    fails(script, argv, capsys, "bad.pt", "NaN", watch=[tmp_path])


def test_an_aligner_with_a_non_tensor_prefix_is_named(tiny_ckpt, model_args, capsys, tmp_path):
    path = aligner_file(tmp_path / "odd.pt", model_args, prefix=[0.0] * model_args.dim)
    fails("generate", ["--ckpt", tiny_ckpt, "--aligner", path, "--prompt", "Hi."], capsys, "odd.pt", "prefix")


def test_an_aligner_for_another_base_is_named(tiny_ckpt, capsys, tmp_path):
    other = llama.ModelArgs(dim=32, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=384)
    Aligner(other, n_tokens=1).save(tmp_path / "other.pt")
    fails("generate", ["--ckpt", tiny_ckpt, "--aligner", tmp_path / "other.pt", "--prompt", "Hi."], capsys,
          "other.pt", "base")


@pytest.mark.parametrize("script", ["generate", "evaluate"])
def test_a_missing_aligner_file_is_named_before_the_model_loads(script, tiny_ckpt, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(SCRIPTS[script], "load", lambda *a, **k: pytest.fail("the model loaded"))
    argv = ["--ckpt", tiny_ckpt, "--aligner", tmp_path / "nope.pt", "--prompt", "Hi."] if script == "generate" \
        else ["qa", "--ckpt", tiny_ckpt, "--aligner", tmp_path / "nope.pt"]
    fails(script, argv, capsys, "--aligner", "nope.pt")


# -----------------------------------------------------------------------------
# 4. data files: named by file and line, before any model loads where they can be

@pytest.mark.parametrize("script", ["train_sft", "train_dpo"])
def test_non_utf8_training_data_names_the_file_and_line(script, tiny_ckpt, capsys, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n')
    args = sft_args if script == "train_sft" else dpo_args
    fails(script, args(tiny_ckpt, data, tmp_path / "run"), capsys, "data.jsonl, line 2", "UTF-8",
          watch=[tmp_path])


@pytest.mark.parametrize("script", ["train_sft", "train_dpo"])
def test_a_missing_data_file_is_named_not_called_an_unbuilt_demo(script, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "load", lambda *a, **k: pytest.fail("the base model loaded"))
    line = fails(script, ["--data", tmp_path / "mine.json", "--out", tmp_path / "run"], capsys, "--data",
                 "mine.json", watch=[tmp_path])
    assert "build_demo" not in line


def test_a_byte_order_mark_is_not_part_of_the_data(tmp_path):
    records = [{"instruction": "a", "output": "b"}]
    (tmp_path / "plain.json").write_text(json.dumps(records), encoding="utf-8")
    (tmp_path / "bom.json").write_text(json.dumps(records), encoding="utf-8-sig")
    assert (tmp_path / "bom.json").read_bytes()[:3] == b"\xef\xbb\xbf"
    assert read_sft(tmp_path / "bom.json") == read_sft(tmp_path / "plain.json")


def test_a_data_folder_is_named(capsys, tmp_path, tiny_ckpt):
    fails("train_sft", sft_args(tiny_ckpt, tmp_path, tmp_path / "run"), capsys, "--data", "a folder")


@pytest.mark.parametrize("text, where", [("", "no records"), ("[]", "no records"), ("{\"prompt\": 1}", "line 1"),
                                         ("[{\"instruction\": \"a\"}]", "record 0")])
def test_empty_or_wrong_sft_data_is_named(text, where, tiny_ckpt, capsys, tmp_path):
    (tmp_path / "d.json").write_text(text)
    fails("train_sft", sft_args(tiny_ckpt, tmp_path / "d.json", tmp_path / "run"), capsys, "d.json", where,
          watch=[tmp_path])
    assert not (tmp_path / "run").exists()


def test_a_val_split_that_leaves_nothing_to_train_is_named(tiny_ckpt, capsys, tmp_path):
    fails("train_sft", sft_args(tiny_ckpt, sft_data(tmp_path), tmp_path / "run", "--val", "6"), capsys, "--val 6",
          watch=[tmp_path])


def test_examples_whose_prompt_fills_max_seq_len_are_named(tiny_ckpt, capsys, tmp_path):
    fails("train_sft", sft_args(tiny_ckpt, sft_data(tmp_path), tmp_path / "run", "--max-seq-len", "2"), capsys,
          "--max-seq-len 2", watch=[tmp_path])


@pytest.mark.parametrize("script", ["train_sft", "train_dpo"])
def test_a_start_layer_past_the_model_is_named_before_training(script, tiny_ckpt, capsys, tmp_path):
    args = sft_args if script == "train_sft" else dpo_args
    data = sft_data(tmp_path) if script == "train_sft" else dpo_data(tmp_path)
    fails(script, args(tiny_ckpt, data, tmp_path / "run", "--start-layer", "4"), capsys, "--start-layer 4",
          "4 layers", watch=[tmp_path])
    assert not (tmp_path / "run").exists()


def test_non_utf8_prompts_file_is_named(tiny_ckpt, capsys, tmp_path):
    (tmp_path / "p.txt").write_bytes(b"Name a bird.\n\xff\xfe\n")
    fails("generate", ["--ckpt", tiny_ckpt, "--prompts-file", tmp_path / "p.txt"], capsys, "p.txt, line 2",
          watch=[tmp_path])


@pytest.mark.parametrize("text, culprit", [('{"instruction": 3}\n', "line 1"), ('{"instruction": "a", "input": 5}\n',
                                                                                 "line 1"), ("\n\n", "no prompts")])
def test_a_bad_prompts_file_is_named(text, culprit, tiny_ckpt, capsys, tmp_path):
    (tmp_path / "p.jsonl").write_text(text)
    fails("generate", ["--ckpt", tiny_ckpt, "--prompts-file", tmp_path / "p.jsonl"], capsys, "p.jsonl", culprit)


def test_a_missing_prompts_file_is_named_before_the_model_loads(tiny_ckpt, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(generate, "load", lambda *a, **k: pytest.fail("the model loaded"))
    fails("generate", ["--ckpt", tiny_ckpt, "--prompts-file", tmp_path / "nope.txt"], capsys, "nope.txt")


def test_non_utf8_mmlu_file_is_named(tiny_ckpt, capsys, tmp_path):
    (tmp_path / "mmlu" / "test").mkdir(parents=True)
    (tmp_path / "mmlu" / "test" / "astronomy_test.csv").write_bytes(b'"What?",a,b,c,d,A\n"Qu\xe9?",a,b,c,d,B\n')
    fails("evaluate", ["mmlu", "--ckpt", tiny_ckpt, "--data", tmp_path / "mmlu", "--shots", "0"], capsys,
          "astronomy_test.csv, line 2", watch=[tmp_path])


@pytest.mark.parametrize("task", ["qa", "gsm8k", "mmlu"])
def test_missing_evaluation_data_is_named_before_the_model_loads(task, tiny_ckpt, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "load", lambda *a, **k: pytest.fail("the model loaded"))
    fails("evaluate", [task, "--ckpt", tiny_ckpt, "--data", tmp_path / "missing"], capsys, "--data", "missing")


def test_gsm8k_answers_without_hashes_are_named(tiny_ckpt, capsys, tmp_path):
    data = write_jsonl(tmp_path / "test.jsonl", [{"question": "1 + 1?", "answer": "two"}])
    fails("evaluate", ["gsm8k", "--ckpt", tiny_ckpt, "--data", data, "--shots", "0"], capsys, "test.jsonl",
          "record 1")


# -----------------------------------------------------------------------------
# 5. --out: checked before the work, and results are never written over unasked

@pytest.mark.parametrize("script", ["generate", "evaluate", "train_sft"])
def test_an_out_under_a_file_is_named_before_the_model_loads(script, tiny_ckpt, capsys, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("mine")
    monkeypatch.setattr(SCRIPTS[script] if script != "train_sft" else trainer, "load",
                        lambda *a, **k: pytest.fail("the model loaded"))
    out = tmp_path / "file" / "sub"
    argv = {"generate": ["--ckpt", tiny_ckpt, "--prompt", "Hi.", "--out", out / "a.jsonl"],
            "evaluate": ["qa", "--ckpt", tiny_ckpt, "--out", out],
            "train_sft": sft_args(tiny_ckpt, sft_data(tmp_path), out)}[script]
    fails(script, argv, capsys, "--out", "is a file", watch=[tmp_path])


@pytest.mark.parametrize("script", ["evaluate", "train_sft"])
def test_an_out_folder_that_is_a_file_is_named(script, tiny_ckpt, capsys, tmp_path):
    (tmp_path / "results").write_text("mine")
    argv = ["qa", "--ckpt", tiny_ckpt, "--out", tmp_path / "results"] if script == "evaluate" \
        else sft_args(tiny_ckpt, sft_data(tmp_path), tmp_path / "results")
    fails(script, argv, capsys, "--out", "results", watch=[tmp_path])


def test_generate_out_that_is_a_folder_is_named(tiny_ckpt, capsys, tmp_path):
    fails("generate", ["--ckpt", tiny_ckpt, "--prompt", "Hi.", "--out", tmp_path], capsys, "--out", "a folder",
          watch=[tmp_path])


def test_generate_keeps_an_existing_answers_file(tiny_ckpt, capsys, tmp_path):
    (tmp_path / "answers.jsonl").write_text('{"output": "mine"}\n')
    fails("generate", ["--ckpt", tiny_ckpt, "--prompt", "Hi.", "--out", tmp_path / "answers.jsonl"], capsys,
          "answers.jsonl", "--overwrite", watch=[tmp_path])
    code, _, err = run_script(generate, ["--ckpt", tiny_ckpt, "--prompt", "Hi.", "--max-new-tokens", "2",
                                         "--out", tmp_path / "answers.jsonl", "--overwrite"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "answers.jsonl").read_text())["instruction"] == "Hi."


def test_evaluate_keeps_existing_results(tiny_ckpt, capsys, tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text('{"from": "a long run"}')
    data = write_jsonl(tmp_path / "qa.jsonl", [{"instruction": "Hi?", "output": "Hello."}])
    fails("evaluate", ["qa", "--ckpt", tiny_ckpt, "--data", data, "--out", tmp_path / "eval"], capsys,
          "results.json", "--overwrite", watch=[tmp_path])


# -----------------------------------------------------------------------------
# 6. non-finite and exploded values never become the last good checkpoint

@pytest.mark.parametrize("script", ["train_sft", "train_dpo"])
def test_an_exploding_update_stops_before_it_is_saved(script, tiny_ckpt, capsys, tmp_path):
    """At lr 1e12 AdamW's first step moves each value by about 1e12: exploded, though finite."""
    args = sft_args if script == "train_sft" else dpo_args
    data = sft_data(tmp_path) if script == "train_sft" else dpo_data(tmp_path)
    out = tmp_path / "run"
    line = fails(script, args(tiny_ckpt, data, out, "--lr", "1e12", "--warmup-epochs", "0"), capsys, "step 1",
                 "exploded", "state.pt (step 0)")
    assert "--lr" in line
    state = torch.load(out / "state.pt", weights_only=True)
    best = torch.load(out / "best.pt", weights_only=True)
    assert state["step"] == 0
    assert all(t.abs().max() < 10 for t in (*state["aligner"].values(), best["prefix"], best["gates"]))


def test_a_parameter_made_nan_by_the_update_stops_the_run(tmp_path, monkeypatch):
    """The loss and gradients are finite, but the optimizer's step leaves a NaN behind."""
    args = llama.ModelArgs(dim=8, n_layers=2, n_heads=2, vocab_size=16)
    aligner = Aligner(args, n_tokens=1, start_layer=0)
    real_step = torch.optim.AdamW.step

    def step(self, *a, **k):
        real_step(self, *a, **k)
        if self.state[aligner.gates]["step"] == 2:
            aligner.gates.data[0, 0] = math.nan

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    settings = argparse.Namespace(lr=1e-2, weight_decay=0.0, batch_size=2, micro_batch_size=2, epochs=3,
                                  warmup_epochs=0.0, schedule="cosine", seed=0, out=tmp_path, save_every=1,
                                  resume=False, max_steps=None)
    loss = lambda idx: ((aligner.prefix.sum() + aligner.gates.sum()) * len(idx), {})
    with pytest.raises(FloatingPointError, match=r"step 2: after the update the Aligner's gates holds NaN.*step 1"):
        trainer.train(settings, aligner, loss, [0, 1], [], [1, 1], [1, 1], distributed.Dist(0, 1, torch.device("cpu")))
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["step"] == 1 and torch.isfinite(state["aligner"]["gates"]).all()


# -----------------------------------------------------------------------------
# 7. generate.py: long prompts, and Aligners of different shapes side by side

def test_a_prompt_longer_than_the_context_is_named(tiny_ckpt, capsys):
    fails("generate", ["--ckpt", tiny_ckpt, "--prompt", "Hi.", "--prompt", "fox " * 300, "--max-seq-len", "128"],
          capsys, "--prompt 2", "--max-seq-len 128", "tokens")


def test_a_long_line_of_a_prompts_file_is_named(tiny_ckpt, capsys, tmp_path):
    (tmp_path / "p.txt").write_text("Hi.\nHello.\n" + "fox " * 300 + "\n")
    fails("generate", ["--ckpt", tiny_ckpt, "--prompts-file", tmp_path / "p.txt", "--max-seq-len", "128"], capsys,
          "p.txt, line 3")


def test_aligners_of_different_shapes_answer_side_by_side(tiny_ckpt, model_args, capsys, tmp_path):
    model, tokenizer = formats.load(tiny_ckpt)
    torch.manual_seed(0)
    one, ten = Aligner(model_args, n_tokens=1), Aligner(model_args, n_tokens=10, start_layer=1)
    for a in (one, ten):
        with torch.no_grad():
            a.gates.normal_(0, 0.5)
    one.save(tmp_path / "one.pt")
    ten.save(tmp_path / "ten.pt")
    code, _, err = run_script(generate, ["--ckpt", tiny_ckpt, "--aligner", tmp_path / "one.pt", "--aligner", "base",
                                         "--aligner", tmp_path / "ten.pt", "--prompt", "Name a bird.",
                                         "--prompt", "What is two plus three?", "--max-new-tokens", "6",
                                         "--out", tmp_path / "a.jsonl"], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [r["aligner"] for r in records] == ["one", "base", "ten"] * 2
    prompts = [tokenizer.encode(generate.format_prompt(p), bos=True)
               for p in ("Name a bird.", "What is two plus three?")]
    for name, aligner in (("one", one), ("base", None), ("ten", ten)):
        alone = generate.generate(model, tokenizer, prompts, aligner, max_new_tokens=6)
        assert [r["output"] for r in records if r["aligner"] == name] == alone, name
    assert len({r["output"] for r in records if r["instruction"] == "Name a bird."}) > 1  # the rows differ


# -----------------------------------------------------------------------------
# 8. the one error path

def as_main_of(module, function):
    """`function` standing in for module.main: cli.run names the script by the module of its main."""
    function.__module__ = module.__name__
    return function


def test_an_unexpected_error_is_one_line_with_its_type(capsys, monkeypatch):
    def broken(argv):
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr(generate, "main", as_main_of(generate, broken))
    code, _, err = run_script(generate, [], capsys)
    line = check_failure(code, err, "generate", ["ZeroDivisionError: division by zero", "--debug"], 1)
    assert "second line" not in err and err.count("\n") == 1, line


def test_a_collective_broken_by_another_rank_says_so(capsys, monkeypatch, tmp_path):
    """Under torchrun, a rank whose peer stopped names no Gloo internals: that peer's own line says why."""
    def peer_gone(argv):
        raise RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:61133.")

    def own_error(argv):
        raise ValueError("--data x.json: no data file here")

    def leave_at_once(code):  # os._exit, which ends a rank under a process group, as pytest survives it
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", leave_at_once)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        monkeypatch.setattr(train_sft, "main", as_main_of(train_sft, peer_gone))
        code, _, err = run_script(train_sft, [], capsys)
        monkeypatch.setattr(train_sft, "main", as_main_of(train_sft, own_error))
        own = run_script(train_sft, [], capsys)
    finally:
        torch.distributed.destroy_process_group()
    assert code == 1 and err == "train_sft.py: error: rank 0: another rank stopped, so this one stops too\n"
    assert own == (1, "", "train_sft.py: error: --data x.json: no data file here\n")
    monkeypatch.setattr(train_sft, "main", as_main_of(train_sft, peer_gone))
    code, _, err = run_script(train_sft, [], capsys)  # with no process group, the error as it is
    assert code == 1 and err.startswith("train_sft.py: error: RuntimeError: [gloo/transport")


def test_debug_shows_the_traceback_in_process(monkeypatch):
    monkeypatch.setattr(generate, "main", as_main_of(generate, lambda argv: 1 / 0))
    with pytest.raises(ZeroDivisionError):
        cli.run(generate.main, ["--debug"])
    monkeypatch.setenv("ALIGNER_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        cli.run(generate.main, [])


def test_ctrl_c_is_one_line_and_a_non_zero_exit(capsys, monkeypatch):
    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_sft, "main", as_main_of(train_sft, interrupted))
    code, _, err = run_script(train_sft, [], capsys)
    assert code == 130 and err == "train_sft.py: interrupted\n"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_training_ends_the_step_saves_it_and_says_so(signum, tiny_ckpt, capsys, tmp_path, monkeypatch):
    """Ctrl-C (or torchrun's or a scheduler's SIGTERM) during step 4, with --save-every 100: the step
    ends, state.pt holds it, and it is the last step metrics.jsonl logged."""
    real = trainer.optimizer_step

    def step(run, progress):
        if progress.step == 3:
            os.kill(os.getpid(), signum)
        return real(run, progress)

    monkeypatch.setattr(trainer, "optimizer_step", step)
    out = tmp_path / "run"
    code, _, err = run_script(train_sft, sft_args(tiny_ckpt, sft_data(tmp_path), out, "--batch-size", "1"), capsys)
    assert code == 130 and "Traceback" not in err
    assert error_line(err) == (f"train_sft.py: interrupted: stopped at step 4 ({signum.name}); {out / 'state.pt'} "
                               "holds it: continue with --resume")
    assert torch.load(out / "state.pt", weights_only=True)["step"] == 4
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 4
    assert signal.getsignal(signum) in (signal.default_int_handler, signal.SIG_DFL)  # the handler is gone


@pytest.mark.parametrize("save_every, saved", [(1, 3), (2, 2)])
def test_a_second_ctrl_c_stops_at_once_and_says_what_state_pt_holds(save_every, saved, tiny_ckpt, capsys, tmp_path,
                                                                     monkeypatch):
    """Stopped at once during step 4 of an epoch of 4: state.pt holds the last multiple of --save-every."""
    real = trainer.optimizer_step

    def step(run, progress):
        if progress.step == 3:
            raise KeyboardInterrupt
        return real(run, progress)

    monkeypatch.setattr(trainer, "optimizer_step", step)
    code, _, err = run_script(train_sft, sft_args(tiny_ckpt, sft_data(tmp_path), tmp_path / "run", "--batch-size",
                                                  "1", "--save-every", str(save_every)), capsys)
    assert code == 130 and "Traceback" not in err
    assert error_line(err).startswith("train_sft.py: interrupted: stopped during step 4;")
    assert f"holds step {saved}: continue with --resume" in error_line(err)
    assert torch.load(tmp_path / "run" / "state.pt", weights_only=True)["step"] == saved


def test_ctrl_c_before_the_first_save_says_resume_starts_anew(tiny_ckpt, capsys, tmp_path, monkeypatch):
    def validate(run, progress, epoch):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "validate", validate)
    code, _, err = run_script(train_sft, sft_args(tiny_ckpt, sft_data(tmp_path), tmp_path / "run"), capsys)
    assert code == 130
    assert error_line(err) == ("train_sft.py: interrupted: stopped before the run's first save; --resume starts it "
                               "from the beginning")
    assert not (tmp_path / "run" / "state.pt").exists()


SUBPROCESS_CASES = [
    ("train_sft.py", ["--lr", "-1"], 2, "argument --lr"),
    ("generate.py", ["--ckpt", "no-such-folder", "--prompt", "Hi."], 1, "no-such-folder"),
    ("evaluate.py", ["qa", "--ckpt", "no-such-folder", "--data", "no-such.jsonl"], 1, "--data no-such.jsonl"),
]


@pytest.mark.parametrize("script, argv, code, culprit", SUBPROCESS_CASES)
def test_the_scripts_themselves_print_one_line(script, argv, code, culprit, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("ALIGNER_DEBUG", None)
    result = subprocess.run([sys.executable, str(ROOT / script), *argv], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == code and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"{script}: error: ")
    assert culprit in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_debug_flag_shows_the_traceback(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--ckpt", "no-such-folder", "--prompt",
                             "Hi.", "--debug"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" in result.stderr and "no-such-folder" in result.stderr
