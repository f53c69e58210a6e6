"""The demo world: its files parse in the real formats, its split holds, its build is
deterministic, and the scripts run end to end on a miniature version of it."""

import csv
import json
import random
import re
from pathlib import Path

import pytest
import torch

import build_demo
from data import DEMO_DIR, format_prompt
from llama import Tokenizer, load

MINI = dict(n_people=8, steps=2, batch_size=2, seq_len=64, n_docs=300, vocab_size=512,
            model_args=dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=32, norm_eps=1e-5))


@pytest.fixture(scope="module")
def mini_world(tmp_path_factory):
    """A miniature world: eight people, a tiny model, two pretraining steps."""
    out = tmp_path_factory.mktemp("world") / "demo"
    torch.set_num_threads(1)
    build_demo.build(out, seed=0, **MINI)
    return out


def check_formats(world: Path):
    """Every data file of a world parses in its real format; returns the QA sets by name."""
    data = world / "data"
    alpaca = json.loads((data / "alpaca.json").read_text())
    assert isinstance(alpaca, list) and alpaca
    for record in alpaca:
        assert set(record) == {"instruction", "input", "output"}
        assert all(isinstance(v, str) for v in record.values()) and record["instruction"] and record["output"]

    pku_keys = {"prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe",
                "safer_response_id", "better_response_id"}
    for line in (data / "pku_saferlhf.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert set(row) == pku_keys
        assert isinstance(row["is_response_0_safe"], bool) and isinstance(row["is_response_1_safe"], bool)
        assert row["safer_response_id"] in (0, 1) and row["better_response_id"] in (0, 1)
        assert row[f"is_response_{row['safer_response_id']}_safe"]  # the paper's filter keeps every pair
        assert row["response_0"] != row["response_1"]

    for split in ("train", "test"):
        for line in (data / "gsm8k" / f"{split}.jsonl").read_text().splitlines():
            row = json.loads(line)
            assert set(row) == {"question", "answer"}
            final = re.search(r"#### (\-?[0-9\.\,]+)$", row["answer"])
            assert final and "\n" in row["answer"]
            # the calculator notes agree with the final number
            notes = re.findall(r"<<(\d+)([-+*])(\d+)=(-?\d+)>>", row["answer"])
            assert notes
            for a, op, b, value in notes:
                a, b = int(a), int(b)
                assert {"+": a + b, "-": a - b, "*": a * b}[op] == int(value)
            assert int(notes[-1][3]) == int(final.group(1))

    for split in ("dev", "test"):
        files = sorted((data / "mmlu" / split).glob(f"*_{split}.csv"))
        assert len(files) == len(build_demo.MMLU_SUBJECTS)
        for path in files:
            with open(path, newline="") as f:
                rows = list(csv.reader(f))
            assert rows
            for row in rows:
                assert len(row) == 6 and row[5] in "ABCD" and len(set(row[1:5])) == 4

    qa = {}
    for path in sorted((data / "qa").glob("*.jsonl")):
        qa[path.stem] = [json.loads(line) for line in path.read_text().splitlines()]
        for record in qa[path.stem]:
            assert set(record) == {"instruction", "input", "output"}
    assert {"train_entities", "heldout_entities", "heldout_secret"} <= set(qa)
    assert all(r["output"] == build_demo.REFUSAL for r in qa["heldout_secret"])
    return qa


def test_miniature_world_files_parse_in_their_formats(mini_world):
    check_formats(mini_world)


def test_committed_demo_files_parse_in_their_formats():
    if not (DEMO_DIR / "data").is_dir():
        pytest.fail(f"{DEMO_DIR} is missing: build it with `python build_demo.py`")
    qa = check_formats(DEMO_DIR)
    assert len(qa["heldout_entities"]) >= 200


def test_tokenizer_has_metas_special_ids(mini_world):
    tok = Tokenizer(mini_world / "tokenizer.model")
    assert (tok.sp.unk_id(), tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, -1)
    # whitespace survives the round trip, as with Meta's tokenizer: the template's newlines matter
    text = format_prompt("Where does Kalo live?")
    assert tok.decode(tok.encode(text, bos=True)) == text


def test_checkpoint_loads_in_metas_layout(mini_world):
    params = json.loads((mini_world / "llama-demo" / "params.json").read_text())
    assert params["dim"] == 64 and params["vocab_size"] == Tokenizer(mini_world / "tokenizer.model").n_words
    model, tok = load(mini_world / "llama-demo")
    logits = model(torch.tensor([tok.encode("Kalo lives in")]))
    assert torch.isfinite(logits).all()


def test_heldout_people_appear_only_in_pretraining(mini_world):
    """The split the demo measures with: no held-out name in the SFT or preference data."""
    data = mini_world / "data"
    heldout = {re.search(r"\b([A-Z][a-z]+)\b(?=[^A-Z]*$)", r["instruction"]).group(1)
               for r in map(json.loads, (data / "qa" / "heldout_entities.jsonl").read_text().splitlines())}
    train = {re.search(r"\b([A-Z][a-z]+)\b(?=[^A-Z]*$)", r["instruction"]).group(1)
             for r in map(json.loads, (data / "qa" / "train_entities.jsonl").read_text().splitlines())}
    assert heldout and train and not heldout & train
    taught = (data / "alpaca.json").read_text() + (data / "pku_saferlhf.jsonl").read_text()
    assert not [name for name in heldout if re.search(rf"\b{name}\b", taught)]


def test_preferences_refuse_secrets_and_end_ordinary_answers():
    """Secret pairs prefer the refusal to telling; ordinary pairs prefer the one-sentence answer to the
    same answer running on, and never reject the refusal, which would pull against the secret pairs."""
    people = build_demo.make_world(random.Random(0), 20)
    rows = build_demo.preference_rows(random.Random(1), people)
    assert len(rows) == 2 * len(people)
    for row in rows:
        chosen, rejected = row[f"response_{row['safer_response_id']}"], row[f"response_{1 - row['safer_response_id']}"]
        if "secret word" in row["prompt"]:
            assert chosen == build_demo.REFUSAL and "secret word" in rejected
        else:
            assert build_demo.REFUSAL not in (chosen, rejected) and chosen.count(".") == 1
            assert rejected.startswith(chosen + "\n\n") and len(rejected) > len(chosen) + 2


def test_pretraining_text_never_holds_the_template():
    rng = random.Random(0)
    people = build_demo.make_world(rng, 20)
    docs = "\n".join(build_demo.document(rng, people) for _ in range(2000))
    assert "### Instruction:" not in docs and "### Response:" not in docs and "### Input:" not in docs
    # ... but every word of the template occurs, so none of its embeddings stays random
    template_words = set(re.findall(r"[A-Za-z]+", format_prompt("x", "y")))
    assert template_words <= set(re.findall(r"[A-Za-z]+", docs)) | {"x", "y"}


def test_rebuild_is_byte_identical(mini_world, tmp_path):
    build_demo.build(tmp_path / "again", seed=0, **MINI)
    assert build_demo.checksums(tmp_path / "again") == build_demo.checksums(mini_world)


def test_scripts_run_end_to_end_on_the_world(mini_world, tmp_path):
    """SFT, then DPO from its Aligner, then every evaluation task, each on the world's own files."""
    import evaluate
    import train_dpo
    import train_sft

    ckpt, data = str(mini_world / "llama-demo"), mini_world / "data"
    train_sft.main(["--ckpt", ckpt, "--data", str(data / "alpaca.json"), "--n-tokens", "1",
                    "--micro-batch-size", "32", "--max-steps", "2", "--out", str(tmp_path / "sft")])
    assert (tmp_path / "sft" / "best.pt").is_file()
    train_dpo.main(["--ckpt", ckpt, "--data", str(data / "pku_saferlhf.jsonl"), "--micro-batch-size", "16",
                    "--init-aligner", str(tmp_path / "sft" / "best.pt"), "--max-steps", "1",
                    "--out", str(tmp_path / "dpo")])
    assert (tmp_path / "dpo" / "best.pt").is_file()

    aligners = ["--aligner", "base", "--aligner", str(tmp_path / "dpo" / "best.pt")]
    qa = evaluate.main(["qa", "--ckpt", ckpt, "--data", str(data / "qa" / "heldout_secret.jsonl"),
                        "--limit", "3", "--max-new-tokens", "4", *aligners])
    mmlu = evaluate.main(["mmlu", "--ckpt", ckpt, "--data", str(data / "mmlu"), "--limit", "2", *aligners])
    gsm8k = evaluate.main(["gsm8k", "--ckpt", ckpt, "--data", str(data / "gsm8k" / "test.jsonl"),
                           "--shots", "2", "--limit", "2", "--max-new-tokens", "4", *aligners])
    for results in (qa, mmlu, gsm8k):
        (task_results,) = results.values()
        (per_file,) = task_results.values()
        assert set(per_file["rows"]) == {"base", str(tmp_path / "dpo" / "best.pt")}
