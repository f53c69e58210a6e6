"""evaluate.py: GSM8K extraction and prompts, MMLU files, prompts, letter scores and
aggregation, QA exact match, and the command line end to end on a tiny checkpoint."""

import argparse
import csv
import json
import random

import pytest
import torch
from hypothesis import given, settings, strategies as st

import evaluate
from aligner import Aligner
from data import format_prompt
from evaluate import (CATEGORIES, SUBJECT_CATEGORY, aggregate, continuation_logprobs, extract_flexible,
                      extract_strict, gold_answer, gsm8k_prompt, letter_continuations, mmlu_prompt,
                      mmlu_subjects, read_mmlu_csv)
from llama import Tokenizer, load

# -----------------------------------------------------------------------------
# GSM8K answer extraction


@st.composite
def written_number(draw, dollar=True):
    """(the number as a model might write it, the string both sides normalize to)."""
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
def test_flexible_takes_the_last_number(parts):
    text = " ".join(p if isinstance(p, str) else p[0] for p in parts)
    numbers = [p[1] for p in parts if not isinstance(p, str)]
    assert extract_flexible(text) == (numbers[-1] if numbers else None)


@settings(max_examples=200, deadline=None)
@given(before=st.lists(st.one_of(WORDS, written_number()), max_size=6), answer=written_number(dollar=False),
       after=st.lists(st.one_of(WORDS, written_number()), max_size=6))
def test_strict_takes_the_number_after_the_first_hashes(before, answer, after):
    words = lambda parts: " ".join(p if isinstance(p, str) else p[0] for p in parts)
    text = f"{words(before)}\n#### {answer[0]} {words(after)}\n#### 99999999"
    assert extract_strict(text) == answer[1]


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_extractors_never_crash(text):
    for extract in (extract_strict, extract_flexible):
        assert extract(text) is None or isinstance(extract(text), str)


@pytest.mark.parametrize("text, strict, flexible", [
    ("She pays $1,234.56.", None, "1234.56"),
    ("#### $18", None, "18"),  # the harness's strict regex takes no dollar sign
    ("5 - 3 = 2\n#### 2.", "2", "2"),
    ("It drops to -4 degrees, then 7 ...", None, "7"),  # a run of dots is not a number
    ("#### -2,125", "-2125", "-2125"),
    ("no number at all", None, None),
    ("", None, None),
])
def test_extraction_on_tricky_strings(text, strict, flexible):
    assert (extract_strict(text), extract_flexible(text)) == (strict, flexible)


def test_gold_answer_is_what_follows_the_last_hashes():
    assert gold_answer("She has 2,000 + 125 = <<2000+125=2125>>2,125.\n#### 2,125") == "2125"
    assert gold_answer("no final line") is None
    assert extract_strict("the model rambles") != gold_answer("#### 3")  # a missing answer is simply wrong


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


def test_mmlu_prompt_with_two_shots_is_exact():
    assert mmlu_prompt("abstract_algebra", [tuple(r) for r in DEV[:2]], tuple(TEST_ROW)) == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "Which is a prime?\nA. 4\nB. 6\nC. 7\nD. 9\nAnswer: C\n\n"
        "Statement 1 | x, y.\nStatement 2 | \"z\".\nA. True, True\nB. False, False\nC. True, False\n"
        "D. False, True\nAnswer: B\n\n"
        "Find the order of the group, if any.\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:")


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


# -----------------------------------------------------------------------------
# the command line, end to end


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


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
        elif task == "mmlu":
            assert len(base) == 4 and result["info"]["letters_single_token"] + \
                result["info"]["letters_multi_token"] == 4
            for p in base:
                assert p["pred"] == "ABCD"[max(range(4), key=p["logprobs"].__getitem__)]
            assert rows["base"]["questions"] == sum(p["correct"] for p in base) / 4
            assert set(rows["base"]["categories"]) == {"STEM", "humanities"}


def test_gsm8k_shots_are_a_seeded_draw_per_item(tiny_ckpt, tmp_path):
    train = [{"question": f"Q{i}?", "answer": f"#### {i}"} for i in range(20)]
    test = [{"question": f"T{i}?", "answer": f"#### {i}"} for i in range(3)]
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "test.jsonl", test)
    tokenizer = Tokenizer(tiny_ckpt.parent / "tokenizer.model")
    args = argparse.Namespace(limit=None, alpaca=False, seed=7, max_seq_len=4096,
                                                          max_new_tokens=16)
    items, golds, prompts, info = evaluate.prepare_gsm8k(tmp_path / "test.jsonl", tokenizer, 3, args)
    rng = random.Random(7)
    want = [tokenizer.encode(gsm8k_prompt(t["question"], rng.sample(train, 3)), bos=True) for t in test]
    assert prompts == want and golds == ["0", "1", "2"] and info["shots_dropped"] == 0


def test_alpaca_gsm8k_is_the_bare_question_in_the_template_zero_shot(tiny_ckpt, tmp_path):
    write_jsonl(tmp_path / "test.jsonl", [{"question": JANET, "answer": "#### 18"}])
    tokenizer = Tokenizer(tiny_ckpt.parent / "tokenizer.model")
    args = argparse.Namespace(limit=None, alpaca=True, seed=0, max_seq_len=4096, max_new_tokens=16)
    _, _, prompts, info = evaluate.prepare_gsm8k(tmp_path / "test.jsonl", tokenizer, 8, args)
    assert prompts == [tokenizer.encode(format_prompt(JANET), bos=True)] and info["shots"] == 0


def test_a_prompt_too_long_for_the_context_drops_shots_from_the_end(tiny_ckpt, tmp_path):
    write_csv(tmp_path / "mmlu" / "dev" / "anatomy_dev.csv", DEV)
    write_csv(tmp_path / "mmlu" / "test" / "anatomy_test.csv", [TEST_ROW])
    tokenizer = Tokenizer(tiny_ckpt.parent / "tokenizer.model")

    def with_shots(k):
        prompt = mmlu_prompt("anatomy", [tuple(r) for r in DEV[:k]], tuple(TEST_ROW))
        ((context, continuations),) = letter_continuations(tokenizer, [prompt])
        return context, len(context) + max(map(len, continuations)) - 1  # the longest row it makes

    (two, fits), (zero, smallest) = with_shots(2), with_shots(0)
    items, info = evaluate.prepare_mmlu(tmp_path / "mmlu", tokenizer, 3,
                                        argparse.Namespace(limit=None, max_seq_len=fits))
    assert info["shots_dropped"] == 1 and info["prompts_cut"] == 0 and items[0][1] == two
    items, info = evaluate.prepare_mmlu(tmp_path / "mmlu", tokenizer, 3,
                                        argparse.Namespace(limit=None, max_seq_len=smallest - 5))
    assert info["shots_dropped"] == 3 and info["prompts_cut"] == 1
    assert items[0][1] == zero[:1] + zero[6:]  # BOS kept, the oldest tokens cut


def test_without_the_demo_the_cli_says_how_to_build_it(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "DEMO_CKPT", tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="build_demo.py"):
        evaluate.main([])


# -----------------------------------------------------------------------------
# the real files


@pytest.mark.parametrize("split, n", [("test", 1319), ("train", 7473)])
def test_every_real_gsm8k_gold_answer_scores_through_both_extractors(shared_data, split, n):
    records = [json.loads(line) for line in (shared_data / "gsm8k" / f"{split}.jsonl").read_text().splitlines()]
    assert len(records) == n
    for r in records:
        gold = gold_answer(r["answer"])
        assert gold is not None and gold.lstrip("-").isdigit()
        assert extract_strict(r["answer"]) == gold and extract_flexible(r["answer"]) == gold


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
