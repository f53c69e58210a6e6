"""Bad inputs of every kind are refused in one line that names the file or flag, before any
model loads where they can be; --help shows every default, and logs hold no progress bars.

Cases run through cli.run around main(argv) in this process, as tests/test_errors.py does;
the helpers are that file's. Each test feeds its script several bad inputs.
"""

import errno
import io
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from support import cli, files, formats, trainer
import evaluate
import generate
import llama
from aligner import Aligner
from support.files import FileError
from test_errors import (SCRIPTS, as_main_of, check_failure, ckpt, dpo_args, dpo_data, fails,  # noqa: F401
                         model_args, run_script, sft_args, sft_data, snapshot, write_jsonl)
from support.formats import read_aligner

ROOT = Path(__file__).resolve().parents[1]


def no_load(monkeypatch):
    """Make every way of loading a model fail the test: the case must stop before it."""
    def loaded(*a, **k):
        pytest.fail("the model loaded")
    for module in (generate, evaluate, trainer):
        monkeypatch.setattr(module, "load", loaded)


def succeeds(script, argv, capsys):
    """(stdout, stderr) of a run that must succeed."""
    code, out, err = run_script(SCRIPTS[script], argv, capsys)
    assert code == 0, err
    return out, err


# -----------------------------------------------------------------------------
# a full disk: the file is named, the temporary file removed, the old file kept

SHORT_WRITES = {
    "ENOSPC": OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
    "EDQUOT": OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)),
    "torch's position check": RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1152 vs 1044"),
    "torch's failed write": RuntimeError("[enforce fail at inline_container.cc:604] . PytorchStreamWriter failed "
                                         "writing file data/0: file write failed"),
}


def test_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / "best.pt"
    target.write_bytes(b"the old Aligner")
    for name, error in SHORT_WRITES.items():
        def torch_save(obj, f, error=error):
            f.write(b"half a file")
            raise error
        monkeypatch.setattr(files.torch, "save", torch_save)
        with pytest.raises(FileError) as info:
            files.atomic_save({"x": torch.ones(2)}, target)
        message = str(info.value)
        assert message.startswith(f"{target}: not written: the disk is full"), (name, message)
        assert "unchanged" in message and "\n" not in message
        assert target.read_bytes() == b"the old Aligner", name
        assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"], name  # the temporary file is gone
    monkeypatch.undo()

    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(files.os, "fsync", fsync)
    with pytest.raises(FileError, match=f"^{re.escape(str(tmp_path / 'new.json'))}: not written: the disk is full"):
        files.atomic_text(tmp_path / "new.json", "{}")
    with pytest.raises(FileError, match=f"^{re.escape(str(tmp_path / 'metrics.jsonl'))}: not written: the disk"):
        files.append_line(tmp_path / "metrics.jsonl", "{}")
    assert not (tmp_path / "new.json").exists()
    monkeypatch.undo()

    def broken(f):  # an error of the caller's own, not the disk's, is left as it is
        raise RuntimeError("a bug in the writer")
    with pytest.raises(RuntimeError, match="a bug in the writer"):
        files.atomic_write(target, broken)
    assert target.read_bytes() == b"the old Aligner"


def test_the_scripts_say_the_disk_is_full_in_one_line(tiny_ckpt, capsys, tmp_path, monkeypatch):
    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(files.os, "fsync", fsync)
    fails("generate", ["--ckpt", tiny_ckpt, "--prompt", "Hi.", "--max-new-tokens", "2",
                       "--out", tmp_path / "answers.jsonl"], capsys, tmp_path / "answers.jsonl", "the disk is full")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    def torch_save(obj, f):
        raise SHORT_WRITES["torch's position check"]
    monkeypatch.setattr(files.torch, "save", torch_save)
    out = tmp_path / "run"
    line = fails("train_sft", sft_args(tiny_ckpt, sft_data(tmp_path), out), capsys, out, "the disk is full")
    assert re.search(r"(best|state)\.pt: not written", line), line
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left behind


# -----------------------------------------------------------------------------
# every error about a file names it

def test_an_aligner_files_own_settings_are_named(tiny_ckpt, model_args, capsys, tmp_path):
    base = {key: getattr(model_args, key) for key in ("dim", "n_layers", "n_heads", "n_kv_heads")}
    cases = {
        "no tokens": ({"n_tokens": 0, "prefix": torch.zeros(0, model_args.dim)}, "at least one token, not 0"),
        "a start layer past the model": ({"start_layer": 9}, "start_layer 9 is outside the model's 4 layers"),
        "a count that is no number": ({"n_tokens": "two"}, "two"),
        "heads that do not divide": ({"base": {**base, "n_heads": 3}}, "must divide"),
    }
    for name, (change, words) in cases.items():
        state = {"n_tokens": 1, "start_layer": 2, "base": base, "prefix": torch.zeros(1, model_args.dim),
                 "gates": torch.zeros(2, model_args.n_heads), **change}
        path = tmp_path / f"{name.replace(' ', '-')}.pt"
        torch.save(state, path)
        for script, argv in (("generate", ["--ckpt", tiny_ckpt, "--prompt", "Hi.", "--aligner", path]),
                             ("evaluate", ["qa", "--ckpt", tiny_ckpt, "--aligner", path]),
                             ("train_dpo", dpo_args(tiny_ckpt, dpo_data(tmp_path), tmp_path / "run",
                                                    "--init-aligner", path))):
            line = fails(script, argv, capsys, path, watch=[tmp_path])
            assert words in line, (name, line)
        with pytest.raises(ValueError, match=re.escape(str(path))):
            read_aligner(path, model_args)


@pytest.fixture
def hf_shards(tiny_ckpt, tmp_path):
    """The tiny checkpoint as a Hugging Face folder of two safetensors files and their index."""
    from hf_layout import write_hf

    model, _ = formats.load(tiny_ckpt)
    return model, write_hf(model.state_dict(), model.args, tmp_path / "hf", n_files=2,
                           tokenizer=tiny_ckpt.parent / "tokenizer.model")


def test_an_index_that_misplaces_a_weight_is_named(hf_shards, capsys, tmp_path):
    model, folder = hf_shards
    index = folder / "model.safetensors.index.json"
    content = json.loads(index.read_text())
    first = sorted(set(content["weight_map"].values()))[0]
    content["weight_map"] = {name: first for name in content["weight_map"]}  # every weight in the first file
    index.write_text(json.dumps(content))
    fails("generate", ["--ckpt", folder, "--prompt", "Hi."], capsys, index, f"in {first}, which does not hold")

    from hf_layout import write_hf  # the .bin layout: the index is named when the weight is read
    bins = write_hf(model.state_dict(), model.args, tmp_path / "bin", "bin", n_files=2,
                    tokenizer=folder / "tokenizer.model")
    index = bins / "pytorch_model.bin.index.json"
    content = json.loads(index.read_text())
    files_named = sorted(set(content["weight_map"].values()))
    content["weight_map"]["lm_head.weight"] = next(f for f in files_named if f != content["weight_map"]["lm_head.weight"])
    index.write_text(json.dumps(content))
    fails("generate", ["--ckpt", bins, "--prompt", "Hi."], capsys, "holds no lm_head.weight", index)


def old_format(path, protocol=2):
    torch.save(torch.load(path, weights_only=True), path, _use_new_zipfile_serialization=False,
               pickle_protocol=protocol)


def warning_lines(err: str) -> list:
    return [line for line in err.splitlines() if "warning" in line.lower()]


def test_old_formats_warn_in_one_line_each_and_plain_pickles_are_named(hf_shards, model_args, capsys, tmp_path):
    model, _ = hf_shards
    from hf_layout import write_hf
    bins = write_hf(model.state_dict(), model.args, tmp_path / "bin", "bin", n_files=2,
                    tokenizer=tmp_path / "hf" / "tokenizer.model")
    shards = sorted(bins.glob("pytorch_model-*.bin"))
    for path in shards:
        old_format(path)
    _, err = succeeds("generate", ["--ckpt", bins, "--prompt", "Hi.", "--max-new-tokens", "2"], capsys)
    lines = warning_lines(err)
    assert len(lines) == len(shards), err  # one line for each old file, torch's own warnings not shown
    for line, path in zip(sorted(lines), shards):
        assert line == f"generate.py: warning: {path}: torch's old (non-zip) format cannot be memory-mapped; " \
                       "reading it whole"
    assert not [line for line in err.splitlines() if line.startswith(" ")], err  # no source lines

    aligner = Aligner(model_args, n_tokens=1)
    aligner.save(tmp_path / "aligner.pt")
    state = torch.load(tmp_path / "aligner.pt", weights_only=True)
    old_format(tmp_path / "aligner.pt")
    _, err = succeeds("generate", ["--ckpt", tmp_path / "hf", "--prompt", "Hi.", "--max-new-tokens", "2",
                                   "--aligner", tmp_path / "aligner.pt"], capsys)
    assert warning_lines(err) == [], err

    import pickle
    refused = {}
    for protocol in (2, 4, 5):
        refused[tmp_path / f"pickled-{protocol}.pt"] = "a plain pickle"
        (tmp_path / f"pickled-{protocol}.pt").write_bytes(pickle.dumps(state, protocol=protocol))
    for protocol in (4, 5):  # torch warns, then fails: its safe unpickler cannot read these
        refused[tmp_path / f"old-{protocol}.pt"] = f"old (non-zip) format with pickle protocol {protocol}"
        shutil.copy(tmp_path / "aligner.pt", tmp_path / f"old-{protocol}.pt")
        old_format(tmp_path / f"old-{protocol}.pt", protocol)
    for path, words in refused.items():
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            code, _, err = run_script(generate, ["--ckpt", tmp_path / "hf", "--prompt", "Hi.", "--aligner", path],
                                      capsys)
        check_failure(code, err, "generate", [path, words])
        assert warning_lines(err) == [], err


def test_warnings_are_one_line_without_their_source(capsys, monkeypatch):
    def warns(argv):
        warnings.warn("first line of it\nsecond line", UserWarning)

    monkeypatch.setattr(generate, "main", as_main_of(generate, warns))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        code, _, err = run_script(generate, [], capsys)
    assert code == 0 and err == "generate.py: warning: first line of it\n"


# -----------------------------------------------------------------------------
# --max-seq-len within the checkpoint's context

def test_max_seq_len_past_the_context_is_refused_before_the_model_loads(tiny_ckpt, capsys, tmp_path, monkeypatch):
    no_load(monkeypatch)
    too_long = ["--max-seq-len", "1000000000"]
    argvs = {"generate": ["--ckpt", tiny_ckpt, "--prompt", "Hi.", *too_long],
             "evaluate": ["qa", "--ckpt", tiny_ckpt, *too_long],
             "train_sft": sft_args(tiny_ckpt, sft_data(tmp_path), tmp_path / "sft") + too_long,
             "train_dpo": dpo_args(tiny_ckpt, dpo_data(tmp_path), tmp_path / "dpo") + too_long}
    for script, argv in argvs.items():
        fails(script, argv, capsys, "--max-seq-len 1000000000", "context of 4096 tokens", "params.json records none",
              "--beyond-context", watch=[tmp_path])
    fails("generate", ["--ckpt", tiny_ckpt, "--prompt", "Hi.", "--max-seq-len", "4097"], capsys, "4097")


def test_a_hugging_face_context_is_its_max_position_embeddings(hf_shards, capsys, monkeypatch):
    _, folder = hf_shards
    config = folder / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "max_position_embeddings": 256}))
    no_load(monkeypatch)
    fails("generate", ["--ckpt", folder, "--prompt", "Hi.", "--max-seq-len", "257"], capsys,
          "--max-seq-len 257", "context of 256 tokens", f"{config}'s max_position_embeddings")
    fails("evaluate", ["qa", "--ckpt", folder], capsys, "--max-seq-len 4096", "256")  # evaluate's default, 4096
    settings = json.loads(config.read_text())
    del settings["max_position_embeddings"]
    config.write_text(json.dumps(settings))
    fails("generate", ["--ckpt", folder, "--prompt", "Hi.", "--max-seq-len", "2049"], capsys,
          "context of 2048 tokens", "LlamaConfig's default")
    config.write_text(json.dumps({**settings, "max_position_embeddings": "long"}))
    fails("generate", ["--ckpt", folder, "--prompt", "Hi."], capsys, str(config), "max_position_embeddings")


def test_beyond_context_goes_past_it(tiny_ckpt, capsys):
    succeeds("generate", ["--ckpt", tiny_ckpt, "--prompt", "Hi.", "--max-new-tokens", "2",
                                   "--max-seq-len", "5000", "--beyond-context"], capsys)


# -----------------------------------------------------------------------------
# --shots within the shots the data holds

def mmlu_folder(folder, dev_rows=5):
    for split, n in (("dev", dev_rows), ("test", 2)):
        (folder / split).mkdir(parents=True, exist_ok=True)
        for subject in ("astronomy", "virology"):
            rows = "".join(f'"{subject} question {i}?",a,b,c,d,A\n' for i in range(n if subject == "virology" else 6))
            (folder / split / f"{subject}_{split}.csv").write_text(rows)
    return folder


def test_more_shots_than_the_data_holds_are_refused_before_the_model_loads(tiny_ckpt, capsys, tmp_path, monkeypatch):
    no_load(monkeypatch)
    mmlu = mmlu_folder(tmp_path / "mmlu")
    for shots in ("6", "100"):
        fails("evaluate", ["mmlu", "--ckpt", tiny_ckpt, "--data", mmlu, "--shots", shots], capsys,
              f"--shots {shots}", mmlu / "dev" / "virology_dev.csv", "holds 5 examples", watch=[tmp_path])
    write_jsonl(tmp_path / "gsm8k" / "train.jsonl", [{"question": f"{i} + 1?", "answer": f"#### {i + 1}"}
                                                     for i in range(3)])
    test = write_jsonl(tmp_path / "gsm8k" / "test.jsonl", [{"question": "1 + 1?", "answer": "#### 2"}])
    fails("evaluate", ["gsm8k", "--ckpt", tiny_ckpt, "--data", test], capsys,  # the default, 8 shots
          "--shots 8", tmp_path / "gsm8k" / "train.jsonl", "holds 3 examples", watch=[tmp_path])
    (tmp_path / "mmlu" / "dev" / "astronomy_dev.csv").unlink()
    fails("evaluate", ["mmlu", "--ckpt", tiny_ckpt, "--data", mmlu, "--shots", "1"], capsys,
          "astronomy_dev.csv", "missing")
    for flags in (["--shots", "2"], ["--paper"]):
        fails("evaluate", ["qa", "--ckpt", tiny_ckpt, *flags], capsys, flags[0], "qa takes no shots", code=2)


def test_as_many_shots_as_the_data_holds_run_in_full(tiny_ckpt, capsys, tmp_path):
    mmlu = mmlu_folder(tmp_path / "mmlu")
    results = evaluate.main(["mmlu", "--ckpt", str(tiny_ckpt), "--data", str(mmlu), "--shots", "5"])
    assert "dropped shots" not in capsys.readouterr().err
    info = results["mmlu"][str(mmlu)]["info"]
    assert (info["shots"], info["prompts_dropping_shots"], info["shots_dropped"]) == (5, 0, 0)


# -----------------------------------------------------------------------------
# empty paths

def test_an_empty_out_or_path_is_refused_by_every_script(tiny_ckpt, capsys, tmp_path, monkeypatch):
    no_load(monkeypatch)
    here = snapshot(Path.cwd())
    argvs = {"generate": ["--prompt", "Hi."], "evaluate": ["qa"], "train_sft": [], "train_dpo": [], "build_demo": []}
    for script, argv in argvs.items():
        fails(script, [*argv, "--out", ""], capsys, "argument --out", "empty", code=2, watch=[tmp_path])
        fails(script, [*argv, "--out", " "], capsys, "argument --out", code=2)
    for script, flag in (("generate", "--ckpt"), ("evaluate", "--ckpt"), ("train_sft", "--data"),
                         ("train_dpo", "--init-aligner"), ("generate", "--prompts-file"), ("evaluate", "--data"),
                         ("train_sft", "--tokenizer")):
        fails(script, [flag, ""], capsys, f"argument {flag}", "empty", code=2)
    assert snapshot(Path.cwd()) == here


# -----------------------------------------------------------------------------
# --n-tokens and --start-layer against --init-aligner

def test_flags_that_contradict_the_initial_aligner_are_refused(tiny_ckpt, model_args, capsys, tmp_path, monkeypatch):
    data = dpo_data(tmp_path)
    Aligner(model_args, n_tokens=1, start_layer=2).save(tmp_path / "one.pt")
    no_load(monkeypatch)
    for flags, culprit in ((["--n-tokens", "10"], "--n-tokens 10"), (["--start-layer", "1"], "--start-layer 1"),
                           (["--n-tokens", "1", "--start-layer", "3"], "--start-layer 3")):
        fails("train_dpo", dpo_args(tiny_ckpt, data, tmp_path / "run", "--init-aligner", tmp_path / "one.pt", *flags),
              capsys, culprit, tmp_path / "one.pt", "which holds", watch=[tmp_path])


@pytest.mark.parametrize("n_tokens, start_layer, flags", [(2, 1, []), (1, 2, ["--n-tokens", "1"]),
                                                         (None, None, ["--n-tokens", "3", "--start-layer", "1"])])
def test_settings_json_records_the_aligner_that_trains(n_tokens, start_layer, flags, tiny_ckpt, model_args, capsys,
                                                       tmp_path):
    """Flags left out take the initial Aligner's shape; without one, the flags (or 1 token from layer 2)."""
    init = []
    if n_tokens is not None:
        Aligner(model_args, n_tokens=n_tokens, start_layer=start_layer).save(tmp_path / "init.pt")
        init = ["--init-aligner", tmp_path / "init.pt"]
    succeeds("train_dpo", dpo_args(tiny_ckpt, dpo_data(tmp_path), tmp_path / "run", "--max-steps", "1",
                                   *init, *flags), capsys)
    settings = json.loads((tmp_path / "run" / "settings.json").read_text())
    trained = Aligner.load(tmp_path / "run" / "best.pt", model_args)
    expected = (n_tokens, start_layer) if n_tokens is not None else (3, 1)
    assert (settings["n_tokens"], settings["start_layer"]) == expected
    assert (trained.n_tokens, trained.start_layer) == expected


# -----------------------------------------------------------------------------
# a base whose first forward is not finite

@pytest.mark.parametrize("key, row", [("layers.1.attention.wq.weight", None), ("tok_embeddings.weight", 200),
                                      ("output.weight", 5), ("norm.weight", None)])
def test_a_base_whose_first_forward_is_not_finite_is_named(key, row, ckpt, capsys, tmp_path):
    shard = ckpt / "consolidated.00.pth"
    state = torch.load(shard, weights_only=True)
    bad = float("inf") if key == "output.weight" else float("nan")
    if row is None:
        state[key][0] = bad
    else:
        state[key][row] = bad  # a row no forward of BOS reads: the embedding table is checked whole
    torch.save(state, shard)
    data = write_jsonl(tmp_path / "qa.jsonl", [{"instruction": "Hi?", "output": "Hello."}])
    argvs = {"generate": ["--ckpt", ckpt, "--prompt", "Hi."],
             "evaluate": ["qa", "--ckpt", ckpt, "--data", data],
             "train_sft": sft_args(ckpt, sft_data(tmp_path), tmp_path / "sft"),
             "train_dpo": dpo_args(ckpt, dpo_data(tmp_path), tmp_path / "dpo")}
    what = "an infinite value in torch.float32" if key == "output.weight" else "NaN"
    for script, argv in argvs.items():
        fails(script, argv, capsys, shard, f"{key} holds {what}", watch=[tmp_path])
    assert not (tmp_path / "sft").exists() and not (tmp_path / "dpo").exists()


def test_a_first_forward_that_overflows_is_named(tiny_ckpt, capsys, tmp_path, monkeypatch):
    """Weights each finite whose forward is not, as in a dtype too narrow for the activations."""
    real = llama.Transformer.forward

    def overflowing(self, tokens, *a, **k):
        return real(self, tokens, *a, **k) * float("inf")
    monkeypatch.setattr(llama.Transformer, "forward", overflowing)
    argvs = {"generate": ["--ckpt", tiny_ckpt, "--prompt", "Hi."], "evaluate": ["qa", "--ckpt", tiny_ckpt],
             "train_sft": sft_args(tiny_ckpt, sft_data(tmp_path), tmp_path / "sft")}
    for script, argv in argvs.items():
        fails(script, argv, capsys, tiny_ckpt, "first forward gives NaN or infinite logits", watch=[tmp_path])


# -----------------------------------------------------------------------------
# the tokenizer: --tokenizer, and a symbolic link looked through

def test_the_tokenizer_is_found_through_a_link_or_named_with_a_flag(tiny_ckpt, capsys, tmp_path):
    alone = tmp_path / "alone" / "tiny"
    shutil.copytree(tiny_ckpt, alone)  # no tokenizer.model in it or beside it
    fails("generate", ["--ckpt", alone, "--prompt", "Hi."], capsys, "no tokenizer.model in", alone, "--tokenizer")
    fails("generate", ["--ckpt", alone, "--prompt", "Hi.", "--tokenizer", tmp_path / "none.model"], capsys,
          tmp_path / "none.model", "no tokenizer model here")
    tokenizer = tiny_ckpt.parent / "tokenizer.model"
    argv = ["--prompt", "Hi.", "--max-new-tokens", "3"]
    expected, _ = succeeds("generate", ["--ckpt", tiny_ckpt, *argv], capsys)
    assert succeeds("generate", ["--ckpt", alone, "--tokenizer", tokenizer, *argv], capsys)[0] == expected

    (tmp_path / "links").mkdir()
    link = tmp_path / "links" / "llama"
    link.symlink_to(tiny_ckpt, target_is_directory=True)  # tokenizer.model lies beside the target, not the link
    assert formats.find_tokenizer(link) == tokenizer
    assert succeeds("generate", ["--ckpt", link, *argv], capsys)[0] == expected
    (tmp_path / "links" / "tokenizer.model").write_bytes(b"not a tokenizer")  # beside the link comes first
    fails("generate", ["--ckpt", link, *argv], capsys, tmp_path / "links" / "tokenizer.model")


# -----------------------------------------------------------------------------
# evaluate.py --overwrite replaces an evaluation, and only that

def test_evaluate_overwrite_removes_its_earlier_files_and_nothing_else(tiny_ckpt, capsys, tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "mmlu.jsonl").write_text('{"from": "an earlier run"}\n')
    (out / "notes.txt").write_text("mine")
    data = write_jsonl(tmp_path / "qa.jsonl", [{"instruction": "Hi?", "output": "Hello."}])
    argv = ["qa", "--ckpt", tiny_ckpt, "--data", data, "--max-new-tokens", "2", "--out", out]
    fails("evaluate", argv, capsys, out / "mmlu.jsonl", "--overwrite", watch=[tmp_path])
    succeeds("evaluate", [*argv, "--overwrite"], capsys)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "qa.jsonl", "results.json"]
    assert (out / "notes.txt").read_text() == "mine"
    assert list(json.loads((out / "results.json").read_text())["results"]) == ["qa"]


# -----------------------------------------------------------------------------
# --help shows every default; evaluate.py TASK --help shows that task's

def help_text(script, argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        SCRIPTS[script].main([*argv, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def flag_entries(text: str) -> dict:
    """--flag -> its entry in --help's options section."""
    options = text.split("options:\n", 1)[1]
    entries = re.split(r"\n(?=  -)", options)
    return {re.match(r"\s*(-[-\w]+(?:, --[\w-]+)?)", e).group(1).split(", ")[-1]: " ".join(e.split()) for e in entries}


def test_every_help_shows_each_default(capsys):
    for script in SCRIPTS:
        entries = flag_entries(help_text(script, [], capsys))
        assert entries, script
        for flag, entry in entries.items():
            if flag != "--help":
                assert "(default" in entry, (script, entry)
    generate_help = flag_entries(help_text("generate", [], capsys))
    assert "(default: 256)" in generate_help["--max-new-tokens"]
    assert "(default: alpaca)" in generate_help["--template"]
    assert "(default: off)" in generate_help["--overwrite"]
    assert "(default: none)" in generate_help["--seed"]
    dpo_help = flag_entries(help_text("train_dpo", [], capsys))
    assert "aligner's, else 1)" in dpo_help["--n-tokens"]  # --init-aligner's, wrapped at its hyphen
    assert "(default: 0.0001)" in dpo_help["--lr"]


def test_evaluate_task_help_shows_that_tasks_flags_and_defaults(capsys):
    whole = help_text("evaluate", [], capsys)
    helps = {task: help_text("evaluate", [task], capsys) for task in evaluate.TASKS}
    for task, text in helps.items():
        assert text != whole and text.startswith("usage: ")
        assert f"evaluate.py {task}: " in text
    mmlu, gsm8k, qa = (flag_entries(helps[t]) for t in ("mmlu", "gsm8k", "qa"))
    assert "(default: 5)" in mmlu["--shots"] and "(default: 8)" in gsm8k["--shots"]
    assert "--shots" not in qa and "--paper" not in qa and "--seed" not in qa
    assert "--template" not in mmlu and "--scoring" not in gsm8k and "--scoring" not in qa
    assert "(default: letter)" in mmlu["--scoring"] and "--scoring generate" in mmlu["--max-new-tokens"]
    assert "(default: alpaca)" in qa["--template"] and "(default: none)" in gsm8k["--template"]
    assert "(default: 1234)" in gsm8k["--seed"] and "(default: 256)" in qa["--max-new-tokens"]
    assert "demo/data/mmlu" in mmlu["--data"]
    assert help_text("evaluate", ["--ckpt", "x", "mmlu"], capsys) == helps["mmlu"]


# -----------------------------------------------------------------------------
# what a run says it trains on

def test_training_says_it_runs_the_demo_only_on_the_demos_data(tiny_ckpt, capsys, tmp_path, monkeypatch):
    def stop(*a, **k):
        raise RuntimeError("stop here")
    monkeypatch.setattr(trainer, "load_base", stop)
    own = {"train_sft": sft_data(tmp_path), "train_dpo": dpo_data(tmp_path)}
    for script in ("train_sft", "train_dpo"):
        _, out, _ = run_script(SCRIPTS[script], ["--out", tmp_path / f"{script}-demo"], capsys)
        assert "Training on the built-in demo (" in out, out
        _, out, _ = run_script(SCRIPTS[script], ["--data", own[script], "--out", tmp_path / script], capsys)
        assert "built-in demo (" not in out and f"Training on {own[script]}, with the built-in demo's model" in out, out


# -----------------------------------------------------------------------------
# progress: a bar on a terminal, a few plain lines in a log

class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_writes_a_line_every_five_percent_to_a_log():
    log = io.StringIO()
    with cli.progress(1000, "train", file=log) as bar:
        for step in range(1000):
            bar.set_postfix(loss=f"{1 / (step + 1):.3f}")
            bar.update(1)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 20
    assert lines[0] == "train: 50/1000 (5%) loss=0.020" and lines[-1] == "train: 1000/1000 (100%) loss=0.001"
    log = io.StringIO()
    with cli.progress(3, "qa [base]", file=log) as bar:
        bar.update(2)
        bar.update(1)
    assert log.getvalue() == "qa [base]: 2/3 (67%)\nqa [base]: 3/3 (100%)\n"
    with cli.progress(10, "hidden", file=log, disable=True) as bar:
        bar.update(10)
    assert "hidden" not in log.getvalue()
    terminal = Terminal()
    with cli.progress(10, "train", file=terminal) as bar:
        bar.update(10)
    assert "\r" in terminal.getvalue()  # tqdm's bar


def test_a_training_log_holds_no_carriage_returns(tiny_ckpt, capsys, tmp_path):
    _, err = succeeds("train_sft", sft_args(tiny_ckpt, sft_data(tmp_path, n=12), tmp_path / "run", "--epochs", "4"),
                      capsys)
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("train: ")]
    assert len(lines) == 20 and lines[-1].startswith("train: 20/20 (100%) loss="), err
