"""An Aligner file in the paper's authors' layout works wherever a script takes an Aligner file
(generate.py --aligner, evaluate.py --aligner, train_dpo.py --init-aligner and --reference),
and gives exactly what the same Aligner in this project's layout gives."""

import json

import pytest
import torch

import evaluate
import generate as generate_script
import train_dpo
from aligner import Aligner
from conftest import authors_aligner_state, read_jsonl
from llama import ModelArgs
from support.formats import read_aligner, read_params


@pytest.fixture(scope="module")
def two_layouts(tiny_ckpt, tmp_path_factory):
    """(the authors' file, this project's file) holding the same Aligner, built apart."""
    folder = tmp_path_factory.mktemp("authors")
    args = ModelArgs(**read_params(tiny_ckpt))
    state = authors_aligner_state(args, n_tokens=2, seed=3)
    torch.save(state, folder / "authors.pth")
    ours = Aligner(args, n_tokens=2, start_layer=2)
    with torch.no_grad():
        ours.prefix.copy_(state["global_value_embedding.weight"].float())
        for i in range(2, args.n_layers):
            ours.gates[i - 2] = state[f"transformer.h.{i}.attn.gating_factor"].float().flatten()
    ours.save(folder / "ours.pt")
    return folder / "authors.pth", folder / "ours.pt"


def test_generate_answers_with_an_authors_file(tiny_ckpt, two_layouts, tmp_path):
    authors, ours = two_layouts
    generate_script.main(["--ckpt", str(tiny_ckpt), "--aligner", str(authors), "--aligner", str(ours),
                          "--aligner", "base", "--prompt", "Name a bird.", "--prompt", "What is a robin?",
                          "--max-new-tokens", "8", "--out", str(tmp_path / "answers.jsonl")])
    records = read_jsonl(tmp_path / "answers.jsonl")
    by_aligner = {name: [r["output"] for r in records if r["aligner"] == name] for name in ("authors", "ours", "base")}
    assert by_aligner["authors"] == by_aligner["ours"]
    assert by_aligner["authors"] != by_aligner["base"]  # the Aligner does change the answers
    assert records[0]["prompt"] == ("Below is an instruction that describes a task. Write a response that "
                                    "appropriately completes the request.\n\n### Instruction:\nName a bird.\n\n"
                                    "### Response:")


def test_evaluate_scores_an_authors_file(tiny_ckpt, two_layouts, tmp_path):
    authors, ours = two_layouts
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"instruction": q, "output": "A bird."}) + "\n"
                          for q in ("What is a robin?", "Name a bird.", "What is a salmon?")))
    evaluate.main(["qa", "--ckpt", str(tiny_ckpt), "--data", str(qa), "--aligner", str(authors),
                   "--aligner", str(ours), "--max-new-tokens", "6", "--max-seq-len", "256", "--out", str(tmp_path / "eval")])
    records = read_jsonl(tmp_path / "eval" / "qa.jsonl")
    outputs = {name: [r["output"] for r in records if r["aligner"] == name] for name in (str(authors), str(ours))}
    assert outputs[str(authors)] == outputs[str(ours)] and len(outputs[str(ours)]) == 3


def test_dpo_starts_from_and_refers_to_an_authors_file(tiny_ckpt, two_layouts, tmp_path):
    authors, ours = two_layouts
    rows = [{"prompt": f"What is fox {i}?", "response_0": "A robin is a bird.", "response_1": f"Fox {i} is red.",
             "is_response_0_safe": True, "is_response_1_safe": True, "safer_response_id": 0,
             "better_response_id": 0} for i in range(6)]
    (tmp_path / "pku.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--ckpt", str(tiny_ckpt), "--data", str(tmp_path / "pku.jsonl"), "--val", "2", "--batch-size", "2",
              "--epochs", "1", "--lr", "1e-2", "--template", "beaver"]
    for name, path in (("authors", authors), ("ours", ours)):
        train_dpo.main([*common, "--init-aligner", str(path), "--reference", str(path), "--out", str(tmp_path / name)])
    trained = [torch.load(tmp_path / name / "epoch-1.pt", weights_only=True) for name in ("authors", "ours")]
    for key in ("prefix", "gates"):
        assert torch.equal(trained[0][key], trained[1][key])
    start = read_aligner(ours, ModelArgs(**read_params(tiny_ckpt)))
    assert not torch.equal(trained[0]["gates"], start.gates)  # it trained, from the authors' Aligner
    assert (trained[0]["n_tokens"], trained[0]["start_layer"]) == (2, 2)
