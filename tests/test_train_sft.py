"""train_sft.py, data.py's readers and trainer.py's loop, on a tiny random model."""

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from support import data, distributed, formats, trainer
import llama
import train_sft
from aligner import Aligner
from support.files import FileError, read_text

ROOT = Path(__file__).resolve().parents[1]
COLORS = ["red", "blue", "green", "brown", "black"]


def write_task(path, n=20, inputs=False):
    """A small fixed task in Alpaca's JSON: every answer has the same form."""
    records = [{"instruction": f"Name the color of fox {i}.", "input": "The lazy dog." if inputs and i % 2 else "",
                "output": f"The fox is {COLORS[i % len(COLORS)]}."} for i in range(n)]
    path.write_text(json.dumps(records, indent=1))
    return path


def run_args(ckpt, data_path, out, *extra):
    return ["--ckpt", str(ckpt), "--data", str(data_path), "--out", str(out), "--n-tokens", "2",
            "--val", "2", "--batch-size", "4", "--micro-batch-size", "2", "--epochs", "2",
            "--max-seq-len", "96", *extra]


def aligner_tensors(path):
    state = torch.load(path, weights_only=True)
    return state["prefix"], state["gates"]


@pytest.fixture(scope="module")
def full_run(tiny_ckpt, tmp_path_factory):
    """One uninterrupted CLI run: the reference for resume and for two processes."""
    folder = tmp_path_factory.mktemp("sft")
    task = write_task(folder / "task.json", n=10)
    train_sft.main(run_args(tiny_ckpt, task, folder / "run"))
    return task, folder / "run"


def test_long_examples_are_cut_and_counted(tiny_ckpt, tmp_path, capsys):
    path = tmp_path / "long.jsonl"
    rows = [{"prompt": "Answer: ", "response": "five " * 200}, {"prompt": "Answer: ", "response": "five."}] * 3
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train_sft.main(["--ckpt", str(tiny_ckpt), "--data", str(path), "--out", str(tmp_path / "run"),
                    "--max-seq-len", "32", "--epochs", "1", "--val", "1", "--n-tokens", "1"])
    assert "6 examples; 3 cut to --max-seq-len 32 tokens" in capsys.readouterr().out


def test_malformed_data_names_its_line(tiny_ckpt, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "a", "response": "b"\n')
    with pytest.raises(data.DataError, match=r"bad.jsonl, line 3: not valid JSON"):
        train_sft.main(run_args(tiny_ckpt, bad, tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # stopped before training
    missing = tmp_path / "missing.json"
    missing.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a", "input": ""}\n]\n')
    with pytest.raises(data.DataError, match=r"missing.json, record 1 \(line 3\): missing key 'output'"):
        data.read_sft(missing)
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": 1 "output": "b"}\n]\n')
    with pytest.raises(data.DataError, match=r"record 1 \(line 3\): not valid JSON"):
        data.read_sft(broken)


def test_a_json_list_error_names_the_line_json_names(tmp_path):
    """A raw line break inside a string is invalid JSON at the break itself: the error names the
    record and the line that Python's json module gives for that position."""
    text = '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "two\nlines", "output": "c"}\n]\n'
    (tmp_path / "bad.json").write_text(text)
    with pytest.raises(json.JSONDecodeError) as reference:
        json.loads(text)
    with pytest.raises(data.DataError, match=rf"bad\.json, record 1 \(line {reference.value.lineno}\): not valid JSON"):
        data.read_sft(tmp_path / "bad.json")
    assert reference.value.lineno == 3


def test_blank_lines_are_skipped_and_wrong_values_named(tmp_path):
    lines = tmp_path / "task.jsonl"
    lines.write_text('{"prompt": "a", "response": "b"}\n   \n\t\n{"prompt": "c", "response": "d"}\n')
    assert data.read_sft(lines) == ([data.SFTPair("a", "b"), data.SFTPair("c", "d")], 0)
    lines.write_text('{"prompt": "a", "response": "b"}\n{"prompt": 1, "response": "d"}\n')
    with pytest.raises(data.DataError, match=r"task\.jsonl, line 2: 'prompt' must be a string, not int"):
        data.read_sft(lines)
    listed = tmp_path / "task.json"
    listed.write_text('[{"instruction": "a", "output": "b"}]\n{"instruction": "c", "output": "d"}\n')
    with pytest.raises(data.DataError, match=r"task\.json, record 1 \(line 1\): unexpected text after the closing"):
        data.read_sft(listed)


@pytest.mark.parametrize("name, text, message", [
    ("task.json", '[{"instruction": "a", "output": "b"}\n {"instruction": "c", "output": "d"}]',
     r"task\.json, record 1 \(line 2\): expected ',' or '\]' after this record"),
    ("task.jsonl", '{"prompt": "a", "response": "b"}\n[1, 2]\n',
     r"task\.jsonl, line 2: expected a JSON object, got list"),
    ("task.jsonl", '{"question": "a", "answer": "b"}\n',
     r"task\.jsonl, line 1: expected the keys of Alpaca \(instruction, input, output\), MetaMathQA \(query, "
     r"response\), PKU-SafeRLHF \(prompt, response_0, .*\) or prompt, response; the record has \['answer', 'question'\]"),
])
def test_a_record_of_the_wrong_shape_is_named(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(data.DataError, match=message):
        data.read_sft(tmp_path / name)


def test_a_missing_data_file_or_a_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.json: no data file here"):
        data.read_sft(tmp_path / "missing.json")
    with pytest.raises(FileError, match=rf"{tmp_path}: a folder, not a data file"):
        read_text(tmp_path, "data file")


def test_alpaca_json_and_jsonl_give_the_same_examples(tmp_path):
    task = write_task(tmp_path / "task.json", inputs=True)
    lines = tmp_path / "task.jsonl"
    lines.write_text("".join(json.dumps(r) + "\n" for r in json.loads(task.read_text())))
    assert data.read_sft(task) == data.read_sft(lines)


def test_loss_falls_on_a_fixed_task(tiny_ckpt, tmp_path):
    """Every answer is the same sentence: a two-token Aligner on the random base learns it, and the
    validation loss ends below half of where it started (about 8.0 to 3.1 here), lowest at the end."""
    rows = [{"prompt": f"Question: What is fox {i}? Answer:", "response": " A robin is a bird."} for i in range(12)]
    (tmp_path / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train_sft.main(["--ckpt", str(tiny_ckpt), "--data", str(tmp_path / "task.jsonl"), "--out", str(tmp_path / "run"),
                    "--n-tokens", "2", "--val", "4", "--batch-size", "2", "--epochs", "10", "--lr", "0.3",
                    "--schedule", "constant", "--warmup-epochs", "0"])
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val) == 11  # before training and after each epoch
    assert val[-1] < 0.5 * val[0] and min(val) == val[-1], val


def test_cli_writes_its_files(full_run, tiny_ckpt):
    run = full_run[1]
    assert {"settings.json", "metrics.jsonl", "state.pt", "best.pt", "epoch-1.pt", "epoch-2.pt"} <= \
        {p.name for p in run.iterdir()}
    steps = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]  # 8 examples in batches of 4, 2 epochs
    assert {"loss", "lr", "tokens_per_s"} <= set(steps[0])
    assert json.loads((run / "settings.json").read_text())["lr"] == 9e-3
    args = llama.ModelArgs(**formats.read_params(tiny_ckpt))
    aligner = Aligner.load(run / "best.pt", args)
    assert aligner.n_tokens == 2 and aligner.gates.abs().sum() > 0


def test_resume_gives_the_same_aligner_bit_for_bit(full_run, tiny_ckpt, tmp_path):
    task, reference = full_run
    out = tmp_path / "run"
    train_sft.main(run_args(tiny_ckpt, task, out, "--max-steps", "3"))  # stops inside epoch 2
    assert not (out / "epoch-2.pt").exists()
    train_sft.main(run_args(tiny_ckpt, task, out, "--resume"))
    for name in ("epoch-2.pt", "best.pt"):
        for a, b in zip(aligner_tensors(out / name), aligner_tensors(reference / name)):
            assert torch.equal(a, b), name
    assert (out / "metrics.jsonl").read_text().count('"loss"') == 4


def test_a_run_stopped_in_its_first_step_resumes_as_the_run_that_never_stopped(full_run, tiny_ckpt, tmp_path,
                                                                              monkeypatch):
    """state.pt then holds step 0, written after the initial validation: --resume goes on from
    there and neither validates nor logs step 0 again."""
    task, reference = full_run
    out = tmp_path / "run"
    real = trainer.optimizer_step

    def step(run, progress):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "optimizer_step", step)
    with pytest.raises(KeyboardInterrupt, match="holds step 0"):
        train_sft.main(run_args(tiny_ckpt, task, out))
    monkeypatch.setattr(trainer, "optimizer_step", real)
    train_sft.main(run_args(tiny_ckpt, task, out, "--resume"))

    def records(run):
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
                for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records(out) == records(reference)
    for a, b in zip(aligner_tensors(out / "best.pt"), aligner_tensors(reference / "best.pt")):
        assert torch.equal(a, b)


def metrics(run):
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_run_that_stopped_before_its_first_save_goes_on_with_resume(full_run, tiny_ckpt, tmp_path, monkeypatch,
                                                                     capsys):
    """A failure (or a kill: it leaves the same files) during the first validation leaves settings.json and
    metrics.jsonl but no state.pt. A plain run is refused with a line that names --resume, and --resume
    starts the run from the beginning and ends it as the run that never stopped."""
    task, reference = full_run
    out = tmp_path / "run"

    def validate(run, progress, epoch):
        raise OSError("the disk went away")

    real = trainer.validate
    monkeypatch.setattr(trainer, "validate", validate)
    with pytest.raises(OSError):
        train_sft.main(run_args(tiny_ckpt, task, out))
    monkeypatch.setattr(trainer, "validate", real)
    assert {p.name for p in out.iterdir()} == {"settings.json", "metrics.jsonl"}
    with pytest.raises(FileError, match=r"stopped before its first save .*continue it with --resume, which starts"):
        train_sft.main(run_args(tiny_ckpt, task, out))
    with pytest.raises(ValueError, match=r"settings.json: the run was started with other settings: --lr"):
        train_sft.main(run_args(tiny_ckpt, task, out, "--resume", "--lr", "0.5"))  # still the same run only
    capsys.readouterr()
    train_sft.main(run_args(tiny_ckpt, task, out, "--resume"))
    assert f"{out}: the run stopped before its first save; starting it again" in capsys.readouterr().out
    assert metrics(out) == metrics(reference)
    for a, b in zip(aligner_tensors(out / "best.pt"), aligner_tensors(reference / "best.pt")):
        assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="nothing to resume, no run was started in"):
        train_sft.main(run_args(tiny_ckpt, task, tmp_path / "never", "--resume"))


def test_max_steps_stops_where_state_pt_is(full_run, tiny_ckpt, tmp_path, capsys):
    """--max-steps counts the steps of the whole run: a run resumed at step 1 with --max-steps 1 trains
    no step; resumed with --max-steps 3 and --save-every 100, it saves step 3 where it stops. Each time
    the step it names is the one state.pt holds and the last one metrics.jsonl logged."""
    task, reference = full_run
    out = tmp_path / "run"
    for max_steps in ("1", "1", "3"):
        train_sft.main(run_args(tiny_ckpt, task, out, "--max-steps", max_steps, "--save-every", "100",
                                *(["--resume"] if (out / "state.pt").exists() else [])))
        said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("stopped at step")]
        step = torch.load(out / "state.pt", weights_only=True)["step"]
        assert said == [f"stopped at step {max_steps} (--max-steps {max_steps}); {out / 'state.pt'} holds it: "
                        "continue with --resume"]
        assert step == int(max_steps) == metrics(out)[-1]["step"]
    train_sft.main(run_args(tiny_ckpt, task, out, "--resume"))
    assert metrics(out) == metrics(reference)


def test_resume_refuses_a_weight_file_changed_in_place(tiny_ckpt, tmp_path):
    """Bytes of the checkpoint's weights changed, the file's size and name the same: --resume refuses."""
    ckpt = tmp_path / "ckpt" / "tiny"
    ckpt.parent.mkdir()
    for path in tiny_ckpt.parent.rglob("*"):
        if path.is_file():
            target = tmp_path / "ckpt" / path.relative_to(tiny_ckpt.parent)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    task = write_task(tmp_path / "task.json", n=10)
    train_sft.main(run_args(ckpt, task, tmp_path / "run", "--max-steps", "1"))
    weights = ckpt / "consolidated.00.pth"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # a byte inside a weight tensor's data
    weights.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"other settings: --ckpt's content"):
        train_sft.main(run_args(ckpt, task, tmp_path / "run", "--resume"))


def test_a_weight_file_is_hashed_by_its_size_and_fixed_slices(tmp_path):
    """Above 16 slices' worth, a weight file is hashed by its size and its first, last and 14 evenly
    spaced slices: a change in a slice or in the size is seen, one between the slices is not (the price
    of hashing a 13 GB checkpoint in a fraction of a second). Smaller files are hashed whole."""
    from support.files import fingerprint, sampled_sha256
    from support.formats import find_tokenizer
    path = tmp_path / "model.safetensors"
    raw = bytearray(os.urandom(100_000))
    path.write_bytes(bytes(raw))
    sampled = lambda: sampled_sha256(path, slices=4, slice_bytes=1000)  # slices at 0, 33000, 66000, 99000
    before = sampled()
    for offset in (0, 33_500, 66_999, 99_999):
        raw[offset] ^= 1
        path.write_bytes(bytes(raw))
        assert sampled() != before, offset
        raw[offset] ^= 1
    raw[50_000] ^= 1  # between the second and third slices
    path.write_bytes(bytes(raw))
    assert sampled() == before
    path.write_bytes(bytes(raw) + b"\0")
    assert sampled() != before
    (tmp_path / "x.json").write_text("{}")  # not a weight file: hashed whole
    small = tmp_path / "small.bin"
    small.write_bytes(bytes(4000))
    whole = sampled_sha256(small, slices=4, slice_bytes=1000)
    small.write_bytes(bytes(3999) + b"\1")
    assert sampled_sha256(small, slices=4, slice_bytes=1000) != whole
    assert set(fingerprint(path, find_tokenizer)) == {"bytes", "sampled_sha256"}
    assert set(fingerprint(tmp_path / "x.json", find_tokenizer)) == {"bytes", "sha256"}


def test_each_epochs_order_is_drawn_once_and_its_steps_take_its_batches_in_turn(tmp_path, monkeypatch):
    """The loop draws an epoch's order (global_batches) at the epoch's first step, not at every step,
    and step i of epoch e trains on batch i of global_batches(..., e): in a run of 3 epochs of 3 steps,
    and in the same run stopped by --max-steps inside epoch 1 and resumed there."""
    real, drawn = trainer.global_batches, []
    monkeypatch.setattr(trainer, "global_batches", lambda *a, **k: drawn.append(a[3]) or real(*a, **k))
    expected = [sorted(batch) for epoch in range(3) for batch in real(list(range(10)), 4, 0, epoch)]
    args = llama.ModelArgs(dim=4, n_layers=2, n_heads=2, vocab_size=8)
    for stops in ([None], [4, None]):
        aligner, seen, draws = Aligner(args, n_tokens=1, start_layer=1), [], []

        def batch_loss(indices):  # one micro-batch a step, its examples in the loop's (sorted) order
            seen.append(list(indices))
            return (aligner.prefix.sum() + aligner.gates.sum()) * len(indices), {}

        out = tmp_path / f"run{len(stops)}"
        for max_steps in stops:
            drawn.clear()
            trainer.train(loop_settings(out, epochs=3, micro_batch_size=4, max_steps=max_steps,
                                        resume=max_steps is None and len(stops) > 1), aligner, batch_loss,
                          list(range(10)), [], [1] * 10, [1] * 10, distributed.Dist(0, 1, torch.device("cpu")))
            draws.append(list(drawn))
        assert seen == expected
        assert draws == ([[0, 1, 2]] if stops == [None] else [[0, 1], [1, 2]])


def test_an_error_inside_a_step_keeps_every_step_before_it(tmp_path):
    """An error as step 3 runs (a device lost, a peer gone), with --save-every 100: state.pt is
    brought to step 2, the last step logged, and the error goes on as it was."""
    args = llama.ModelArgs(dim=8, n_layers=2, n_heads=2, vocab_size=16)
    aligner = Aligner(args, n_tokens=1, start_layer=0)
    calls = []

    def batch_loss(indices):
        calls.append(indices)
        if len(calls) > 2:
            raise OSError("the device is gone")
        return (aligner.prefix.sum() + aligner.gates.sum()) * len(indices), {}

    with pytest.raises(OSError, match="^the device is gone$"):  # 4 steps, all in one epoch
        trainer.train(loop_settings(tmp_path, batch_size=2, epochs=1, warmup_epochs=0.0), aligner, batch_loss,
                      list(range(8)), [], [1] * 8, [1] * 8, distributed.Dist(0, 1, torch.device("cpu")))
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["step"] == 2 == metrics(tmp_path)[-1]["step"]
    assert torch.equal(aligner.prefix.detach(), state["aligner"]["prefix"])


def test_an_update_that_explodes_is_undone_and_the_steps_before_it_kept(tmp_path):
    """AdamW moves each value by about the lr, which warms up to 7e9 over 3 steps: 2.3e9, 4.7e9, then
    7e9 more, which takes the prefix past files.EXPLODED (1e10). The third update is undone, and
    state.pt (--save-every 100) holds step 2, whose Aligner is the one still in memory."""
    args = llama.ModelArgs(dim=8, n_layers=2, n_heads=2, vocab_size=16)
    aligner = Aligner(args, n_tokens=1, start_layer=0)
    seen = []

    def batch_loss(indices):
        seen.append(aligner.prefix.detach().clone())
        return (aligner.prefix.sum() + aligner.gates.sum()) * len(indices), {}

    settings = loop_settings(tmp_path, lr=7e9, batch_size=2, epochs=1, warmup_epochs=0.75, weight_decay=0.0)
    with pytest.raises(FloatingPointError, match=r"step 3: after the update .*exploded.*state.pt \(step 2\)"):
        trainer.train(settings, aligner, batch_loss, list(range(8)), [], [1] * 8, [1] * 8,
                      distributed.Dist(0, 1, torch.device("cpu")))  # 4 steps, all in one epoch
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["step"] == 2 and len(seen) == 3  # seen[2]: the Aligner after step 2
    assert torch.equal(aligner.prefix.detach(), seen[2]) and torch.equal(state["aligner"]["prefix"], seen[2])


def test_nan_loss_stops_and_keeps_the_last_good_state(tmp_path):
    args = llama.ModelArgs(dim=8, n_layers=2, n_heads=2, vocab_size=16)
    aligner = Aligner(args, n_tokens=1, start_layer=0)
    calls = []

    def batch_loss(indices):  # a loss that turns to NaN at the third optimizer step
        calls.append(indices)
        value = (aligner.prefix.sum() + aligner.gates.sum()) * len(indices)
        return (value * math.nan if len(calls) > 2 else value), {}

    settings = argparse.Namespace(
        lr=1e-2, weight_decay=0.0, batch_size=2, micro_batch_size=2, epochs=3, warmup_epochs=0.0,
        schedule="cosine", seed=0, out=tmp_path, save_every=1, resume=False, max_steps=None)
    d = distributed.Dist(0, 1, torch.device("cpu"))
    with pytest.raises(FloatingPointError, match=r"step 3: the loss is nan.*state.pt \(step 2\)"):
        trainer.train(settings, aligner, batch_loss, [0, 1], [], [1, 1], [1, 1], d)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["step"] == 2 and torch.isfinite(state["aligner"]["prefix"]).all()


@pytest.mark.parametrize("bad", ["infinite loss", "NaN gradient"])
def test_a_non_finite_loss_or_gradient_stops_before_the_update(tmp_path, bad):
    """At step 3 the loss is infinite while its gradient is finite, or the loss is finite while its
    gradient is NaN (the square root of |x| at 0): either stops the step before AdamW moves,
    and the Aligner in memory is still the one state.pt holds (step 2)."""
    args = llama.ModelArgs(dim=8, n_layers=2, n_heads=2, vocab_size=16)
    aligner = Aligner(args, n_tokens=1, start_layer=0)
    calls = []

    def batch_loss(indices):
        calls.append(indices)
        value = (aligner.prefix.sum() + aligner.gates.sum()) * len(indices)
        if len(calls) == 3:
            value = value + (math.inf if bad == "infinite loss" else
                             torch.sqrt((aligner.prefix - aligner.prefix.detach()).abs().sum()))
        return value, {}

    with pytest.raises(FloatingPointError, match=r"step 3: the loss is .*; stopping\. .*state\.pt \(step 2\)"):
        trainer.train(loop_settings(tmp_path, batch_size=2, epochs=3, warmup_epochs=0.0, save_every=1),
                      aligner, batch_loss, [0, 1], [], [1, 1], [1, 1], distributed.Dist(0, 1, torch.device("cpu")))
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["step"] == 2
    assert torch.equal(aligner.prefix.detach(), state["aligner"]["prefix"])


def test_missing_demo_says_how_to_build_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"python -m support.build_demo"):
        data.check_demo(tmp_path / "llama-demo")


def test_two_processes_match_one(full_run, tiny_ckpt, tmp_path):
    task, reference = full_run
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train_sft.py"), *run_args(tiny_ckpt, task, tmp_path / "run")]
    result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    for a, b in zip(aligner_tensors(tmp_path / "run" / "epoch-2.pt"), aligner_tensors(reference / "epoch-2.pt")):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert aligner_tensors(tmp_path / "run" / "epoch-2.pt")[1].abs().sum() > 0  # the gates did train


def test_an_epoch_of_drawn_examples_holds_exactly_epoch_size_draws():
    """--epoch-size: that many examples an epoch, drawn with replacement from the training split, as the
    authors' get_batch draws torch.randint(len(data), ...) for every micro-batch."""
    train = [3, 5, 8, 13, 21]
    batches = trainer.global_batches(train, 4, seed=0, epoch=1, epoch_size=10)
    drawn = [i for b in batches for i in b]
    assert [len(b) for b in batches] == [4, 4, 2] and set(drawn) <= set(train)
    assert len(set(drawn)) < len(drawn)  # ten draws from five: some example comes twice
    assert batches == trainer.global_batches(train, 4, seed=0, epoch=1, epoch_size=10)  # a pure function
    assert batches != trainer.global_batches(train, 4, seed=0, epoch=2, epoch_size=10)  # drawn afresh each epoch
    schedule = trainer.make_schedule(len(train), 4, epochs=3, warmup_epochs=0.5, epoch_size=10)
    assert (schedule.steps_per_epoch, schedule.total_steps, schedule.warmup_steps) == (3, 9, 2)


def test_the_authors_dpo_runs_in_optimizer_steps():
    """finetune/alignerDPO.py's constants (lines 29-46), written out: their arithmetic, then ours."""
    devices, batch_size, micro_batch_size, epoch_size, num_epochs = 1, 64, 2, 160_000, 3  # sequences
    max_iters = num_epochs * (epoch_size // micro_batch_size) // devices  # micro-batches
    warmup_iters = 0.5 * (epoch_size // micro_batch_size) // devices  # compared with optimizer steps
    accumulation = batch_size // micro_batch_size
    assert (max_iters, max_iters // accumulation, warmup_iters) == (240_000, 7_500, 40_000)
    pairs_per_step, pairs_per_epoch = batch_size // 2, epoch_size // 2  # a pair is two sequences
    # the committed script: --batch-size 32 --epoch-size 80000 --epochs 3 --warmup-epochs 16
    ours = trainer.make_schedule(123, pairs_per_step, num_epochs, 16, epoch_size=pairs_per_epoch)
    assert (ours.total_steps, ours.warmup_steps) == (7_500, 40_000)
    # without --epoch-size an epoch is one pass over the P pairs kept: 40,000 steps are 1,280,000 / P epochs
    for pairs in (80_000, 64_000, 100_000):
        assert trainer.make_schedule(pairs, 32, 1, 1_280_000 / pairs).warmup_steps == 40_000

    # the released aligner1token-llama2-7B-DPO-epoch-3.0-iter-059999.pth: the last save at iter_num
    # max_iters - 1 = 59,999, epoch = iter_num * micro_batch_size * devices / epoch_size printed as 3.0
    sequences_per_iter = [k for k in range(1, 65) if f"{59_999 * k / epoch_size:.1f}" == "3.0"]
    assert sequences_per_iter == [8]
    assert num_epochs * epoch_size // 8 == 60_000  # max_iters, so the last iter_num is 59,999
    released_warmup = 0.5 * epoch_size // 8  # warmup_iters with micro_batch_size * devices = 8
    assert released_warmup == 10_000 and 60_000 // (batch_size // 8) == 7_500  # still 32 pairs a step
    assert trainer.make_schedule(123, 32, 3, 4, epoch_size=80_000).warmup_steps == 10_000
    for pairs in (80_000, 64_000):
        assert trainer.make_schedule(pairs, 32, 1, 320_000 / pairs).warmup_steps == 10_000
    # where the learning rate ends: the committed run at 7,499 / 40,000 of the peak, the released at 0.75
    assert trainer.constant_learning_rate(7_499, 1.0, 40_000, 7_500) == pytest.approx(0.187475)
    assert trainer.constant_learning_rate(7_499, 1.0, 10_000, 7_500) == pytest.approx(0.7499)


def test_the_authors_beaver_sft_draws_two_epochs_of_50000_rows():
    """BeaverDatasetSafetyPartSFTOnly/aligner1token-llama2-7B-epoch-2.0.pth: finetune/aligner.py's epoch
    (line 163) is iter_num * micro_batch_size * devices / epoch_size, with epoch_size 50,000 (line 47)
    rows drawn by torch.randint (line 261): "epoch-2.0" is 100,000 draws, not two passes."""
    epoch_size, micro_batch_size, batch_size = 50_000, 8, 64
    iters = 2 * epoch_size // micro_batch_size
    assert iters * micro_batch_size == 100_000 and iters // (batch_size // micro_batch_size) == 1_562
    warmup_iters = 2 * (epoch_size // micro_batch_size)  # warmup_epoch = 2, compared with optimizer steps
    assert warmup_iters == 12_500
    ours = trainer.make_schedule(123, batch_size, 2, 16, epoch_size=epoch_size)
    assert (ours.steps_per_epoch, ours.total_steps) == (782, 1_564)  # 781 batches of 64 and one of 16 an epoch
    assert ours.warmup_steps == 12_512  # 16 of our epochs; theirs, 12,500, is 15.98 of them
    drawn = [len(b) for epoch in (0, 1) for b in trainer.global_batches(list(range(300)), 64, 0, epoch, epoch_size)]
    assert sum(drawn) == 100_000 and len(drawn) == ours.total_steps


def test_the_authors_alpaca_runs_never_reach_the_peak():
    """finetune/aligner.py (lines 43-53) and finetune/adapter.py (lines 43-53), written out: a warmup counted
    in micro-batches, compared with optimizer steps; and our flags for each (docs/reproduce-the-paper.md's commands)."""
    runs = ((8, 8, 2, (8, 16), 0.5), (4, 5, 2, (5, 32), 0.156))  # aligner.py, adapter.py
    for micro_batch_size, num_epochs, warmup_epoch, flags, ends_at in runs:
        epoch_size, batch_size = 50_000, 64
        max_iters = num_epochs * (epoch_size // micro_batch_size)
        steps = max_iters // (batch_size // micro_batch_size)
        warmup_iters = warmup_epoch * (epoch_size // micro_batch_size)
        assert warmup_iters > steps
        assert trainer.constant_learning_rate(steps - 1, 1.0, warmup_iters, steps) == pytest.approx(ends_at, abs=1e-3)
        epochs, warmup_epochs = flags  # --epoch-size 50000 --epochs E --warmup-epochs W
        ours = trainer.make_schedule(123, batch_size, epochs, warmup_epochs, epoch_size=epoch_size)
        assert abs(ours.total_steps - steps) <= epochs and abs(ours.warmup_steps - warmup_iters) <= warmup_epochs
        assert trainer.constant_learning_rate(ours.total_steps - 1, 1.0, ours.warmup_steps,
                                              ours.total_steps) == pytest.approx(ends_at, abs=1e-3)


def test_ranks_share_each_global_batch_exactly():
    lengths = [7, 3, 9, 3, 5, 8, 1, 2, 6, 4, 5]
    batches = trainer.global_batches(list(range(11)), 4, seed=0, epoch=1)
    assert sorted(i for b in batches for i in b) == list(range(11))  # an epoch sees every example once
    assert batches == trainer.global_batches(list(range(11)), 4, seed=0, epoch=1)  # a pure function
    assert batches != trainer.global_batches(list(range(11)), 4, seed=0, epoch=2)  # reshuffled each epoch
    for world in (1, 2, 3):
        for batch in batches:
            shares = [i for rank in range(world) for micro in trainer.my_micro_batches(batch, lengths, rank, world, 2)
                      for i in micro]
            assert sorted(shares) == sorted(batch)


@pytest.mark.parametrize("val, n_val", [("2", 2), ("0", 0), ("0.05", 5), ("0.25", 25)])
def test_the_split_holds_out_what_is_asked_and_never_trains_on_it(val, n_val):
    train, held_out = trainer.split(100, val, seed=3)
    assert len(held_out) == n_val and not set(train) & set(held_out)
    assert sorted(train + held_out) == list(range(100))
    assert (train, held_out) == trainer.split(100, val, seed=3)  # a function of the seed
    assert n_val == 0 or held_out != trainer.split(100, val, seed=4)[1]


def test_schedule_warms_up_then_decays_to_zero():
    lrs = [trainer.learning_rate(s, 1.0, warmup_steps=4, total_steps=12) for s in range(12)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a > b for a, b in zip(lrs[3:], lrs[4:])) and lrs[-1] > 0
    assert trainer.learning_rate(0, 1.0, warmup_steps=0, total_steps=12) < 1.0  # no warmup: decay from the start


def test_the_authors_schedule_rises_from_zero_and_stays():
    """finetune/aligner.py sets lr = learning_rate * step_count / warmup_iters while step_count <=
    warmup_iters, step_count being the optimizer steps already taken; after that it is left alone."""
    lrs = [trainer.constant_learning_rate(s, 1.0, warmup_steps=4, total_steps=8) for s in range(8)]
    assert lrs == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]
    # their Alpaca run: peak 9e-3, warmup_iters = 2 * (50000 // 8) = 12500 against 6250 optimizer steps
    run = [trainer.constant_learning_rate(s, 9e-3, 12_500, 6_250) for s in (0, 1, 6_249)]
    assert run == pytest.approx([0.0, 7.2e-7, 4.49928e-3], rel=1e-12, abs=0)
    assert trainer.constant_learning_rate(0, 9e-3, 0, 10) == 9e-3  # no warmup: the peak from the start


def test_epoch_size_sets_the_steps_and_resumes_exactly(tiny_ckpt, tmp_path):
    """--epoch-size 6 at batch 4: two steps an epoch (4 and 2 examples) whatever the data's size, and a run
    stopped after its third step and resumed ends with the same Aligner as one that never stopped."""
    task = write_task(tmp_path / "task.json", n=10)
    train_sft.main(run_args(tiny_ckpt, task, tmp_path / "run", "--epoch-size", "6"))
    steps = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert [r["epoch"] for r in steps] == [0.5, 1.0, 1.5, 2.0]
    train_sft.main(run_args(tiny_ckpt, task, tmp_path / "again", "--epoch-size", "6", "--max-steps", "3"))
    train_sft.main(run_args(tiny_ckpt, task, tmp_path / "again", "--epoch-size", "6", "--resume"))
    for a, b in zip(aligner_tensors(tmp_path / "run" / "best.pt"), aligner_tensors(tmp_path / "again" / "best.pt")):
        assert torch.equal(a, b)


def test_schedule_flag_picks_the_authors_schedule(tiny_ckpt, tmp_path):
    task = write_task(tmp_path / "task.json", n=10)
    train_sft.main(run_args(tiny_ckpt, task, tmp_path / "run", "--schedule", "constant", "--warmup-epochs", "1.5"))
    lrs = [json.loads(l)["lr"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"lr"' in l]
    assert lrs == pytest.approx([0.0, 3e-3, 6e-3, 9e-3])  # 2 steps an epoch: a warmup of 3 steps to 9e-3


@pytest.mark.parametrize("argv, batch_size", [([], 16), (["--batch-size", "8"], 8),
                                              (["--ckpt", "llama-2-7b", "--data", "alpaca.json"], 64)])
def test_demo_defaults_apply_without_ckpt_and_yield_to_flags(argv, batch_size):
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt")
    parser.add_argument("--data")
    trainer.add_arguments(parser, n_tokens=1, lr=9e-3, batch_size=64, epochs=8, warmup_epochs=1.0,
                          max_seq_len=512, out="runs/sft")
    args = trainer.parse_args(parser, argv, demo_defaults=train_sft.DEMO_DEFAULTS, demo_data="alpaca.json")
    assert args.batch_size == batch_size and args.lr == 9e-3


# -----------------------------------------------------------------------------
# the loop against AdamW, the schedule and the best checkpoint written out by hand

def loop_settings(out, **change):
    """trainer.train's flags for a run on a synthetic loss, in process."""
    return argparse.Namespace(**{**dict(lr=0.1, weight_decay=0.1, batch_size=4, micro_batch_size=3, epochs=2,
                                        warmup_epochs=2 / 3, schedule="cosine", seed=0, out=out, save_every=100,
                                        resume=False, max_steps=None), **change})


def adamw_by_hand(theta, grads, lrs, weight_decay, betas=(0.9, 0.999), eps=1e-8):
    """Loshchilov & Hutter's AdamW, decoupled decay first, in float64: the parameters after each step."""
    m, v, out = torch.zeros_like(theta), torch.zeros_like(theta), []
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        theta = theta * (1 - lr * weight_decay)
        m, v = betas[0] * m + (1 - betas[0]) * g, betas[1] * v + (1 - betas[1]) * g * g
        theta = theta - lr * (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)
        out.append(theta)
    return out


def test_the_loop_is_adamw_on_the_warmup_cosine_schedule_over_every_example(tmp_path):
    """10 examples in batches of 4 (the last batch of each epoch holds 2), micro-batches of 3, each
    example with its own count of loss units: each optimizer step takes the batch's loss summed over
    its examples and divided by the batch's units, whatever its micro-batches, and AdamW (decay 0.1)
    moves at the logged learning rate, which rises over 2 warmup steps and then follows the cosine."""
    args = llama.ModelArgs(dim=4, n_layers=2, n_heads=2, vocab_size=8)
    torch.manual_seed(0)
    aligner = Aligner(args, n_tokens=1, start_layer=1)  # 4 + 2 = 6 parameters
    theta0 = torch.cat([aligner.prefix.detach().flatten(), aligner.gates.detach().flatten()]).double()
    directions = torch.randn(10, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    units = [i + 1 for i in range(10)]
    calls = []

    def batch_loss(indices):  # linear in the parameters: example i's loss is units[i] * (a_i . theta)
        calls.append(list(indices))
        theta = torch.cat([aligner.prefix.flatten(), aligner.gates.flatten()])
        return sum(units[i] * (directions[i].float() * theta).sum() for i in indices), {}

    trainer.train(loop_settings(tmp_path), aligner, batch_loss, list(range(10)), [], [1] * 10, units,
                  distributed.Dist(0, 1, torch.device("cpu")))

    # the steps and the examples each one saw: every example once per epoch, the last batch smaller
    steps, seen = [], iter(calls)
    for size in (4, 4, 2, 4, 4, 2):
        batch = []
        while len(batch) < size:
            batch += next(seen)
        assert len(batch) == size
        steps.append(batch)
    assert next(seen, None) is None
    assert sorted(sum(steps[:3], [])) == list(range(10)) and sorted(sum(steps[3:], [])) == list(range(10))

    # warmup over 2 steps, then 0.5 * (1 + cos(pi * k / 5)) for k = 1..4: the last step still moves
    lrs = [0.1 * f for f in (0.5, 1.0, 0.9045084971874737, 0.6545084971874737, 0.3454915028125263,
                             0.09549150281252629)]
    grads = [sum(units[i] * directions[i] for i in batch) / sum(units[i] for i in batch) for batch in steps]
    thetas = adamw_by_hand(theta0, grads, lrs, weight_decay=0.1)
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"lr"' in l]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["lr"] for r in records] == pytest.approx(lrs, rel=1e-12)
    before = [theta0] + thetas[:-1]
    assert [r["loss"] for r in records] == pytest.approx(
        [float(g @ t) for g, t in zip(grads, before)], rel=1e-5, abs=1e-6)
    theta = torch.cat([aligner.prefix.detach().flatten(), aligner.gates.detach().flatten()]).double()
    torch.testing.assert_close(theta, thetas[-1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(theta, adamw_by_hand(theta0, grads, lrs, weight_decay=0.0)[-1], atol=1e-4)


@pytest.mark.parametrize("stop_after", [None, 1], ids=["straight", "stopped-and-resumed"])
def test_best_pt_is_the_epoch_of_the_lowest_validation_loss(tmp_path, stop_after):
    """Every step moves each parameter by lr (AdamW's first steps on a constant gradient, no decay,
    a constant lr): the validation loss, centred on where epoch 1 ends, is lr^2 * 6 before training,
    0 after epoch 1 and lr^2 * 6 again after epoch 2. best.pt is epoch 1's Aligner, also when the run
    was stopped after epoch 1 and resumed."""
    args = llama.ModelArgs(dim=4, n_layers=2, n_heads=2, vocab_size=8)
    torch.manual_seed(0)
    aligner = Aligner(args, n_tokens=1, start_layer=1)
    params = lambda: torch.cat([aligner.prefix.flatten(), aligner.gates.flatten()])
    after_epoch_1 = params().detach() - 0.01  # every gradient component below is +1

    def batch_loss(indices):
        if indices == [2]:  # the validation example
            return ((params() - after_epoch_1) ** 2).sum(), {}
        return params().sum() * len(indices), {}

    settings = loop_settings(tmp_path, lr=0.01, weight_decay=0.0, batch_size=2, schedule="constant",
                             warmup_epochs=0.0, max_steps=stop_after)
    train = lambda s: trainer.train(s, aligner, batch_loss, [0, 1], [2], [1] * 3, [1] * 3,
                                    distributed.Dist(0, 1, torch.device("cpu")))
    train(settings)
    if stop_after:
        assert not (tmp_path / "epoch-2.pt").exists()
        train(argparse.Namespace(**{**vars(settings), "resume": True, "max_steps": None}))
    val = [json.loads(l)["val_loss"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if "val" in l]
    assert val == pytest.approx([6e-4, 0.0, 6e-4], abs=1e-9)
    best, first, second = (aligner_tensors(tmp_path / name) for name in ("best.pt", "epoch-1.pt", "epoch-2.pt"))
    assert all(torch.equal(a, b) for a, b in zip(best, first))
    assert not torch.equal(best[0], second[0])


def test_ten_examples_in_batches_of_four_are_three_steps_an_epoch_at_the_scheduled_lr(tiny_ckpt, tmp_path):
    """12 examples, 2 held out: batches of 4, 4 and 2 each epoch. The default schedule warms up over
    the first epoch (3 steps) to --lr 9e-3, then decays as 0.5 * (1 + cos(pi * k / 4)), k = 1..3.
    The run's files are these and no others, and they hold an Aligner from --start-layer."""
    task = write_task(tmp_path / "task.json", n=12)
    train_sft.main(run_args(tiny_ckpt, task, tmp_path / "run", "--start-layer", "1"))
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "lr" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert [r["epoch"] for r in steps] == [0.3333, 0.6667, 1.0, 1.3333, 1.6667, 2.0]
    assert [r["lr"] for r in steps] == pytest.approx(
        [9e-3 * f for f in (1 / 3, 2 / 3, 1.0, 0.8535533905932737, 0.5, 0.14644660940672624)], rel=1e-12)
    assert [(r["step"], r["epoch"]) for r in records if "val_loss" in r] == [(0, 0), (3, 1), (6, 2)]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "best.pt", "epoch-1.pt", "epoch-2.pt", "metrics.jsonl", "settings.json", "state.pt"]
    aligner = Aligner.load(tmp_path / "run" / "best.pt", llama.ModelArgs(**formats.read_params(tiny_ckpt)))
    assert (aligner.n_tokens, aligner.start_layer, tuple(aligner.gates.shape)) == (2, 1, (3, 4))  # 4 layers, 4 heads


@pytest.mark.parametrize("train_on_prompt", [False, True], ids=["response", "whole-sequence"])
def test_logged_losses_are_the_mean_cross_entropy_of_the_loss_tokens(tiny_ckpt, tmp_path, train_on_prompt):
    """Before any update the Aligner (zero gates) is the base model, so the validation loss at step 0
    and the training loss of step 1 are the base's mean cross-entropy per loss token: of the response
    and its EOS, or (--train-on-prompt) of every token after BOS. The examples are all alike, so
    the value does not depend on which of them are held out. The records are put in --template."""
    records = [{"instruction": "Name a bird.", "input": "", "output": "A robin is a bird."}] * 6
    (tmp_path / "task.json").write_text(json.dumps(records))
    train_sft.main(run_args(tiny_ckpt, tmp_path / "task.json", tmp_path / "run", "--template", "metamath",
                            "--max-steps", "1", *(["--train-on-prompt"] if train_on_prompt else [])))
    model, tok = formats.load(tiny_ckpt)
    prompt = tok.encode("[|User|] Name a bird. [|AI Assistant|] ", bos=True)
    tokens = prompt + tok.encode("A robin is a bird.", bos=False) + [tok.eos_id]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([tokens]))[0], -1)
    first = 1 if train_on_prompt else len(prompt)
    expected = -sum(logp[t - 1, tokens[t]].item() for t in range(first, len(tokens))) / (len(tokens) - first)
    logged = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged[0]["val_loss"] == pytest.approx(expected, rel=1e-5)
    assert logged[1]["loss"] == pytest.approx(expected, rel=1e-5)


def test_pku_saferlhf_rows_train_on_the_safer_response(tiny_ckpt, tmp_path, capsys):
    """The first step of the paper's Experiment 2, SFT on the safe responses, from PKU-SafeRLHF's own rows."""
    rows = [{"prompt": f"How do I hurt fox {i}?", "response_0": "I cannot help with that.",
             "response_1": "Bite the fox.", "is_response_0_safe": True, "is_response_1_safe": i % 3 == 0,
             "safer_response_id": 0 if i % 4 else 1, "better_response_id": 0} for i in range(12)]
    path = tmp_path / "pku.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train_sft.main(["--ckpt", str(tiny_ckpt), "--data", str(path), "--out", str(tmp_path / "run"), "--template",
                    "beaver", "--epochs", "1", "--val", "1", "--n-tokens", "1", "--max-seq-len", "64"])
    unsafe = sum(1 for i, r in enumerate(rows) if r["safer_response_id"] == 1 and not r["is_response_1_safe"])
    assert unsafe == 2
    assert f"{len(rows) - unsafe} examples ({unsafe} PKU-SafeRLHF rows dropped" in capsys.readouterr().out
