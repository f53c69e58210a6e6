"""LLaMA-Adapter V1, the paper's baseline, through every script: trained by train_sft.py and train_dpo.py
with --llama-adapter, read from this project's files and lit-llama's, and answered or scored beside
Aligners by generate.py and evaluate.py."""

import json

import pytest
import torch

import evaluate
import generate as generate_script
import train_dpo
import train_sft
from aligner import Aligner
from conftest import lit_llama_adapter_state, read_jsonl, write_fox_task
from llama import ModelArgs
from support.formats import read_aligner, read_params


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapter")
    write_fox_task(folder / "task.json", 8)
    return folder / "task.json"


def test_train_sft_trains_a_layer_specific_prefix(tiny_ckpt, task, tmp_path, capsys):
    train_sft.main(["--ckpt", str(tiny_ckpt), "--data", str(task), "--out", str(tmp_path / "run"), "--llama-adapter",
                    "--n-tokens", "3", "--val", "2", "--batch-size", "4", "--epochs", "1", "--max-seq-len", "128"])
    args = ModelArgs(**read_params(tiny_ckpt))  # 4 layers of 4 heads, dim 64
    assert "LLaMA-Adapter: 3 tokens in each of the 2 layers from layer 2, 392 parameters" in capsys.readouterr().out
    adapter = read_aligner(tmp_path / "run" / "epoch-1.pt", args)
    assert adapter.layer_specific and adapter.prefix.shape == (2, 3, 64)
    assert not torch.equal(adapter.prefix[0], adapter.prefix[1])  # two prefixes of their own, not one tied
    assert torch.count_nonzero(adapter.gates) > 0  # it trained
    assert json.loads((tmp_path / "run" / "settings.json").read_text())["llama_adapter"] is True


def test_generate_and_evaluate_take_adapters_beside_aligners(tiny_ckpt, tmp_path):
    """A lit-llama Adapter file, the same Adapter in this project's layout, an Aligner and the base, side by side:
    the two layouts answer alike, each row as it answers alone."""
    args = ModelArgs(**read_params(tiny_ckpt))
    torch.save(lit_llama_adapter_state(args, n_tokens=2, seed=1), tmp_path / "lit-adapter.pth")
    ours = read_aligner(tmp_path / "lit-adapter.pth", args)
    ours.save(tmp_path / "ours-adapter.pt")
    aligner = Aligner(args, n_tokens=2)
    with torch.no_grad():
        aligner.gates.normal_()
    aligner.save(tmp_path / "aligner.pt")
    files = [tmp_path / "lit-adapter.pth", tmp_path / "ours-adapter.pt", tmp_path / "aligner.pt"]
    flags = [x for f in files for x in ("--aligner", str(f))] + ["--aligner", "base"]
    prompts = ["--prompt", "Name a bird.", "--prompt", "What is a robin?"]
    generate_script.main(["--ckpt", str(tiny_ckpt), *flags, *prompts, "--max-new-tokens", "6",
                          "--out", str(tmp_path / "together.jsonl")])
    together = read_jsonl(tmp_path / "together.jsonl")
    for name, path in (("lit-adapter", files[0]), ("aligner", files[2])):
        generate_script.main(["--ckpt", str(tiny_ckpt), "--aligner", str(path), *prompts, "--max-new-tokens", "6",
                              "--out", str(tmp_path / f"{name}.jsonl")])
        alone = [r["output"] for r in read_jsonl(tmp_path / f"{name}.jsonl")]
        assert [r["output"] for r in together if r["aligner"] == name] == alone
    by = {name: [r["output"] for r in together if r["aligner"] == name]
          for name in ("lit-adapter", "ours-adapter", "aligner", "base")}
    assert by["lit-adapter"] == by["ours-adapter"] and by["lit-adapter"] != by["base"]

    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"instruction": q, "output": "A bird."}) + "\n"
                          for q in ("What is a robin?", "Name a bird.")))
    evaluate.main(["qa", "--ckpt", str(tiny_ckpt), "--data", str(qa), *flags, "--max-new-tokens", "6",
                   "--max-seq-len", "256", "--out", str(tmp_path / "eval")])
    scored = read_jsonl(tmp_path / "eval" / "qa.jsonl")
    outputs = {str(f): [r["output"] for r in scored if r["aligner"] == str(f)] for f in files[:2]}
    assert outputs[str(files[0])] == outputs[str(files[1])] and len(outputs[str(files[0])]) == 2


def test_train_dpo_trains_an_adapter_and_refuses_an_aligner_named_an_adapter(tiny_ckpt, tmp_path):
    rows = [{"prompt": f"What is fox {i}?", "chosen": "A robin is a bird.", "rejected": f"Fox {i} is red."}
            for i in range(6)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--ckpt", str(tiny_ckpt), "--data", str(tmp_path / "pairs.jsonl"), "--val", "2", "--batch-size", "2",
              "--epochs", "1", "--lr", "1e-2"]
    args = ModelArgs(**read_params(tiny_ckpt))
    start = Aligner(args, n_tokens=2, layer_specific=True)
    with torch.no_grad():
        start.gates.normal_()
    start.save(tmp_path / "start.pt")
    train_dpo.main([*common, "--init-aligner", str(tmp_path / "start.pt"), "--out", str(tmp_path / "dpo")])
    trained = read_aligner(tmp_path / "dpo" / "epoch-1.pt", args)
    assert trained.layer_specific and not torch.equal(trained.prefix, start.prefix)
    assert json.loads((tmp_path / "dpo" / "settings.json").read_text())["llama_adapter"] is True  # what trained
    Aligner(args, n_tokens=1).save(tmp_path / "aligner.pt")
    with pytest.raises(ValueError, match=r"--llama-adapter contradicts the initial Aligner .*aligner\.pt"):
        train_dpo.main([*common, "--init-aligner", str(tmp_path / "aligner.pt"), "--llama-adapter",
                        "--out", str(tmp_path / "refused")])
