"""evaluate.py: GSM8K's filters, metric, stops and prompts against lm-evaluation-harness,
MMLU's prompt against the original release, letter scores and aggregation, QA exact match,
and the command line end to end on a tiny checkpoint."""

import argparse
import csv
import hashlib
import json
import random
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from support import cli
import evaluate
from aligner import Aligner
from conftest import read_jsonl
from support.data import format_prompt
from evaluate import (CATEGORIES, GSM8K_STOP, SUBJECT_CATEGORY, aggregate, continuation_logprobs, exact_match,
                      extract_flexible, extract_strict, gsm8k_prompt, letter_continuations, mmlu_prompt,
                      mmlu_subjects, read_mmlu_csv)
from support.formats import Tokenizer, load

# -----------------------------------------------------------------------------
# GSM8K: the harness's filters and metric


def test_stop_strings_are_the_harness_until():
    # lm_eval/tasks/gsm8k/gsm8k.yaml, generation_kwargs.until (no blank line since 2024)
    assert GSM8K_STOP == ("Question:", "</s>", "<|im_end|>")


# (model output, reference answer) -> what the harness's own code gives: its strict-match and
# flexible-extract filter pipelines (RegexFilter, TakeFirstFilter) and exact_match_hf_evaluate
# with gsm8k.yaml's settings, run on these strings
HARNESS = [
    ("She pays $1,234.56.", "#### 1234.56", "[invalid]", "$1,234.56.", False, True),
    ("#### $18", "#### 18", "[invalid]", "$18", False, True),  # the strict regex takes no dollar sign
    ("5 - 3 = 2\n#### 2.", "#### 2", "2.", "2.", True, True),
    ("It drops to -4 degrees, then 7 ...", "#### 7", "[invalid]", "...", False, False),  # the last match, as it is
    ("#### -2,125", "#### -2,125", "-2,125", "-2,125", True, True),
    ("no number at all", "#### 1", "[invalid]", "[invalid]", False, False),
    ("", "#### 1", "[invalid]", "[invalid]", False, False),
    ("The answer is 18.\n\nSo she makes $18 every day.", "#### 18", "[invalid]", "$18", False, True),
    ("so 5 + 3 = 8\n\n#### 8", "#### 8", "8", "8", True, True),  # a blank line before #### no longer stops it
    ("The total is 1,000,000 dollars", "It costs $1,000,000.\n#### 1,000,000", "[invalid]", "1,000,000", False, True),
    ("#### 18 dollars, #### 19", "#### 18", "18", "19", True, False),
    ("She has 12 apples..", "#### 12", "[invalid]", "..", False, False),
    ("Answer: 3.50", "#### 3.5", "[invalid]", "3.50", False, False),
    ("#### 0.5", "#### .5", "0.5", "0.5", False, False),
]


@pytest.mark.parametrize("text, reference, strict, flexible, strict_ok, flexible_ok", HARNESS)
def test_filters_and_metric_give_what_the_harness_gives(text, reference, strict, flexible, strict_ok, flexible_ok):
    assert (extract_strict(text), extract_flexible(text)) == (strict, flexible)
    assert (exact_match(strict, reference), exact_match(flexible, reference)) == (strict_ok, flexible_ok)


@st.composite
def written_number(draw, dollar=True):
    """(the number as a model might write it, the plain number it stands for)."""
    sign = draw(st.sampled_from(["", "-"]))
    whole = draw(st.integers(0, 10**7))
    frac = draw(st.one_of(st.just(""), st.text("0123456789", min_size=1, max_size=3)))
    decimals = "." + frac if frac else ""
    written = (sign + ("$" if dollar and draw(st.booleans()) else "")
               + (f"{whole:,}" if draw(st.booleans()) else str(whole)) + decimals
               + ("." if draw(st.booleans()) else ""))
    return written, sign + str(whole) + decimals


WORDS = st.sampled_from(["The", "answer", "is", "she", "has", "apples", "=", "+", "*", "(", ")", "so",
                         "Question:", "total:", "\n", "dollars", "each!"])


@settings(max_examples=200, deadline=None)
@given(parts=st.lists(st.one_of(WORDS, written_number()), max_size=12))
def test_flexible_scores_the_last_number(parts):
    text = " ".join(p if isinstance(p, str) else p[0] for p in parts)
    numbers = [p[1] for p in parts if not isinstance(p, str)]
    if numbers:
        assert exact_match(extract_flexible(text), f"#### {numbers[-1]}")
    else:
        assert extract_flexible(text) == "[invalid]"


@settings(max_examples=200, deadline=None)
@given(before=st.lists(st.one_of(WORDS, written_number()), max_size=6), answer=written_number(dollar=False),
       after=st.lists(st.one_of(WORDS, written_number()), max_size=6))
def test_strict_scores_the_number_after_the_first_hashes(before, answer, after):
    words = lambda parts: " ".join(p if isinstance(p, str) else p[0] for p in parts)
    text = f"{words(before)}\n#### {answer[0]} {words(after)}\n#### 99999999"
    assert exact_match(extract_strict(text), f"#### {answer[1]}")


DIGITS = "0123456789"


def strict_by_hand(text: str) -> str:
    """The first match of `#### (\\-?[0-9\\.\\,]+)`, scanned by hand: "#### ", an optional minus,
    then the longest run of digits, points and commas (at least one)."""
    for i in range(len(text)):
        if text.startswith("#### ", i):
            start = i + 5
            first = start + (text[start:start + 1] == "-")
            end = first
            while end < len(text) and text[end] in DIGITS + ".,":
                end += 1
            if end > first:
                return text[start:end]
    return "[invalid]"


def flexible_by_hand(text: str) -> str:
    """The last of the leftmost, non-overlapping matches of `(-?[$0-9.,]{2,})|(-?[0-9]+)`, scanned
    by hand: at each position, an optional minus and a run of two or more of $0-9.,; else an
    optional minus and a run of digits; else move on by one character."""
    found, i = [], 0
    while i < len(text):
        first = i + (text[i] == "-")
        end = first
        while end < len(text) and text[end] in "$.," + DIGITS:
            end += 1
        if end - first < 2:
            end = first
            while end < len(text) and text[end] in DIGITS:
                end += 1
        if end > first:
            found.append(text[i:end])
            i = end
        else:
            i += 1
    return found[-1] if found else "[invalid]"


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(st.text(), st.text(alphabet="#### -$.,0123456789a\n", max_size=40)))
def test_filters_equal_a_hand_written_scan(text):
    """Any text at all, and texts dense in hashes, signs, digits and separators: each filter gives
    what a scan written from its regex by hand gives."""
    assert extract_strict(text) == strict_by_hand(text)
    assert extract_flexible(text) == flexible_by_hand(text)


def test_the_reference_is_what_follows_the_last_hashes():
    answer = "She has 2,000 + 125 = <<2000+125=2125>>2,125.\n#### 2,125"
    assert exact_match("2125", answer) and exact_match("$2,125.", answer) and not exact_match("2000", answer)
    corrected = "#### 5\nNo, the total is:\n#### 7"  # only the text after the last "#### " counts
    assert exact_match("7", corrected) and not exact_match("5", corrected)


def test_exact_match_removes_in_the_harness_order_and_ignores_case():
    """gsm8k.yaml's regexes_to_ignore are removed one after the other, in its order: "," and "$"
    before the final ".", so "7.," and "5.$" end as bare numbers; ignore_case lower-cases both sides."""
    assert [evaluate.normalize(t) for t in ("7.,", "5.$", "#### 5 Apples")] == ["7", "5", "5 apples"]
    assert exact_match("5 APPLES", "#### 5 apples")


def test_gsm8k_generates_until_the_harness_stops_and_scores_both_filters(monkeypatch):
    """run_gsm8k hands generation the harness's stop strings and scores each output with both
    filters against the whole reference answer."""
    outputs = {11: "5 + 3 = 8\n#### 8", 12: "It is 7 dollars.", 13: "#### 1,000\nthen 9 more"}
    golds = {11: "He has 8.\n#### 8", 12: "#### 7", 13: "So 1,000.\n#### 1000"}
    calls = []

    def fake_generate(model, tokenizer, prompts, aligner, **options):
        calls.append(options)
        return [outputs[p[-1]] for p in prompts]

    monkeypatch.setattr(evaluate, "generate", fake_generate)
    items = [evaluate.GenerationItem(f"prompt {k}", [1, k], golds[k], 0, 0) for k in outputs]
    args = argparse.Namespace(batch_size=2, max_new_tokens=9, compile=False)
    result, records = evaluate.run_gsm8k(None, None, None, "base", evaluate.Prepared(items, {}), args)
    assert calls and all(c["stop"] == ["Question:", "</s>", "<|im_end|>"] and c["max_new_tokens"] == 9
                         for c in calls)
    assert [(r["strict"], r["flexible"]) for r in records] == [("8", "8"), ("[invalid]", "7"), ("1,000", "9")]
    assert [(r["strict_correct"], r["flexible_correct"]) for r in records] == [(True, True), (False, True),
                                                                               (True, False)]
    assert [r["gold"] for r in records] == ["8", "7", "1000"]
    assert result == {"strict": 2 / 3, "flexible": 2 / 3, "strict_found": 2 / 3, "n": 3}


# -----------------------------------------------------------------------------
# prompts

JANET = ("Janet\u2019s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins "
         "for her friends every day with four. She sells the remainder at the farmers' market daily for $2 per "
         "fresh duck egg. How much in dollars does she make every day at the farmers' market?")


def test_gsm8k_prompt_with_two_shots_is_exact():
    shots = [{"question": "Tom has 3 cats. He gets 2 more. How many cats?", "answer": "3 + 2 = <<3+2=5>>5\n#### 5"},
             {"question": "Ann had 10 pens and lost 4. How many are left?", "answer": "10 - 4 = <<10-4=6>>6\n#### 6"}]
    assert gsm8k_prompt(JANET, shots) == (
        "Question: Tom has 3 cats. He gets 2 more. How many cats?\nAnswer: 3 + 2 = <<3+2=5>>5\n#### 5\n\n"
        "Question: Ann had 10 pens and lost 4. How many are left?\nAnswer: 10 - 4 = <<10-4=6>>6\n#### 6\n\n"
        f"Question: {JANET}\nAnswer:")


def write_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)


DEV = [["Which is a prime?", "4", "6", "7", "9", "C"],
       ["Statement 1 | x, y.\nStatement 2 | \"z\".", "True, True", "False, False", "True, False", "False, True", "B"],
       ["Unused third shot?", "a", "b", "c", "d", "A"]]
TEST_ROW = ["Find the order of the group, if any.", "1", "2", "3", "4", "D"]


def test_mmlu_rows_with_quotes_and_line_breaks_parse(tmp_path):
    write_csv(tmp_path / "dev" / "abstract_algebra_dev.csv", DEV)
    assert read_mmlu_csv(tmp_path / "dev" / "abstract_algebra_dev.csv") == [tuple(r) for r in DEV]


def test_a_bad_mmlu_row_is_named_by_file_and_line(tmp_path):
    write_csv(tmp_path / "bad.csv", [DEV[1], ["q", "a", "b", "c", "D"]])
    with pytest.raises(ValueError, match=r"bad\.csv, line 3: 5 fields"):  # the first row spans lines 1-2
        read_mmlu_csv(tmp_path / "bad.csv")
    write_csv(tmp_path / "bad.csv", [DEV[0], ["q", "a", "b", "c", "d", "E"]])
    with pytest.raises(ValueError, match=r"bad\.csv, line 2: answer 'E' is not one of A, B, C, D"):
        read_mmlu_csv(tmp_path / "bad.csv")


def test_mmlu_prompt_with_two_shots_is_exact():
    """The release's header has two spaces after "about": its format_subject puts one before each word."""
    assert mmlu_prompt("abstract_algebra", [tuple(r) for r in DEV[:2]], tuple(TEST_ROW)) == (
        "The following are multiple choice questions (with answers) about  abstract algebra.\n\n"
        "Which is a prime?\nA. 4\nB. 6\nC. 7\nD. 9\nAnswer: C\n\n"
        "Statement 1 | x, y.\nStatement 2 | \"z\".\nA. True, True\nB. False, False\nC. True, False\n"
        "D. False, True\nAnswer: B\n\n"
        "Find the order of the group, if any.\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:")


def test_mmlu_fields_are_read_as_written(tmp_path):
    """"None" stays "None", as the release's pandas.read_csv kept it before pandas 2.0 (which reads
    it as missing and prints "nan"); docs/generate-and-evaluate.md says so."""
    write_csv(tmp_path / "t.csv", [["Which is printed?", "None", "0", "1", "nan", "A"]])
    (row,) = read_mmlu_csv(tmp_path / "t.csv")
    assert mmlu_prompt("college_computer_science", [], row) == (
        "The following are multiple choice questions (with answers) about  college computer science.\n\n"
        "Which is printed?\nA. None\nB. 0\nC. 1\nD. nan\nAnswer:")


# -----------------------------------------------------------------------------
# MMLU letter scores and aggregation


def test_the_category_map_is_the_releases():
    assert len(SUBJECT_CATEGORY) == 57
    assert {c: len(names.split()) for c, names in CATEGORIES.items()} == {
        "STEM": 18, "humanities": 13, "social sciences": 12, "other": 14}


def hand_logprob(model, context, continuation, aligner=None):
    """log P(continuation | context), one unpadded forward of the whole sequence."""
    logits = model(torch.tensor([context + continuation]), aligner=aligner)[0]  # (T, V)
    logp = torch.log_softmax(logits, dim=-1)
    return sum(logp[len(context) - 1 + t, token].item() for t, token in enumerate(continuation))


@pytest.mark.parametrize("with_aligner", [False, True])
def test_letter_scores_equal_a_hand_computation(tiny_ckpt, with_aligner):
    """Items of different lengths in one right-padded batch; single-token letters read from one
    row, multi-token letters from one row each."""
    model, tokenizer = load(tiny_ckpt, max_seq_len=256)
    aligner = None
    if with_aligner:
        torch.manual_seed(0)
        aligner = Aligner(model.args, n_tokens=2)
        aligner.gates.data.normal_()
    items = [([1, 5, 9, 30], [[40], [41], [42], [43]]),
             ([1, 7], [[50, 51], [52], [53, 54, 55], [56]]),
             ([1, 3, 4, 5, 6, 7, 8, 9, 10, 11], [[60], [61], [62], [63]])]
    with torch.no_grad():
        got = continuation_logprobs(model, items, aligner)
        want = torch.tensor([[hand_logprob(model, ctx, c, aligner) for c in conts] for ctx, conts in items])
    assert got.shape == (3, 4)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_letter_continuations_are_the_tokens_a_letter_adds(tiny_ckpt):
    tokenizer = Tokenizer(tiny_ckpt.parent / "tokenizer.model")
    prompt = mmlu_prompt("abstract_algebra", [tuple(DEV[0])], tuple(TEST_ROW))
    ((context, continuations),) = letter_continuations(tokenizer, [prompt])
    assert context == tokenizer.encode(prompt, bos=True)
    for letter, cont in zip("ABCD", continuations):
        assert tokenizer.decode(context + cont) == f"{tokenizer.decode(context)} {letter}"


def test_aggregation_by_subject_category_and_overall():
    records = [("abstract_algebra", True), ("abstract_algebra", False), ("philosophy", True),
               ("philosophy", True), ("philosophy", True), ("anatomy", False)]
    result = aggregate(records)
    assert result["by_subject"] == {"abstract_algebra": 0.5, "anatomy": 0.0, "philosophy": 1.0}
    assert result["categories"] == {"STEM": 0.5, "humanities": 1.0, "other": 0.0}
    assert result["questions"] == pytest.approx(4 / 6)  # the mean over questions
    assert result["subjects"] == pytest.approx(0.5)  # the mean over subjects
    assert result["n"] == 6


def test_a_category_pools_its_questions():
    """Two STEM subjects of 1 and 3 questions: STEM is 2 right of 4 pooled (0.5), not the mean of
    the subjects' accuracies (1 and 1/3); the mean over subjects is over all subjects."""
    records = [("abstract_algebra", True), ("astronomy", False), ("astronomy", False), ("astronomy", True),
               ("philosophy", False)]
    result = aggregate(records)
    assert result["categories"] == {"STEM": 0.5, "humanities": 0.0}
    assert result["subjects"] == pytest.approx((1 + 1 / 3 + 0) / 3) and result["questions"] == pytest.approx(2 / 5)


# -----------------------------------------------------------------------------
# the command line, end to end


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.\n\n### Instruction:\n{}\n\n### Response:")


def test_cli_runs_all_tasks_and_a_zero_gate_aligner_matches_the_base(tiny_ckpt, tmp_path):
    data = tmp_path / "data"
    train = [{"question": f"Tom has {i} cats. How many?", "answer": f"He has {i}.\n#### {i}"} for i in range(6)]
    write_jsonl(data / "gsm8k" / "train.jsonl", train)
    write_jsonl(data / "gsm8k" / "test.jsonl", [{"question": "Ann has 2 pens and 3 more. How many?",
                                                 "answer": "2 + 3 = 5\n#### 5"}] * 2)
    for subject in ("abstract_algebra", "philosophy"):
        write_csv(data / "mmlu" / "dev" / f"{subject}_dev.csv", DEV)
        write_csv(data / "mmlu" / "test" / f"{subject}_test.csv", [TEST_ROW, DEV[0]])
    qa = [{"instruction": "What is a robin?", "output": "A bird."},
          {"instruction": "Name the capital.", "input": "France", "output": "Paris"}]
    write_jsonl(data / "qa" / "first.jsonl", qa)
    zero = tmp_path / "zero.pt"
    Aligner(load(tiny_ckpt)[0].args, n_tokens=1).save(zero)  # zero gates: the base model exactly

    common = ["--ckpt", str(tiny_ckpt), "--aligner", "base", "--aligner", str(zero), "--max-new-tokens", "6",
              "--max-seq-len", "256", "--batch-size", "2"]
    evaluate.main(["gsm8k", *common, "--data", str(data / "gsm8k" / "test.jsonl"), "--shots", "2",
                   "--out", str(tmp_path / "g")])
    evaluate.main(["mmlu", *common, "--data", str(data / "mmlu"), "--shots", "2", "--out", str(tmp_path / "m")])
    evaluate.main(["qa", *common, "--data", str(data / "qa" / "first.jsonl"), "--out", str(tmp_path / "q1")])

    # QA: a second file whose references are the model's own completions scores 100%
    completions = [p["output"] for p in read_jsonl(tmp_path / "q1" / "qa.jsonl") if p["aligner"] == "base"]
    write_jsonl(data / "qa" / "own.jsonl", [{**r, "output": f"  {c}\n"} for r, c in zip(qa, completions)])
    write_jsonl(data / "qa" / "wrong.jsonl", [{**r, "output": "\u00a7never generated\u00a7"} for r in qa])
    evaluate.main(["qa", *common, "--data", str(data / "qa" / "own.jsonl"), str(data / "qa" / "wrong.jsonl"),
                   "--out", str(tmp_path / "q2")])
    qa_rows = json.loads((tmp_path / "q2" / "results.json").read_text())["results"]["qa"]
    assert [r["rows"]["base"]["accuracy"] for r in qa_rows.values()] == [1.0, 0.0]
    assert [r["rows"]["base"]["starts"] for r in qa_rows.values()] == [1.0, 0.0]
    # a reference that is only the start of each completion: not an exact match, but said first
    write_jsonl(data / "qa" / "start.jsonl", [{**r, "output": c[:len(c.strip()) // 2 or 1]}
                                              for r, c in zip(qa, completions) if len(c.strip()) > 1])
    evaluate.main(["qa", *common, "--data", str(data / "qa" / "start.jsonl"), "--out", str(tmp_path / "q3")])
    (start,) = json.loads((tmp_path / "q3" / "results.json").read_text())["results"]["qa"].values()
    assert (start["rows"]["base"]["accuracy"], start["rows"]["base"]["starts"]) == (0.0, 1.0)

    for out, task in (("g", "gsm8k"), ("m", "mmlu"), ("q1", "qa")):
        summary = json.loads((tmp_path / out / "results.json").read_text())
        (result,) = summary["results"][task].values()
        rows = result["rows"]
        assert list(rows) == ["base", str(zero)]
        assert rows["base"] == rows[str(zero)]
        preds = read_jsonl(tmp_path / out / f"{task}.jsonl")
        base = [p for p in preds if p["aligner"] == "base"]
        assert [{k: v for k, v in p.items() if k != "aligner"} for p in base] == [
            {k: v for k, v in p.items() if k != "aligner"} for p in preds if p["aligner"] == str(zero)]
        if task == "gsm8k":
            assert result["info"]["shots"] == 2 and len(base) == 2
            assert rows["base"]["flexible"] == sum(p["flexible_correct"] for p in base) / 2
            assert all(p["gold"] == "5" for p in base)
        elif task == "mmlu":
            assert len(base) == 4 and result["info"]["letters_single_token"] + \
                result["info"]["letters_multi_token"] == 4
            for p in base:
                assert p["pred"] == "ABCD"[max(range(4), key=p["logprobs"].__getitem__)]
            assert rows["base"]["questions"] == sum(p["correct"] for p in base) / 4
            assert set(rows["base"]["categories"]) == {"STEM", "humanities"}


def test_out_records_hold_the_exact_prompt_and_the_stop_strings(tiny_ckpt, tmp_path):
    train = [{"question": f"Tom has {i} cats. How many?", "answer": f"He has {i}.\n#### {i}"} for i in range(6)]
    write_jsonl(tmp_path / "gsm8k" / "train.jsonl", train)
    write_jsonl(tmp_path / "gsm8k" / "test.jsonl", [{"question": "Ann has 2 pens. How many?", "answer": "#### 2"}])
    write_csv(tmp_path / "mmlu" / "dev" / "anatomy_dev.csv", DEV)
    write_csv(tmp_path / "mmlu" / "test" / "anatomy_test.csv", [TEST_ROW])
    write_jsonl(tmp_path / "qa.jsonl", [{"instruction": "What is a robin?", "output": "A bird."}])
    common = ["--ckpt", str(tiny_ckpt), "--max-new-tokens", "4", "--max-seq-len", "256"]
    evaluate.main(["gsm8k", *common, "--data", str(tmp_path / "gsm8k" / "test.jsonl"), "--shots", "2",
                   "--seed", "5", "--out", str(tmp_path / "g")])
    evaluate.main(["mmlu", *common, "--data", str(tmp_path / "mmlu"), "--paper", "--out", str(tmp_path / "m")])
    evaluate.main(["qa", *common, "--data", str(tmp_path / "qa.jsonl"), "--out", str(tmp_path / "q")])

    (gsm8k,) = read_jsonl(tmp_path / "g" / "gsm8k.jsonl")
    a, b = random.Random(5).sample(range(6), 2)  # the harness's draw: random.Random(seed).sample(pool, k)
    assert gsm8k["prompt"] == (f"Question: Tom has {a} cats. How many?\nAnswer: He has {a}.\n#### {a}\n\n"
                               f"Question: Tom has {b} cats. How many?\nAnswer: He has {b}.\n#### {b}\n\n"
                               "Question: Ann has 2 pens. How many?\nAnswer:")
    assert gsm8k["stop"] == ["Question:", "</s>", "<|im_end|>"] and gsm8k["shots"] == 2
    (mmlu,) = read_jsonl(tmp_path / "m" / "mmlu.jsonl")
    assert mmlu["prompt"] == ("The following are multiple choice questions (with answers) about  anatomy.\n\n"
                              "Which is a prime?\nA. 4\nB. 6\nC. 7\nD. 9\nAnswer: C\n\n"  # --paper: one shot
                              "Find the order of the group, if any.\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:")
    (qa,) = read_jsonl(tmp_path / "q" / "qa.jsonl")
    assert qa["prompt"] == ALPACA_NO_INPUT.format("What is a robin?") and qa["stop"] == []


def test_paper_setting_is_one_shot_each_and_excludes_shots(tiny_ckpt, tmp_path, capsys):
    write_jsonl(tmp_path / "gsm8k" / "train.jsonl", [{"question": f"Q{i}?", "answer": f"#### {i}"} for i in range(4)])
    write_jsonl(tmp_path / "gsm8k" / "test.jsonl", [{"question": "T?", "answer": "#### 1"}])
    results = evaluate.main(["gsm8k", "--ckpt", str(tiny_ckpt), "--data", str(tmp_path / "gsm8k" / "test.jsonl"),
                             "--paper", "--max-new-tokens", "2", "--max-seq-len", "256"])
    (result,) = results["gsm8k"].values()
    assert result["info"]["shots"] == 1
    with pytest.raises(SystemExit) as stopped:
        cli.run(evaluate.main, ["gsm8k", "--ckpt", str(tiny_ckpt), "--paper", "--shots", "3"])
    assert stopped.value.code == 2 and "give either --paper or --shots" in capsys.readouterr().err


def test_a_qa_prompt_needs_room_for_the_tokens_to_generate(tiny_ckpt, tmp_path):
    write_jsonl(tmp_path / "qa.jsonl", [{"instruction": "What is a robin?", "output": "A bird."}])
    tokenizer = Tokenizer(tiny_ckpt.parent / "tokenizer.model")
    n = len(tokenizer.encode(format_prompt("What is a robin?"), bos=True))
    fits = argparse.Namespace(limit=None, template=None, max_new_tokens=10, max_seq_len=n + 10)
    assert len(evaluate.prepare_qa(tmp_path / "qa.jsonl", tokenizer, 0, fits).items) == 1
    with pytest.raises(evaluate.DataError, match=r"qa\.jsonl, record 1: the prompt and --max-new-tokens exceed"):
        evaluate.prepare_qa(tmp_path / "qa.jsonl", tokenizer, 0,
                            argparse.Namespace(**{**vars(fits), "max_seq_len": n + 9}))


def test_missing_or_empty_evaluation_data_is_named(tiny_ckpt, tmp_path):
    tokenizer = Tokenizer(tiny_ckpt.parent / "tokenizer.model")
    args = argparse.Namespace(limit=None, template=None, seed=0, max_seq_len=256, max_new_tokens=8)
    (tmp_path / "mmlu" / "test").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"mmlu/dev: missing; an MMLU folder holds dev/ and test/"):
        mmlu_subjects(tmp_path / "mmlu", "dev")
    with pytest.raises(FileNotFoundError, match=r"mmlu/test: no <subject>_test\.csv files"):
        mmlu_subjects(tmp_path / "mmlu")
    write_csv(tmp_path / "mmlu" / "test" / "anatomy_test.csv", [TEST_ROW])
    with pytest.raises(FileNotFoundError, match=r"anatomy_dev\.csv: missing; the few-shot examples come from"):
        evaluate.prepare_mmlu(tmp_path / "mmlu", tokenizer, 1, args)
    (tmp_path / "test.jsonl").write_text("\n")
    with pytest.raises(evaluate.DataError, match=r"test\.jsonl: no records"):
        evaluate.prepare_qa(tmp_path / "test.jsonl", tokenizer, 0, args)
    write_jsonl(tmp_path / "test.jsonl", [{"question": "Q?", "answer": "#### 1"}])
    write_jsonl(tmp_path / "train.jsonl", [{"question": "Q?", "answer": "#### 1"}] * 2)
    with pytest.raises(evaluate.DataError, match=r"train\.jsonl: 2 records, fewer than --shots 3"):
        evaluate.prepare_gsm8k(tmp_path / "test.jsonl", tokenizer, 3, args)


@pytest.mark.parametrize("argv, message", [(["all", "--data", "x.jsonl"], "--data needs a single task"),
                                           (["mmlu", "--template", "alpaca"], "--template applies to qa and gsm8k")])
def test_flags_that_do_not_go_together_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.run(evaluate.main, argv)
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_prompts_cut_from_the_left_are_warned_about(capsys):
    items = [evaluate.GenerationItem("p", [1, 2], "#### 1", 0, 3), evaluate.GenerationItem("q", [1], "#### 1", 0, 0)]
    evaluate.warn_if_shortened("gsm8k", "test.jsonl", evaluate.Prepared(items, {"prompts_cut": 1}),
                               argparse.Namespace(max_seq_len=64))
    assert capsys.readouterr().err == ("warning: gsm8k test.jsonl: 1 of 2 prompts were cut from the left to fit "
                                       "--max-seq-len 64 even without shots\n")


def test_the_default_shots_are_llama_2s_8_and_5(tiny_ckpt, tmp_path):
    """Without --shots or --paper: GSM8K 8-shot and MMLU 5-shot, as the LLaMA-2 paper reports them."""
    write_jsonl(tmp_path / "gsm8k" / "train.jsonl", [{"question": f"Q{i}?", "answer": f"#### {i}"} for i in range(10)])
    write_jsonl(tmp_path / "gsm8k" / "test.jsonl", [{"question": "T?", "answer": "#### 1"}])
    write_csv(tmp_path / "mmlu" / "dev" / "anatomy_dev.csv", DEV * 2)
    write_csv(tmp_path / "mmlu" / "test" / "anatomy_test.csv", [TEST_ROW])
    common = ["--ckpt", str(tiny_ckpt), "--max-new-tokens", "2", "--max-seq-len", "512"]
    gsm8k = evaluate.main(["gsm8k", *common, "--data", str(tmp_path / "gsm8k" / "test.jsonl"),
                           "--out", str(tmp_path / "g")])
    mmlu = evaluate.main(["mmlu", *common, "--data", str(tmp_path / "mmlu"), "--out", str(tmp_path / "m")])
    assert [list(r.values())[0]["info"]["shots"] for r in (gsm8k["gsm8k"], mmlu["mmlu"])] == [8, 5]
    assert read_jsonl(tmp_path / "g" / "gsm8k.jsonl")[0]["prompt"].count("Question:") == 9
    assert read_jsonl(tmp_path / "m" / "mmlu.jsonl")[0]["prompt"].count("Answer:") == 6


def test_qa_puts_its_questions_in_the_template(tiny_ckpt, tmp_path):
    write_jsonl(tmp_path / "qa.jsonl", [{"instruction": "What is a robin?", "output": "A bird."}])
    evaluate.main(["qa", "--ckpt", str(tiny_ckpt), "--data", str(tmp_path / "qa.jsonl"), "--template", "beaver",
                   "--max-new-tokens", "2", "--max-seq-len", "256", "--out", str(tmp_path / "q")])
    assert read_jsonl(tmp_path / "q" / "qa.jsonl")[0]["prompt"] == "[User] What is a robin? [Assistant] "


def test_prompts_that_drop_shots_are_counted_and_warned_about(tiny_ckpt, tmp_path, capsys):
    write_csv(tmp_path / "mmlu" / "dev" / "anatomy_dev.csv", DEV)
    write_csv(tmp_path / "mmlu" / "test" / "anatomy_test.csv", [TEST_ROW, ["Short?", "a", "b", "c", "d", "A"]])
    tokenizer = Tokenizer(tiny_ckpt.parent / "tokenizer.model")
    ((two_shots, conts),) = letter_continuations(tokenizer, [mmlu_prompt("anatomy", [tuple(r) for r in DEV[:2]],
                                                                           tuple(TEST_ROW))])
    limit = len(two_shots) + max(map(len, conts)) - 1  # the first question fits with 2 of its 3 shots
    results = evaluate.main(["mmlu", "--ckpt", str(tiny_ckpt), "--data", str(tmp_path / "mmlu"), "--shots", "3",
                             "--max-seq-len", str(limit), "--out", str(tmp_path / "out")])
    (result,) = results["mmlu"].values()
    assert result["info"]["prompts_dropping_shots"] >= 1 and result["info"]["prompts_cut"] == 0
    saved = json.loads((tmp_path / "out" / "results.json").read_text())["results"]["mmlu"]
    assert list(saved.values())[0]["info"] == result["info"]
    err = capsys.readouterr().err
    assert f"warning: mmlu {tmp_path / 'mmlu'}: {result['info']['prompts_dropping_shots']} of 2 prompts dropped " \
           f"shots ({result['info']['shots_dropped']} in all) to fit --max-seq-len {limit}" in err
    records = read_jsonl(tmp_path / "out" / "mmlu.jsonl")
    assert records[0]["shots"] == 2 and records[0]["prompt"].count("Answer:") == 3


def test_gsm8k_shots_are_a_seeded_draw_per_item(tiny_ckpt, tmp_path):
    train = [{"question": f"Q{i}?", "answer": f"#### {i}"} for i in range(20)]
    test = [{"question": f"T{i}?", "answer": f"#### {i}"} for i in range(3)]
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "test.jsonl", test)
    tokenizer = Tokenizer(tiny_ckpt.parent / "tokenizer.model")
    args = argparse.Namespace(limit=None, template=None, seed=7, max_seq_len=4096, max_new_tokens=16)
    items, info = evaluate.prepare_gsm8k(tmp_path / "test.jsonl", tokenizer, 3, args)
    rng = random.Random(7)
    want = [gsm8k_prompt(t["question"], rng.sample(train, 3)) for t in test]
    assert [item.prompt for item in items] == want
    assert [item.ids for item in items] == [tokenizer.encode(p, bos=True) for p in want]
    assert [item.gold for item in items] == ["#### 0", "#### 1", "#### 2"] and info["shots_dropped"] == 0


@pytest.mark.parametrize("template, prompt", [
    ("alpaca", ALPACA_NO_INPUT.format(JANET)),
    ("metamath", f"[|User|] {JANET} [|AI Assistant|] "),
])
def test_a_template_makes_gsm8k_zero_shot_in_that_format(tiny_ckpt, tmp_path, template, prompt):
    write_jsonl(tmp_path / "test.jsonl", [{"question": JANET, "answer": "#### 18"}])
    tokenizer = Tokenizer(tiny_ckpt.parent / "tokenizer.model")
    args = argparse.Namespace(limit=None, template=template, seed=0, max_seq_len=4096, max_new_tokens=16)
    (item,), info = evaluate.prepare_gsm8k(tmp_path / "test.jsonl", tokenizer, 8, args)
    assert item.prompt == prompt and item.ids == tokenizer.encode(prompt, bos=True)
    assert info["shots"] == 0 and info["template"] == template and info["stop"] == list(GSM8K_STOP)


def test_a_prompt_too_long_for_the_context_drops_shots_from_the_end(tiny_ckpt, tmp_path):
    write_csv(tmp_path / "mmlu" / "dev" / "anatomy_dev.csv", DEV)
    write_csv(tmp_path / "mmlu" / "test" / "anatomy_test.csv", [TEST_ROW])
    tokenizer = Tokenizer(tiny_ckpt.parent / "tokenizer.model")

    def with_shots(k):
        prompt = mmlu_prompt("anatomy", [tuple(r) for r in DEV[:k]], tuple(TEST_ROW))
        ((context, continuations),) = letter_continuations(tokenizer, [prompt])
        return prompt, context, len(context) + max(map(len, continuations)) - 1  # the longest row it makes

    (two_text, two, fits), (zero_text, zero, smallest) = with_shots(2), with_shots(0)
    (item,), info = evaluate.prepare_mmlu(tmp_path / "mmlu", tokenizer, 3,
                                          argparse.Namespace(limit=None, max_seq_len=fits))
    assert info["shots_dropped"] == 1 and info["prompts_dropping_shots"] == 1 and info["prompts_cut"] == 0
    assert (item.prompt, item.context, item.shots, item.tokens_cut) == (two_text, two, 2, 0)
    (item,), info = evaluate.prepare_mmlu(tmp_path / "mmlu", tokenizer, 3,
                                          argparse.Namespace(limit=None, max_seq_len=smallest - 5))
    assert info["shots_dropped"] == 3 and info["prompts_cut"] == 1
    assert item.context == zero[:1] + zero[6:] and item.tokens_cut == 5  # BOS kept, the oldest tokens cut
    assert item.prompt == zero_text


def test_without_the_demo_the_cli_says_how_to_build_it(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "DEMO_CKPT", tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="support.build_demo"):
        evaluate.main([])


# -----------------------------------------------------------------------------
# the real files, against the references' own code


@pytest.mark.parametrize("split, n", [("test", 1319), ("train", 7473)])
def test_every_real_gsm8k_answer_scores_through_both_filters(shared_data, split, n):
    records = [json.loads(line) for line in (shared_data / "gsm8k" / f"{split}.jsonl").read_text().splitlines()]
    assert len(records) == n
    for r in records:
        assert exact_match(extract_strict(r["answer"]), r["answer"])
        assert exact_match(extract_flexible(r["answer"]), r["answer"])


def sha256(texts) -> str:
    return hashlib.sha256("\0".join(texts).encode()).hexdigest()


def test_real_gsm8k_prompts_and_shot_draws_equal_the_harness(shared_data):
    """The harness's own code (ContextSampler seeded 1234, gsm8k.yaml's doc_to_text and
    doc_to_target, build_qa_turn) on these files gives: for the first test item, the train
    lines (from 0) below; for all prompts, these sha256 digests of their texts joined by NUL."""
    tokenizer = Tokenizer(shared_data / "llama-tokenizer" / "tokenizer.model")
    test_path = shared_data / "gsm8k" / "test.jsonl"
    train = [json.loads(line) for line in (shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in test_path.read_text().splitlines()]

    args = argparse.Namespace(limit=200, template=None, seed=1234, max_seq_len=4096, max_new_tokens=256)
    items, info = evaluate.prepare_gsm8k(test_path, tokenizer, 8, args)
    assert items[0].prompt == gsm8k_prompt(test[0]["question"],
                                           [train[i] for i in (6374, 3610, 957, 61, 742, 7462, 6610, 4769)])
    assert sha256(item.prompt for item in items) == "8d049c70a9ec176b12c17d4e8841d5da05317bd5a3cde19d851688f95e35ec7e"
    assert info["prompts_dropping_shots"] == 0

    args.limit = None
    items, _ = evaluate.prepare_gsm8k(test_path, tokenizer, 1, args)  # --paper
    assert len(items) == 1319
    assert sha256(item.prompt for item in items) == "614217df57442b3d68eb2c5f1ae625a2baeb3faa9abe237e2355fad0f7b78990"
    assert items[0].prompt == (
        "Question: Jen and Tyler are gymnasts practicing flips. Jen is practicing the triple-flip while Tyler is "
        "practicing the double-flip. Jen did sixteen triple-flips during practice. Tyler flipped in the air half "
        "the number of times Jen did. How many double-flips did Tyler do?\n"
        "Answer: Jen did 16 triple-flips, so she did 16 * 3 = <<16*3=48>>48 flips.\n"
        "Tyler did half the number of flips, so he did 48 / 2 = <<48/2=24>>24 flips.\n"
        "A double flip has two flips, so Tyler did 24 / 2 = <<24/2=12>>12 double-flips.\n#### 12\n\n"
        f"Question: {JANET}\nAnswer:")


def test_real_mmlu_prompts_equal_the_original_releases(shared_data):
    """hendrycks/test evaluate.py's own gen_prompt and format_example on these files (read by
    pandas, none of these rows holding "None") give, for the first 3 test questions of each of
    the 57 subjects in sorted order, these sha256 digests of the prompts joined by NUL."""
    tokenizer = Tokenizer(shared_data / "llama-tokenizer" / "tokenizer.model")
    folder = shared_data / "mmlu"
    for shots, digest in ((5, "f8bb70307d7100d3de8d89d75e57483c32aca36b823cb467d42ddc08f63f098e"),
                          (1, "6507c27bc92684675e40ad9f63b41e629ad5c3ba526fdc0c8a1bc86c489e7acb")):
        items, info = evaluate.prepare_mmlu(folder, tokenizer, shots, argparse.Namespace(limit=3, max_seq_len=4096))
        assert len(items) == 171 and info["prompts_dropping_shots"] == 0
        assert sha256(item.prompt for item in items) == digest
        for item in items:  # the release's rules, stated: its header, the first dev rows, the question
            with open(folder / "dev" / f"{item.subject}_dev.csv", newline="", encoding="utf-8") as f:
                dev = list(csv.reader(f))[:shots]
            with open(folder / "test" / f"{item.subject}_test.csv", newline="", encoding="utf-8") as f:
                question = next(r for r in csv.reader(f) if item.prompt.endswith(
                    f"{r[0]}\nA. {r[1]}\nB. {r[2]}\nC. {r[3]}\nD. {r[4]}\nAnswer:"))
            subject = item.subject.replace("_", " ")
            header = f"The following are multiple choice questions (with answers) about  {subject}."
            assert item.prompt == (
                header + "\n\n"
                + "".join(f"{q}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer: {x}\n\n" for q, a, b, c, d, x in dev)
                + f"{question[0]}\nA. {question[1]}\nB. {question[2]}\nC. {question[3]}\nD. {question[4]}\nAnswer:")
    (first, *_), _ = evaluate.prepare_mmlu(folder, tokenizer, 5, argparse.Namespace(limit=1, max_seq_len=4096))
    assert first.prompt == (
        "The following are multiple choice questions (with answers) about  abstract algebra.\n\n"
        "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: B\n\n"
        "Statement 1 | If aH is an element of a factor group, then |aH| divides |a|. Statement 2 | If H and K are "
        "subgroups of G then HK is a subgroup of G.\nA. True, True\nB. False, False\nC. True, False\n"
        "D. False, True\nAnswer: B\n\n"
        "Statement 1 | Every element of a group generates a cyclic subgroup of the group. Statement 2 | The "
        "symmetric group S_10 has 10 elements.\nA. True, True\nB. False, False\nC. True, False\nD. False, True\n"
        "Answer: C\n\n"
        "Statement 1| Every function from a finite set onto itself must be one to one. Statement 2 | Every subgroup "
        "of an abelian group is abelian.\nA. True, True\nB. False, False\nC. True, False\nD. False, True\n"
        "Answer: A\n\n"
        "Find the characteristic of the ring 2Z.\nA. 0\nB. 3\nC. 12\nD. 30\nAnswer: A\n\n"
        "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
        "A. 0\nB. 4\nC. 2\nD. 6\nAnswer:")


def test_all_57_real_mmlu_subjects_parse_with_the_official_counts(shared_data):
    folder = shared_data / "mmlu"
    for split, n in (("dev", 285), ("val", 1531), ("test", 14042)):
        subjects = mmlu_subjects(folder, split)
        assert set(subjects) == set(SUBJECT_CATEGORY)
        assert sum(len(read_mmlu_csv(folder / split / f"{s}_{split}.csv")) for s in subjects) == n


def test_with_the_llama_tokenizer_each_letter_is_one_token(shared_data):
    tokenizer = Tokenizer(shared_data / "llama-tokenizer" / "tokenizer.model")
    folder = shared_data / "mmlu"
    dev = read_mmlu_csv(folder / "dev" / "astronomy_dev.csv")
    row = read_mmlu_csv(folder / "test" / "astronomy_test.csv")[0]
    ((_, continuations),) = letter_continuations(tokenizer, [mmlu_prompt("astronomy", dev, row)])
    assert continuations == [[319], [350], [315], [360]]  # "▁A" ... "▁D"


def test_compile_reaches_generate_for_the_generation_tasks(tiny_ckpt, tmp_path, monkeypatch):
    """--compile is passed on to generate for gsm8k and qa (what it does is tested in test_generate.py)."""
    seen = []
    monkeypatch.setattr(evaluate, "generate", lambda model, tok, prompts, aligner, **kw: seen.append(kw["compile"])
                        or ["" for _ in prompts])
    qa = tmp_path / "qa.jsonl"
    write_jsonl(qa, [{"instruction": "What is a robin?", "output": "A bird."}])
    for flags in ([], ["--compile"]):
        evaluate.main(["qa", "--ckpt", str(tiny_ckpt), "--data", str(qa), "--max-seq-len", "256",
                       "--max-new-tokens", "8", *flags])
    assert seen == [False, True]


# -----------------------------------------------------------------------------
# MMLU scored as the authors' log scored it (--scoring generate)

AUTHORS_LOG = Path(__file__).parent / "data" / "authors_mmlu_log.jsonl"  # tests/data/README.md names its source


def test_the_answer_rule_reproduces_every_is_model_correct_of_the_authors_log():
    records = read_jsonl(AUTHORS_LOG)
    assert len(records) == 68
    verdicts = [evaluate.answer_matches(r["model_answer"], r["choices"][r["answer"]]) for r in records]
    assert verdicts == [r["is_model_correct"] for r in records]
    assert sum(verdicts) == 9  # 5 word for word, 4 without the choice's final "."
    # what the rule must not do: remove quotes. 16 answers are the right choice in quotes, all counted wrong
    unquoted = [evaluate.answer_matches(r["model_answer"].strip("'\""), r["choices"][r["answer"]]) for r in records]
    assert sum(u != r["is_model_correct"] for u, r in zip(unquoted, records)) == 16
    assert sum(r["model_answer"] == repr(r["choices"][r["answer"]]) for r in records) == 15
    # the quotes are Python's: 43 answers are a choice exactly as repr() writes it
    assert sum(r["model_answer"] in [repr(c) for c in r["choices"]] for r in records) == 43


def test_generated_mmlu_answers_are_matched_by_the_rule(monkeypatch, tmp_path):
    """run_mmlu_generated asks for one line per question and scores it against the right choice's text."""
    answers = {"Find the order of the group, if any.": "4.", "Which is a prime?": "'7'"}  # right; quoted: wrong
    calls = []

    def fake_generate(model, tokenizer, prompts, aligner, **options):
        calls.append(options)
        return [answers[tokenizer.decode(p).split("Instruction:\n")[1].split("\n")[0]] for p in prompts]

    monkeypatch.setattr(evaluate, "generate", fake_generate)
    write_csv(tmp_path / "mmlu" / "test" / "anatomy_test.csv", [TEST_ROW, DEV[0]])
    tokenizer = _PlainTokenizer()
    args = argparse.Namespace(limit=None, max_seq_len=256, max_new_tokens=7, batch_size=2, compile=False)
    prepared = evaluate.prepare_mmlu_generated(tmp_path / "mmlu", tokenizer, 0, args)
    result, records = evaluate.run_mmlu_generated(None, tokenizer, None, "base", prepared, args)
    assert calls and all(c["stop"] == ["\n"] and c["max_new_tokens"] == 7 for c in calls)
    assert [(r["gold"], r["output"], r["correct"]) for r in records] == [("4", "4.", True), ("7", "'7'", False)]
    assert result["questions"] == 0.5 and result["n"] == 2


class _PlainTokenizer:
    """One id per character, BOS 1: enough for prepare and run to pass prompts through."""
    bos_id = 1

    def encode(self, text, bos=True, eos=False):
        return [1] * bos + [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i > 1)


def test_mmlu_generate_prompt_is_alpaca_with_the_choices_as_a_python_list(tiny_ckpt, tmp_path):
    write_csv(tmp_path / "mmlu" / "test" / "anatomy_test.csv", [["Is it 'x'?", "it's x", "y", "z", "w", "A"]])
    results = evaluate.main(["mmlu", "--ckpt", str(tiny_ckpt), "--data", str(tmp_path / "mmlu"), "--scoring",
                             "generate", "--max-new-tokens", "6", "--max-seq-len", "256", "--out", str(tmp_path / "m")])
    (record,) = read_jsonl(tmp_path / "m" / "mmlu.jsonl")
    assert record["prompt"] == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nIs it 'x'?\n\n"
        "### Input:\n[\"it's x\", 'y', 'z', 'w']\n\n### Response:")
    model, tokenizer = load(tiny_ckpt, max_seq_len=256)
    ids = evaluate.encode_prompt(tokenizer, record["prompt"])
    (alone,) = evaluate.generate(model, tokenizer, [ids], max_new_tokens=6, stop=["\n"])
    assert record["output"] == alone and record["gold"] == "it's x"
    assert record["correct"] == evaluate.answer_matches(alone, "it's x")
    (result,) = results["mmlu"].values()
    assert result["info"]["scoring"] == "generate" and result["rows"]["base"]["questions"] == record["correct"]


@pytest.mark.parametrize("flag", [["--paper"], ["--shots", "1"]])
def test_generated_mmlu_answers_take_no_shots(flag, capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.run(evaluate.main, ["mmlu", "--scoring", "generate", *flag])
    assert stopped.value.code == 2 and "asks each question zero-shot" in capsys.readouterr().err
