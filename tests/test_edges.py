"""Behaviours at the edges that the docstrings promise, each pinned on a case where a
plausible mistake would show: two axes of one size told apart, exact equality against a
tolerance, n // 3 against rounding, whitespace around answers and prompts, and a found
`#### N` that is wrong.
"""

import json
import math
from argparse import Namespace
from pathlib import Path

import pytest
import torch

import evaluate
from analyze import layer_trend
from conftest import authors_aligner_state, lit_llama_adapter_state
from support.data import DEMO_DIR, encode_prompt, format_prompt
from generate import converse
from llama import ModelArgs
from support.formats import Tokenizer, lit_llama, read_aligner
from support.questions import BEAVER, LLM_JUDGE, VICUNA_EVAL, Question, answer_files, question_file

ARGS = ModelArgs(dim=64, n_layers=7, n_heads=4, n_kv_heads=4, vocab_size=1)  # 5 adapted layers from layer 2


# -----------------------------------------------------------------------------
# lit-llama files

def test_a_lit_llama_adapter_with_more_layers_than_tokens_keeps_each_layers_prefix():
    """3 tokens in each of 5 adapted layers: the prefix is (layers, N, dim), layer by layer, not
    one axis taken for the other."""
    state = lit_llama_adapter_state(ARGS, n_tokens=3)
    for args in (ARGS, None):  # with the model's shape, and from the file alone
        aligner = lit_llama.aligner_from_state(state, Path("adapter.pth"), args)
        assert aligner.layer_specific and aligner.n_tokens == 3
        assert tuple(aligner.prefix.shape) == (5, 3, 64)
        for i in range(2, 7):
            assert torch.equal(aligner.prefix[i - 2], state[f"transformer.h.{i}.attn.adapter_wte.weight"].float())
            assert torch.equal(aligner.gates[i - 2],
                               state[f"transformer.h.{i}.attn.gating_factor"].float().flatten())


def test_an_authors_aligner_whose_layer_copy_is_off_by_one_ulp_is_refused(tmp_path):
    """Every adapter_wte of the authors' layout must equal global_value_embedding exactly; a copy
    within any float tolerance of it is still another prefix."""
    state = {k: v.float() for k, v in authors_aligner_state(ARGS, n_tokens=2).items()}  # float32: a finer ulp
    key = "transformer.h.4.attn.adapter_wte.weight"
    copy = state[key].clone()
    copy[1, 7] = torch.nextafter(copy[1, 7], torch.tensor(math.inf, dtype=copy.dtype))
    assert torch.allclose(copy, state["global_value_embedding.weight"]) and not torch.equal(copy, state[key])
    state[key] = copy
    torch.save(state, tmp_path / "aligner.pth")
    with pytest.raises(ValueError, match=f"'{key}' differs from 'global_value_embedding.weight'"):
        read_aligner(tmp_path / "aligner.pth", ARGS)


# -----------------------------------------------------------------------------
# the layer trend's thirds (analyze.py gates): the first and last n // 3 adapted layers

@pytest.mark.parametrize("n, bottom_layers, top_layers, bottom_std, top_std", [
    (5, [2, 2], [6, 6], 1.0, 5.0),  # 5 // 3 = 1, where round(5 / 3) = 2
    (8, [2, 3], [8, 9], 1.5, 7.5),  # 8 // 3 = 2, round(8 / 3) = 3
    (38, [2, 13], [28, 39], 6.5, 32.5),  # LLaMA-2-13B's 40 layers from layer 2: 38 // 3 = 12, round(38 / 3) = 13
])
def test_the_layer_trend_takes_the_first_and_last_n_floor_3_layers(n, bottom_layers, top_layers, bottom_std,
                                                                     top_std):
    layers = list(range(2, 2 + n))
    std = [float(k + 1) for k in range(n)]  # 1, 2, ..., n: a third's mean tells how many layers it took
    trend = layer_trend(layers, std)
    assert trend.bottom_layers == bottom_layers and trend.top_layers == top_layers
    assert trend.bottom_std == bottom_std and trend.top_std == top_std
    assert trend.ratio == top_std / bottom_std and trend.rises


# -----------------------------------------------------------------------------
# whitespace in the judge's files and in prompts

def test_answer_records_hold_the_answer_stripped_of_surrounding_whitespace():
    """Both answer formats hold the generated text stripped, as FastChat's gen_model_answer.py
    strips its own: a trailing newline or leading spaces never reach the judge."""
    answers = [[[" Paris is the capital.\n", "\tIt lies on the Seine. \n\n"]]]
    mt = Question(("Capital of France?", "Its river?"), "", "q", 81, "writing", LLM_JUDGE)
    (record,) = [json.loads(line) for text in answer_files("d", [mt], ["m"], answers).values()
                 for line in text.splitlines()]
    assert record["choices"][0]["turns"] == ["Paris is the capital.", "It lies on the Seine."]
    old = Question(("Capital of France?",), "", "q", 1, "generic", VICUNA_EVAL)
    (text,) = answer_files("d", [old], ["m"], [[[" Paris.\n"]]]).values()
    assert json.loads(text)["text"] == "Paris."


def test_questions_out_writes_an_input_after_its_first_turn_with_a_blank_line():
    with_input = Question(("Summarize the text.",), "The text is short.", "q", 1, "", BEAVER)
    without = Question(("Name a bird.",), "", "q", 2, "", BEAVER)
    lines = question_file([with_input, without]).splitlines()
    assert lines == ['{"question_id": 1, "category": "", "turns": ["Summarize the text.\\n\\nThe text is short."]}',
                     '{"question_id": 2, "category": "", "turns": ["Name a bird."]}']


def test_the_second_turn_prompt_holds_the_first_answer_stripped():
    """MT-bench's second turn is prompted with the first turn's prompt, one space, the first
    answer without its surrounding whitespace, a blank line, then the new turn in the template."""
    question = Question(("Capital of France?", "And of Italy?"), "", "q", 81, "", LLM_JUDGE)
    first_prompt = format_prompt("Capital of France?")
    seen = []

    def answer(texts, aligners):
        seen.extend(texts)
        return ["\n  Paris.\n\n" if len(seen) == 1 else "Rome."] * len(texts)

    converse([question], [first_prompt], [None], "alpaca", lambda texts, sources: texts, answer)
    assert seen[1] == ("Below is an instruction that describes a task. Write a response that appropriately "
                       "completes the request.\n\n### Instruction:\nCapital of France?\n\n### Response: Paris.\n\n"
                       "Below is an instruction that describes a task. Write a response that appropriately "
                       "completes the request.\n\n### Instruction:\nAnd of Italy?\n\n### Response:")


@pytest.mark.parametrize("ending", ["\n", "\t", " \n", "\n\t"])
def test_a_prompt_keeps_a_final_newline_or_tab_and_drops_only_trailing_spaces(ending):
    tokenizer = Tokenizer(DEMO_DIR / "tokenizer.model")  # keeps whitespace as it is, as LLaMA's does
    prompt = "Question: two plus three?" + ending
    assert encode_prompt(tokenizer, prompt) == tokenizer.encode(prompt, bos=True)
    assert encode_prompt(tokenizer, prompt) != tokenizer.encode(prompt.rstrip(), bos=True)
    assert encode_prompt(tokenizer, prompt + "  ") == encode_prompt(tokenizer, prompt)


# -----------------------------------------------------------------------------
# GSM8K: an answer in the #### form with the wrong number is found, not correct

def test_gsm8k_counts_a_wrong_number_in_the_form_as_found_but_not_correct(monkeypatch):
    gold = "Natalia sold 48 + 24 = 72 clips.\n#### 72"
    outputs = ["She sold 72 clips.\n#### 72", "She sold 70 clips.\n#### 70", "She sold 72 clips."]
    items = [evaluate.GenerationItem(f"Question: {k}\nAnswer:", [1, 2], gold, 0, 0) for k in range(3)]
    monkeypatch.setattr(evaluate, "generate_all", lambda *a, **k: outputs)
    args = Namespace(batch_size=4, max_new_tokens=8, compile=False)
    row, records = evaluate.run_gsm8k(None, None, None, "base", evaluate.Prepared(items, {}), args)
    assert row["strict"] == 1 / 3  # the right number, in the form
    assert row["strict_found"] == 2 / 3  # the form, right or wrong
    assert row["flexible"] == 2 / 3  # the last number, form or none
    assert [r["strict_correct"] for r in records] == [True, False, False]
    assert [r["strict"] for r in records] == ["72", "70", "[invalid]"]
