"""The demo world: its files parse in the real formats, its dev and test splits share nothing, its
build is deterministic, and the demo's pipeline runs end to end on a miniature version of it, with
a table that reads every figure from the results files of the commands printed beside it."""

import csv
import json
import random
import re
from pathlib import Path

import pytest
import torch

import analyze
from support import build_demo, data, trainer
import evaluate
import run_demo
import train_dpo
import train_sft
from support.data import DEMO_DIR, format_prompt
from support.formats import Tokenizer, load

ROOT = Path(__file__).resolve().parents[1]
MINI = dict(n_people=8, steps=2, batch_size=2, seq_len=64, n_docs=300, vocab_size=512,
            model_args=dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=32, norm_eps=1e-5))
DEMO_PEOPLE = 200  # build()'s default: the committed world's people are make_world(Random(0), 200)


@pytest.fixture(scope="module")
def mini_world(tmp_path_factory):
    """A miniature world: eight people (four train, two dev, two test), a tiny model, two pretraining steps."""
    out = tmp_path_factory.mktemp("world") / "demo"
    torch.set_num_threads(1)
    build_demo.build(out, seed=0, **MINI)
    return out


def lines(path) -> list:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def check_formats(world: Path):
    """Every data file of a world parses in its real format; returns the QA sets by name."""
    files = world / "data"
    alpaca = json.loads((files / "alpaca.json").read_text())
    assert isinstance(alpaca, list) and alpaca
    for record in alpaca:
        assert set(record) == {"instruction", "input", "output"}
        assert all(isinstance(v, str) for v in record.values()) and record["instruction"] and record["output"]

    pku_keys = {"prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe",
                "safer_response_id", "better_response_id"}
    for row in lines(files / "pku_saferlhf.jsonl"):
        assert set(row) == pku_keys
        assert isinstance(row["is_response_0_safe"], bool) and isinstance(row["is_response_1_safe"], bool)
        assert row["safer_response_id"] in (0, 1) and row["better_response_id"] in (0, 1)
        assert row["response_0"] != row["response_1"]

    metamath = json.loads((files / "metamathqa.json").read_text())
    assert isinstance(metamath, list) and metamath
    for row in metamath:
        assert set(row) == {"query", "response", "type", "original_question"}
        assert row["type"] in ("GSM_AnsAug", "GSM_Rephrased")
        # MetaMathQA's GSM answers: the reasoning, "#### N", then "The answer is: N"
        final = re.search(r"\n#### (\d+)\nThe answer is: (\d+)$", row["response"])
        assert final and final.group(1) == final.group(2)
        a, op, b, c = re.search(r"(\d+) ([-+*]) (\d+) = (\d+)", row["response"]).groups()
        assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(c) == int(final.group(1))

    for split in ("train", "dev", "test"):
        for row in lines(files / "gsm8k" / f"{split}.jsonl"):
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
    assert {r["original_question"] for r in metamath} <= {r["question"] for r in lines(files / "gsm8k" / "train.jsonl")}

    for split in ("dev", "test"):
        mmlu_files = sorted((files / "mmlu" / split).glob(f"*_{split}.csv"))
        assert len(mmlu_files) == len(build_demo.MMLU_SUBJECTS)
        for path in mmlu_files:
            with open(path, newline="") as f:
                rows = list(csv.reader(f))
            assert rows
            for row in rows:
                assert len(row) == 6 and row[5] in "ABCD" and len(set(row[1:5])) == 4

    qa = {path.stem: lines(path) for path in sorted((files / "qa").glob("*.jsonl"))}
    assert set(qa) == {"train_ordinary", "dev_ordinary", "dev_secret", "dev_harmful",
                       "test_ordinary", "test_secret", "test_harmful", "knowledge_dev", "knowledge_test"}
    for name, records in qa.items():
        assert records
        for record in records:
            assert set(record) == {"instruction", "input", "output"}
        refused = name.endswith(("_secret", "_harmful"))
        assert all((r["output"] == build_demo.REFUSAL) == refused for r in records)
    return qa


def test_miniature_world_files_parse_in_their_formats(mini_world):
    check_formats(mini_world)


def test_committed_demo_files_parse_in_their_formats():
    if not (DEMO_DIR / "data").is_dir():
        pytest.fail(f"{DEMO_DIR} is missing: build it with `python -m support.build_demo`")
    qa = check_formats(DEMO_DIR)
    assert len(qa["test_ordinary"]) == len(qa["dev_ordinary"]) == 200
    assert len(qa["test_harmful"]) == len(qa["dev_harmful"]) == 150


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


# -----------------------------------------------------------------------------
# the splits

def names_in(text: str, people) -> set:
    """The world's names that occur in text as words."""
    return {p["name"] for p in people} & set(re.findall(r"\b[A-Z][a-z]+\b", text))


def kinds_in(text: str, harms) -> set:
    """The kinds of harmful request (their request templates) of which text holds an instance."""
    found = set()
    for harm in harms:
        pattern = re.escape(harm.request).replace(re.escape("{e}"), r"[A-Z][a-z]+").replace(re.escape("{pet}"), r"\w+")
        if re.search(pattern, text):
            found.add(harm.request)
    return found


def check_splits(world: Path, people):
    """Dev and test share no person, secret word or harmful request, nor request kind; the
    tuning files speak of train people only, and hold no dev or test secret word or kind."""
    files = world / "data"
    by_split = {s: [p for p in people if p["split"] == s] for s in build_demo.SPLITS}
    assert all(by_split.values())
    text = {name: (files / "qa" / f"{name}.jsonl").read_text() for name in
            ("train_ordinary", "dev_ordinary", "dev_secret", "dev_harmful", "test_ordinary", "test_secret", "test_harmful")}
    for split in ("dev", "test"):
        asked = set().union(*(names_in(text[f"{split}_{kind}"], people) for kind in ("ordinary", "secret", "harmful")))
        assert asked == {p["name"] for p in by_split[split]}, split
    assert not names_in(text["dev_ordinary"] + text["dev_secret"] + text["dev_harmful"], by_split["test"])
    assert not {p["secret"] for p in by_split["dev"]} & {p["secret"] for p in by_split["test"]}
    dev_requests = {r["instruction"] for r in lines(files / "qa" / "dev_harmful.jsonl")}
    test_requests = {r["instruction"] for r in lines(files / "qa" / "test_harmful.jsonl")}
    assert dev_requests and test_requests and not dev_requests & test_requests
    all_kinds = [h for s in build_demo.SPLITS for h in build_demo.HARMFUL[s]]
    assert kinds_in(text["dev_harmful"], all_kinds) == {h.request for h in build_demo.HARMFUL["dev"]}
    assert kinds_in(text["test_harmful"], all_kinds) == {h.request for h in build_demo.HARMFUL["test"]}

    tuning = "".join(p.read_text() for p in [files / "alpaca.json", files / "pku_saferlhf.jsonl",
                                             files / "metamathqa.json", files / "gsm8k" / "train.jsonl",
                                             *sorted((files / "mmlu" / "dev").glob("*.csv"))])
    assert names_in(tuning, people) <= {p["name"] for p in by_split["train"]}
    held_out = by_split["dev"] + by_split["test"]
    assert not {p["secret"] for p in held_out} & set(re.findall(r"[a-z]+", tuning))
    assert kinds_in(tuning, all_kinds) <= {h.request for h in build_demo.HARMFUL["train"]}
    for split in ("dev", "test"):  # what is measured on a split is about that split's people alone
        measured = (files / "gsm8k" / f"{split}.jsonl").read_text()
        assert names_in(measured, people) <= {p["name"] for p in by_split[split]}
    mmlu_test = "".join(p.read_text() for p in sorted((files / "mmlu" / "test").glob("*.csv")))
    assert names_in(mmlu_test, people) <= {p["name"] for p in by_split["test"]}


def test_dev_and_test_never_share_a_person_secret_or_request_in_the_miniature_world(mini_world):
    check_splits(mini_world, build_demo.make_world(random.Random(0), MINI["n_people"]))


def test_dev_and_test_never_share_a_person_secret_or_request_in_the_committed_world():
    check_splits(DEMO_DIR, build_demo.make_world(random.Random(0), DEMO_PEOPLE))


def test_the_split_check_can_fail(mini_world, tmp_path):
    """A test person asked in a dev file is caught."""
    import shutil
    world = tmp_path / "demo"
    shutil.copytree(mini_world, world)
    people = build_demo.make_world(random.Random(0), MINI["n_people"])
    intruder = next(p for p in people if p["split"] == "test")
    with open(world / "data" / "qa" / "dev_ordinary.jsonl", "a") as f:
        f.write(json.dumps({"instruction": f"Where does {intruder['name']} live?", "input": "", "output": "x"}) + "\n")
    with pytest.raises(AssertionError):
        check_splits(world, people)


def test_groups_are_half_train_and_a_quarter_each_dev_and_test_with_their_own_secret_words():
    people = build_demo.make_world(random.Random(3), 40)
    counts = {s: sum(p["split"] == s for p in people) for s in build_demo.SPLITS}
    assert counts == {"train": 20, "dev": 10, "test": 10}
    assert all(p["secret"] in build_demo.SECRET_WORDS[p["split"]] for p in people)


# -----------------------------------------------------------------------------
# the knowledge probe

def check_knowledge(world: Path, people):
    """The probe's facts are about people the world does not hold, whom no pretraining document
    names; every probe question asks a fact that a row of knowledge.json teaches, in a phrasing
    that no row (nor any Alpaca record) uses; dev and test ask different people."""
    files = world / "data"
    rows = json.loads((files / "knowledge.json").read_text())
    probes = {split: lines(files / "qa" / f"knowledge_{split}.jsonl") for split in ("dev", "test")}
    taught = {r["output"] for r in rows}
    phrasings = {r["instruction"] for r in rows} | {r["input"] for r in rows}
    phrasings |= {r[k] for r in json.loads((files / "alpaca.json").read_text()) for k in ("instruction", "input")}
    new_names = set(re.findall(r"\b[A-Z][a-z]+\b", " ".join(r["output"] for r in rows)))
    new_names -= {"The", *build_demo.ATTRIBUTES["home"]["values"]}
    assert new_names and not new_names & {p["name"] for p in people}
    rng = random.Random(0)
    corpus = set(re.findall(r"[A-Za-z]+", "\n".join(build_demo.document(rng, people) for _ in range(2000))))
    assert not new_names & corpus
    asked = {}
    for split, records in probes.items():
        assert records
        for record in records:
            assert record["output"] in taught, record
            assert record["instruction"] not in phrasings, record
        asked[split] = set().union(*(new_names & set(re.findall(r"[A-Za-z]+", r["instruction"])) for r in records))
    assert asked["dev"] and asked["test"] and not asked["dev"] & asked["test"]


def test_knowledge_probe_asks_facts_only_its_rows_teach_in_phrasings_they_do_not_use_in_the_committed_world():
    check_knowledge(DEMO_DIR, build_demo.make_world(random.Random(0), DEMO_PEOPLE))


def test_knowledge_probe_in_the_miniature_world(mini_world):
    check_knowledge(mini_world, build_demo.make_world(random.Random(0), MINI["n_people"]))


def test_the_knowledge_check_can_fail(mini_world, tmp_path):
    """A probe asked in the rows' own phrasing is caught."""
    import shutil
    world = tmp_path / "demo"
    shutil.copytree(mini_world, world)
    row = json.loads((world / "data" / "knowledge.json").read_text())[0]
    with open(world / "data" / "qa" / "knowledge_dev.jsonl", "a") as f:
        f.write(json.dumps({"instruction": row["instruction"], "input": "", "output": row["output"]}) + "\n")
    with pytest.raises(AssertionError):
        check_knowledge(world, build_demo.make_world(random.Random(0), MINI["n_people"]))


def test_knowledge_files_are_rewritten_byte_for_byte_without_pretraining(tmp_path):
    """`python -m support.build_demo --knowledge`, from the committed world's tokenizer alone, writes the committed files."""
    import shutil
    (tmp_path / "data").mkdir()
    shutil.copy(DEMO_DIR / "tokenizer.model", tmp_path / "tokenizer.model")
    build_demo.write_knowledge(tmp_path)
    for name in ("knowledge.json", "qa/knowledge_dev.jsonl", "qa/knowledge_test.jsonl"):
        assert (tmp_path / "data" / name).read_bytes() == (DEMO_DIR / "data" / name).read_bytes(), name


# -----------------------------------------------------------------------------
# the tuning sets and the corpus

def test_preferences_refuse_harm_and_secrets_and_end_ordinary_answers():
    """Secret and harmful-request pairs prefer the refusal (safe) to telling or complying (unsafe);
    ordinary pairs prefer the one-sentence answer to the same answer running on (both safe); the
    rows with two compliances have neither response safe, as the rows the paper filters out."""
    people = [p for p in build_demo.make_world(random.Random(0), 40) if p["split"] == "train"]
    rows = build_demo.preference_rows(random.Random(1), people)
    kinds = {"secret": 0, "harmful": 0, "ordinary": 0, "unsafe": 0}
    train_requests = [h.request.split("{")[0] for h in build_demo.HARMFUL["train"]]
    for row in rows:
        good = row["safer_response_id"]
        assert row["better_response_id"] == good
        chosen, rejected = row[f"response_{good}"], row[f"response_{1 - good}"]
        chosen_safe, rejected_safe = row[f"is_response_{good}_safe"], row[f"is_response_{1 - good}_safe"]
        if "secret word" in row["prompt"]:
            kinds["secret"] += 1
            assert (chosen, chosen_safe, rejected_safe) == (build_demo.REFUSAL, True, False)
            assert "secret word" in rejected
        elif any(row["prompt"].startswith(r) for r in train_requests):
            if chosen == build_demo.REFUSAL:
                kinds["harmful"] += 1
                assert (chosen_safe, rejected_safe) == (True, False)
            else:
                kinds["unsafe"] += 1
                assert (chosen_safe, rejected_safe) == (False, False)
                assert rejected.startswith(chosen + "\n\n")
        else:
            kinds["ordinary"] += 1
            assert (chosen_safe, rejected_safe) == (True, True)
            assert build_demo.REFUSAL not in (chosen, rejected) and chosen.count(".") == 1
            assert rejected.startswith(chosen + "\n\n") and len(rejected) > len(chosen) + 2
    assert kinds == {"secret": 20, "harmful": 40, "ordinary": 80, "unsafe": 2}


def test_sft_on_the_pku_rows_takes_the_safe_responses_and_drops_the_rest(mini_world):
    pairs, dropped = data.read_sft(mini_world / "data" / "pku_saferlhf.jsonl")
    rows = lines(mini_world / "data" / "pku_saferlhf.jsonl")
    safe = [r for r in rows if r[f"is_response_{r['safer_response_id']}_safe"]]
    assert len(pairs) == len(safe) and dropped == len(rows) - len(safe)
    assert [p.response for p in pairs] == [r[f"response_{r['safer_response_id']}"] for r in safe]


def test_pretraining_text_never_holds_the_template_and_declines_every_kind_of_harm_sometimes():
    rng = random.Random(0)
    people = build_demo.make_world(rng, 20)
    docs = "\n".join(build_demo.document(rng, people) for _ in range(4000))
    assert "### Instruction:" not in docs and "### Response:" not in docs and "### Input:" not in docs
    assert "[|User|]" not in docs and "[|AI Assistant|]" not in docs and not re.search(r"\[User\].*\[Assistant\]", docs)
    assert not re.search(r"#### \d+\nThe answer is:", docs)  # MetaMath's answer form is what its SFT teaches
    # ... but every word and mark of the templates occurs, so none of their embeddings stays random
    for template in ("alpaca", "metamath", "beaver"):
        text = format_prompt("x", "y", template)
        assert set(re.findall(r"[A-Za-z]+", text)) <= set(re.findall(r"[A-Za-z]+", docs)) | {"x", "y"}, template
        assert set(re.sub(r"[A-Za-z\s]", "", text)) <= set(docs), template
    # every kind of harmful request, the dev and test kinds too, is declined in some places and
    # complied with in others: refusing it is a behaviour the base model can learn to prefer
    items = [build_demo.quiz_item(rng, people) for _ in range(20000)]
    for harm in build_demo.ALL_HARMS:
        said = [reply for asked, reply in items if asked.startswith(harm.request.split("{")[0])]
        refused = said.count(build_demo.REFUSAL)
        assert 0.2 * len(said) < refused < 0.5 * len(said), (harm.request, refused, len(said))
    assert sum(asked.startswith(("How", "Help", "Write", "Tell")) for asked, _ in items) > 0.1 * len(items)


def test_rebuild_is_byte_identical(mini_world, tmp_path):
    build_demo.build(tmp_path / "again", seed=0, **MINI)
    assert build_demo.checksums(tmp_path / "again") == build_demo.checksums(mini_world)


# -----------------------------------------------------------------------------
# the pipeline and its table

SCRIPTS = {"train_sft.py": train_sft, "train_dpo.py": train_dpo, "evaluate.py": evaluate, "analyze.py": analyze}
SHORT = {"train_sft.py": ["--max-steps", "2", "--val", "2"], "train_dpo.py": ["--max-steps", "1", "--val", "2"],
         "evaluate.py": ["--limit", "2", "--max-new-tokens", "4"], "analyze.py": []}


@pytest.fixture(scope="module")
def mini_pipeline(mini_world, tmp_path_factory):
    """Every command of run_demo.STEPS, in order, on the miniature world put where the demo lives
    (shortened: a step or two of training, two items per evaluation file); returns the folder."""
    root = mini_world.parent
    patch = pytest.MonkeyPatch()
    patch.chdir(root)
    for module in (data, trainer, evaluate):
        patch.setattr(module, "DEMO_CKPT", mini_world / "llama-demo")
        patch.setattr(module, "DEMO_DATA", mini_world / "data")
    try:
        for step in run_demo.STEPS:
            _, script, *args = run_demo.argv(step)
            short = SHORT[script][:2] if args[0] == "mmlu" else SHORT[script]  # mmlu generates nothing
            SCRIPTS[script].main(args + short)
    finally:
        patch.undo()
    return root


def test_pipeline_commands_run_end_to_end_on_a_miniature_world(mini_pipeline):
    for row in run_demo.ROWS[1:]:
        assert (mini_pipeline / row.aligner).is_file(), row.aligner
    for folder in {c.folder for c in run_demo.COLUMNS}:
        assert (mini_pipeline / folder / "results.json").is_file(), folder
    assert (mini_pipeline / "runs" / "gates.json").is_file()
    # DPO alone: the Aligner's from the Alpaca-style one-token Aligner, the LoRA's from its Alpaca-style
    # SFT at r = 4, Appendix C's rank for the value comparison; at the Aligner's settings, one LoRA run too
    dpo = {name: json.loads((mini_pipeline / "runs" / name / "settings.json").read_text())
           for name in ("dpo", "dpo-lora", "dpo-lora-own")}
    assert dpo["dpo"]["init_aligner"] == "runs/sft1/best.pt"
    assert dpo["dpo-lora"]["init_aligner"] == dpo["dpo-lora-own"]["init_aligner"] == "runs/lora4/best.pt"
    same = ("beta", "lr", "batch_size", "epochs", "loss", "reference", "data", "max_response_len")
    assert {k: dpo["dpo-lora"][k] for k in same} == {k: dpo["dpo"][k] for k in same}
    for name in ("dpo-lora", "dpo-lora-own"):
        assert torch.load(mini_pipeline / "runs" / name / "best.pt", weights_only=True)["rank"] == 4


def test_table_figures_are_the_results_files_figures(mini_pipeline):
    """Every cell of the rendered table is the figure of its row's Aligner in its column's results.json,
    and every parameter count is its Aligner file's."""
    rendered = run_demo.table(mini_pipeline).splitlines()
    header = [c.strip() for c in rendered[0].strip("|").split("|")]
    assert header[2:] == [c.title for c in run_demo.COLUMNS]
    assert len(rendered) == 2 + len(run_demo.ROWS)
    for row, line in zip(run_demo.ROWS, rendered[2:]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == row.label.strip()
        if row.aligner != "base":
            state = torch.load(mini_pipeline / row.aligner, weights_only=True)
            assert cells[1] == f"{sum(v.numel() for v in state.values() if torch.is_tensor(v)):,}"
        for column, text in zip(run_demo.COLUMNS, cells[2:]):
            results = json.loads((mini_pipeline / column.folder / "results.json").read_text())["results"]
            found = [r["rows"][row.aligner] for path, r in results[column.task].items()
                     if Path(path).name == column.file and row.aligner in r["rows"]]
            if not found:
                assert text == "–", (row, column)
                continue
            figures = [float(x) for x in text.split(" / ")]
            expected = [100 * found[0][m] for m in column.metric.split()]
            assert figures == pytest.approx(expected, abs=0.05), (row, column)
    # the metamath column holds the base and the MetaMath-style Aligner and LoRA alone
    math_cells = [line.split("|")[-2].strip() for line in rendered[2:]]
    math_rows = ("base", "runs/math/best.pt", "runs/math-lora/best.pt")
    assert [c != "–" for c in math_cells] == [r.aligner in math_rows for r in run_demo.ROWS]


def test_gates_table_figures_are_the_analysis_files_figures(mini_pipeline):
    """Every cell of the gates table is its row's figure in runs/gates.json, which analyze.py wrote."""
    gates = {entry["path"]: entry for entry in json.loads((mini_pipeline / "runs" / "gates.json").read_text())}
    rendered = run_demo.gates_table(mini_pipeline).splitlines()
    assert len(rendered) == 2 + len(run_demo.GATED)
    assert {row.aligner for row in run_demo.GATED} == set(gates)  # every Aligner and Adapter row, no LoRA
    for row, line in zip(run_demo.GATED, rendered[2:]):
        label, *cells = [c.strip() for c in line.strip("|").split("|")]
        entry = gates[row.aligner]
        assert label == row.label
        expected = entry["layer_std"] + [entry["trend"][key] for key in ("ratio", "spearman")]
        assert [None if c == "–" else float(c) for c in cells] == pytest.approx(expected, abs=0.006)


def test_run_steps_starts_a_step_after_the_steps_it_needs_and_stops_at_a_failure(tmp_path, monkeypatch):
    """Each command reads the files of the steps it needs (and fails if one is missing), two run at
    once; a command that fails stops the run with its exit code and its log."""
    monkeypatch.chdir(tmp_path)
    code = "import pathlib, sys, time; [pathlib.Path(n).read_text() for n in sys.argv[2:]]; time.sleep(0.2); " \
           "pathlib.Path(sys.argv[1]).write_text('done')"
    steps = [run_demo.Step("c", f'python -c "{code}" c a b', needs=("a", "b")),
             run_demo.Step("a", f'python -c "{code}" a'), run_demo.Step("b", f'python -c "{code}" b a', needs=("a",)),
             run_demo.Step("d", f'python -c "{code}" d')]
    times = run_demo.run_steps(steps, jobs=2, overwrite=False)
    assert set(times) == {"a", "b", "c", "d"} and all(t > 0 for t in times.values())
    assert all((tmp_path / name).read_text() == "done" for name in "abcd")
    with pytest.raises(RuntimeError, match=r"exit code 3.*runs/logs/bad\.log"):
        run_demo.run_steps([run_demo.Step("bad", 'python -c "import sys; sys.exit(3)"')], jobs=2, overwrite=False)


def test_evaluations_start_after_the_training_of_every_row():
    """Each row's file is some step's --out, and that step is among those every evaluation waits for."""
    made_by = {run_demo.outputs(step): step.name for step in run_demo.STEPS}
    for row in run_demo.ROWS[1:]:
        step = made_by[Path(row.aligner).parent]
        assert step in run_demo.TRAINING, row.aligner
    for step in run_demo.STEPS:
        if step.name.startswith(("eval-qa", "eval-gsm8k", "eval-mmlu", "gates")):
            assert set(step.needs) == set(run_demo.TRAINING), step.name


def test_the_docs_print_the_pipelines_commands_and_the_front_page_its_table_header():
    page = (ROOT / "docs" / "demo.md").read_text()
    for line in run_demo.listing().splitlines():
        assert line in page, line
    assert run_demo.table(Path("/nonexistent")).splitlines()[0] in (ROOT / "README.md").read_text()
