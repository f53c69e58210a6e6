"""Faults at the edges of a run: Ctrl-C while a script starts, SIGTERM to the demo pipeline,
an output that is an input, the temporary files a killed run leaves, and inputs that must be
refused in one line rather than filled in or named wrongly.

Most cases run through cli.run around main(argv) in this process, with tests/test_errors.py's
helpers; the signals need real processes.
"""

import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

import analyze
from support import files, startup
import generate
import train_dpo
import train_sft
from aligner import Aligner
from test_errors import (check_failure, ckpt, dpo_args, dpo_data, fails, finished, model_args, run,  # noqa: F401
                         run_script, sft_args, sft_data, snapshot)
from test_refusals import hf_shards  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = ["train_sft.py", "train_dpo.py", "generate.py", "evaluate.py", "analyze.py", "run_demo.py",
                "support/build_demo.py", "bench/run.py", "bench/decode.py", "bench/gpu.py", "bench/memory.py"]


# -----------------------------------------------------------------------------
# signals

def as_run(script: str) -> list:
    """How a user starts an entry point: a script by its path, one in support/ as a module (`-m support.x`)."""
    return ["-m", script.removesuffix(".py").replace("/", ".")] if script.startswith("support/") else [script]


def loading_torch(pid: int) -> bool:
    """Whether the process has begun to load torch's C++ library (its import is under way)."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux's /proc to see torch loading")
def test_ctrl_c_while_torch_loads_ends_every_script_in_one_line():
    """Each entry point, sent SIGINT while its `import torch` runs (before cli.run exists to catch
    it), prints `<script>: interrupted` alone and exits 130, never a traceback."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = {script: subprocess.Popen([sys.executable, *as_run(script), "--help"], cwd=ROOT, env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for script in ENTRY_POINTS}
    waiting, deadline = dict(processes), time.monotonic() + 120
    while waiting and time.monotonic() < deadline:
        for script, process in list(waiting.items()):
            if loading_torch(process.pid):
                process.send_signal(signal.SIGINT)
                del waiting[script]
            elif process.poll() is not None:
                pytest.fail(f"{script} ended before torch was seen loading: {process.stderr.read()}")
        time.sleep(0.005)
    for process in waiting.values():
        process.kill()
    assert not waiting, f"torch never seen loading in {list(waiting)}"
    for script, process in processes.items():
        err = process.communicate(timeout=120)[1]
        assert (process.returncode, err) == (130, f"{Path(script).name}: interrupted\n"), script


def test_importing_a_script_leaves_ctrl_c_to_the_importer():
    """Only a script run as the program takes over Ctrl-C while it starts: pytest, which imports
    them, keeps Python's own handler, and cli.run hands Ctrl-C back to Python."""
    assert signal.getsignal(signal.SIGINT) is not startup.quit_at_once
    assert not startup.running_a_script()


# Two commands in place of the pipeline's: one that ends when SIGTERM reaches it, writing a mark, and one that
# sends SIGTERM to run_demo.py once the first is ready for it. Both would otherwise sleep for a minute.
WAITER = ("import pathlib, signal, sys, time\n"
          "def end(*_):\n    pathlib.Path('got-sigterm').write_text('yes'); sys.exit(0)\n"
          "signal.signal(signal.SIGTERM, end); pathlib.Path('ready').write_text(''); time.sleep(60)")
SENDER = ("import os, pathlib, signal, time\n"
          "while not pathlib.Path('ready').exists(): time.sleep(0.05)\n"
          "os.kill(os.getppid(), signal.SIGTERM); time.sleep(60)")
FAKE_PIPELINE = f"""
import shlex, sys
sys.path.insert(0, {str(ROOT)!r})
import run_demo
from support import cli
run_demo.STEPS = [run_demo.Step("waiter", "python -c " + shlex.quote({WAITER!r}) + " --out runs/waiter"),
                  run_demo.Step("sender", "python -c " + shlex.quote({SENDER!r}) + " --out runs/sender")]
cli.run(run_demo.main, [])
"""


def test_run_demo_passes_sigterm_to_its_commands_and_says_so(tmp_path):
    """SIGTERM to run_demo.py: it passes the signal to the commands it runs, waits for them, and
    ends in one line with exit code 143; no command is left running."""
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", FAKE_PIPELINE], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert result.returncode == 143, result.stderr
    assert (tmp_path / "got-sigterm").read_text() == "yes"  # the running command was told, and ended
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("run_demo.py: terminated (SIGTERM)"), result.stderr
    assert "waiter" in lines[0] and "sender" in lines[0]
    assert time.monotonic() - started < 50  # neither command was left to sleep out its minute


# -----------------------------------------------------------------------------
# an output that is an input, or another output

def test_analyze_never_writes_its_json_over_an_input(model_args, capsys, tmp_path):
    aligner = Aligner(model_args, n_tokens=1)
    aligner.save(tmp_path / "A.pt")
    (tmp_path / "link.pt").symlink_to(tmp_path / "A.pt")
    for out in (tmp_path / "A.pt", tmp_path / "link.pt"):  # the same file, however it is spelt
        for extra in ([], ["--overwrite"]):
            before = snapshot(tmp_path)
            code, _, err = run_script(analyze, ["gates", tmp_path / "A.pt", "--json", out, *extra], capsys)
            check_failure(code, err, "analyze", ["--json", str(out), "input", str(tmp_path / "A.pt")], 1)
            assert snapshot(tmp_path) == before


def test_analyze_params_never_writes_over_the_params_it_reads(ckpt, capsys, tmp_path):
    before = snapshot(tmp_path)
    code, _, err = run_script(analyze, ["params", "--ckpt", ckpt, "--json", ckpt / "params.json", "--overwrite"],
                              capsys)
    check_failure(code, err, "analyze", ["--json", "--ckpt", "params.json"], 1)
    assert snapshot(tmp_path) == before


def test_generate_never_writes_over_its_question_file(tiny_ckpt, capsys, tmp_path):
    questions = tmp_path / "problem.json"
    questions.write_text(json.dumps([{"instruction": "Name a bird.", "input": ""}]))
    fails("generate", ["--ckpt", tiny_ckpt, "--prompts-file", questions, "--questions-out", questions,
                       "--overwrite"], capsys, "--questions-out", "--prompts-file", questions, watch=[tmp_path])
    fails("generate", ["--ckpt", tiny_ckpt, "--prompts-file", questions, "--out", questions, "--overwrite"],
          capsys, "--out", "--prompts-file", questions, watch=[tmp_path])


def test_generate_never_writes_over_an_aligner_or_the_checkpoint(ckpt, model_args, capsys, tmp_path):
    Aligner(model_args, n_tokens=1).save(tmp_path / "a.pt")
    fails("generate", ["--ckpt", ckpt, "--prompt", "Hi.", "--aligner", tmp_path / "a.pt",
                       "--out", tmp_path / "a.pt", "--overwrite"], capsys, "--out", "--aligner", tmp_path / "a.pt",
          watch=[tmp_path])
    for written, read in ((ckpt / "params.json", "--ckpt's"), (ckpt.parent / "tokenizer.model", "--tokenizer")):
        fails("generate", ["--ckpt", ckpt, "--prompt", "Hi.", "--out", written, "--overwrite"],  # beside it too
              capsys, f"--out {written}", f"{read} {written}", watch=[tmp_path])


def test_generate_refuses_two_outputs_in_one_file(tiny_ckpt, capsys, tmp_path):
    fails("generate", ["--ckpt", tiny_ckpt, "--prompt", "Hi.", "--out", tmp_path / "same.jsonl",
                       "--questions-out", tmp_path / "same.jsonl"], capsys, "--out", "--questions-out",
          tmp_path / "same.jsonl", "one file for two outputs", watch=[tmp_path])


def test_generate_refuses_out_inside_answers_dir(tiny_ckpt, capsys, tmp_path):
    """--out in --answers-dir would be read by the judge as one more model's answers, and with
    the base's name it would be one file written twice: refused either way, before any load."""
    answers = tmp_path / "answers"
    for name in ("base.jsonl", "all.jsonl"):
        fails("generate", ["--ckpt", tiny_ckpt, "--prompt", "Hi.", "--answers-dir", answers,
                           "--out", answers / name], capsys, "--out", answers / name, "inside --answers-dir",
              watch=[tmp_path])
        assert not answers.exists()


def test_evaluate_never_writes_its_records_over_its_data(tiny_ckpt, capsys, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"question": "Name a bird.", "answer": "robin"}) + "\n")
    fails("evaluate", ["qa", "--ckpt", tiny_ckpt, "--data", data, "--out", tmp_path, "--overwrite"], capsys,
          "--out", "--data", data, watch=[tmp_path])


def test_training_never_writes_its_run_over_its_inputs(run, tiny_ckpt, capsys, tmp_path):
    """An initial Aligner, or data, inside --out under a run file's name would be replaced (or
    removed by --overwrite): refused with --overwrite and with --resume alike."""
    _, out = run
    data = dpo_data(tmp_path)
    for extra in (["--overwrite"], ["--resume"]):
        fails("train_dpo", dpo_args(tiny_ckpt, data, out, "--init-aligner", out / "best.pt", *extra), capsys,
              "--out", "--init-aligner", out / "best.pt", watch=[tmp_path])
        fails("train_dpo", dpo_args(tiny_ckpt, data, out, "--init-aligner", out / "epoch-1.pt", *extra), capsys,
              "--out", "--init-aligner", out / "epoch-1.pt", watch=[tmp_path])
    (out / "metrics.jsonl").write_text((tmp_path / "sft.jsonl").read_text())
    fails("train_sft", sft_args(tiny_ckpt, out / "metrics.jsonl", out, "--overwrite"), capsys,
          "--out", "--data", out / "metrics.jsonl", watch=[tmp_path])


def test_refuse_clashes_compares_files_not_spellings(tmp_path):
    (tmp_path / "in.txt").write_text("x")
    os.link(tmp_path / "in.txt", tmp_path / "hard.txt")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "params.json").write_text("{}")
    with pytest.raises(files.FileError, match="--out .*hard.txt: the same file as --data .*in.txt"):
        files.refuse_clashes([("--data", tmp_path / "in.txt")], [("--out", tmp_path / "hard.txt")])
    with pytest.raises(files.FileError, match="the same file as --ckpt's .*params.json"):
        files.refuse_clashes([("--ckpt", tmp_path / "ckpt")], [("--json", tmp_path / "ckpt" / ".." / "ckpt" /
                                                                           "params.json")])
    with pytest.raises(files.FileError, match="--a .*new.txt and --b .*new.txt: one file for two outputs"):
        files.refuse_clashes([], [("--a", tmp_path / "new.txt"), ("--b", tmp_path / "sub" / ".." / "new.txt")])
    files.refuse_clashes([("--data", tmp_path / "in.txt"), ("--ckpt", tmp_path / "ckpt")],
                         [("--out", tmp_path / "out.txt"), ("--json", tmp_path / "ckpt.json")])  # apart: no error


# -----------------------------------------------------------------------------
# values never filled in, folders named as given, one line per error

@pytest.mark.parametrize("key", ["dim", "n_layers", "n_heads"])
def test_a_params_json_without_a_shape_key_is_refused(key, tiny_ckpt, capsys, tmp_path):
    """analyze.py params would print Table 1 for LLaMA-7B's default; the file and key are named instead."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    params = json.loads((tiny_ckpt / "params.json").read_text())
    del params[key]
    (folder / "params.json").write_text(json.dumps(params))
    for argv in (["params", "--ckpt", folder], ["params", "--params", folder / "params.json"]):
        code, out, err = run_script(analyze, argv, capsys)
        check_failure(code, err, "analyze", [folder / "params.json", repr(key)], 1)
        assert out == ""


def test_evaluate_names_a_gsm8k_data_folder_as_given(tiny_ckpt, capsys, tmp_path):
    (tmp_path / "gsm_empty").mkdir()
    (tmp_path / "train.jsonl").write_text("not json\n")  # beside the folder: not what the user gave
    line = fails("evaluate", ["gsm8k", "--ckpt", tiny_ckpt, "--data", tmp_path / "gsm_empty"], capsys,
                 f"--data {tmp_path / 'gsm_empty'}", "a folder")
    assert "train.jsonl" not in line.split("a folder")[0]


def test_an_unusable_old_format_bin_is_one_line_without_the_old_format_warning(hf_shards, capsys, tmp_path):
    import warnings
    from hf_layout import write_hf

    model, _ = hf_shards
    bins = write_hf(model.state_dict(), model.args, tmp_path / "bin", "bin", n_files=1,
                    tokenizer=tmp_path / "hf" / "tokenizer.model")
    (path,) = sorted(bins.glob("pytorch_model*.bin"))
    state = {k: v.clone() for k, v in torch.load(path, weights_only=True).items()}
    contents = {"a plain pickle": lambda: path.write_bytes(pickle.dumps(state, protocol=2)),
                "is a str, not a tensor": lambda: torch.save({**state, next(iter(state)): "text"}, path,
                                                             _use_new_zipfile_serialization=False)}
    for words, write in contents.items():
        write()
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            code, _, err = run_script(generate, ["--ckpt", bins, "--prompt", "Hi."], capsys)
        check_failure(code, err, "generate", [path, words], 1)
        assert len(err.splitlines()) == 1, err


# -----------------------------------------------------------------------------
# the temporary files a killed run leaves

def leftovers(out: Path) -> tuple:
    """Temporary files as atomic_write names them, as kill -9 mid-write leaves them, and look-alikes
    that are not ours: (ours, others)."""
    ours = []
    for name in ("metrics.jsonl", "state.pt", "settings.json", "epoch-1.pt"):
        fd, path = tempfile.mkstemp(dir=out, prefix=f".{name}.")
        os.close(fd)
        ours.append(Path(path))
    others = [out / ".notes.txt.abcd1234", out / ".metrics.jsonl.ABCD1234", out / ".state.pt.abc",
              out / "metrics.jsonl.abcd1234", out / "notes.txt"]
    for path in others:
        path.write_text("mine")
    return ours, others


def test_a_resumed_run_removes_its_own_stray_temporary_files_and_nothing_else(tiny_ckpt, capsys, tmp_path):
    data, out = sft_data(tmp_path), tmp_path / "run"
    assert run_script(train_sft, sft_args(tiny_ckpt, data, out, "--max-steps", "2"), capsys)[0] == 0
    ours, others = leftovers(out)
    code, stdout, err = run_script(train_sft, sft_args(tiny_ckpt, data, out, "--resume"), capsys)
    assert code == 0, err
    assert not any(p.exists() for p in ours) and all(p.read_text() == "mine" for p in others)
    assert "removed 4 temporary files" in stdout


@pytest.mark.parametrize("again", ["--resume", "--overwrite"])
def test_a_run_started_again_removes_its_stray_temporary_files(again, tiny_ckpt, capsys, tmp_path):
    """A run killed before its first save (no state.pt) that is started again, by --resume or
    --overwrite, leaves no temporary file of the first try."""
    data, out = dpo_data(tmp_path), tmp_path / "run"
    assert run_script(train_dpo, dpo_args(tiny_ckpt, data, out, "--max-steps", "1"), capsys)[0] == 0
    (out / "state.pt").unlink()  # as if killed before it was first written
    ours, others = leftovers(out)
    code, _, err = run_script(train_dpo, dpo_args(tiny_ckpt, data, out, "--max-steps", "1", again), capsys)
    assert code == 0, err
    assert not any(p.exists() for p in ours) and all(p.read_text() == "mine" for p in others)
