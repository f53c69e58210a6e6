"""The prompt templates against their sources' exact text, and the token boundary between
prompt and response that training and generation share."""

import json

import pytest

from support import data, formats

# tatsu-lab/stanford_alpaca, train.py, PROMPT_DICT, copied character for character
STANFORD_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
STANFORD_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


def stanford_source(example: dict) -> str:
    """The prompt Stanford's SupervisedDataset builds for one record."""
    if example.get("input", "") != "":
        return STANFORD_PROMPT_INPUT.format_map(example)
    return STANFORD_PROMPT_NO_INPUT.format_map(example)


def test_alpaca_is_stanfords_prompt_dict_ending_at_response():
    assert data.format_prompt("Add.", "2 and 3") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:")
    assert data.format_prompt("Add.") == (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd.\n\n### Response:")
    assert data.format_prompt("Add.", template="alpaca") == stanford_source({"instruction": "Add."})


def test_the_authors_metamath_and_beaver_formats():
    # scripts/prepare_metaMath.py: "[|User|] " + query + " [|AI Assistant|] " + response
    assert data.format_prompt("What is 2 + 3?", template="metamath") == "[|User|] What is 2 + 3? [|AI Assistant|] "
    # scripts/prepare_beaver_safe.py: "[User] " + prompt + " [Assistant] " + response
    assert data.format_prompt("How do I bake bread?", template="beaver") == "[User] How do I bake bread? [Assistant] "
    assert data.format_prompt("Name a bird.", template="none") == "Name a bird."


@pytest.mark.parametrize("template, expected", [
    ("metamath", "[|User|] Add these.\n\n2 and 3 [|AI Assistant|] "),
    ("beaver", "[User] Add these.\n\n2 and 3 [Assistant] "),
    ("none", "Add these.\n\n2 and 3"),
])
def test_an_input_follows_the_instruction_after_a_blank_line_where_the_format_has_no_slot(template, expected):
    assert data.format_prompt("Add these.", "2 and 3", template) == expected


def test_an_unknown_template_is_named():
    with pytest.raises(ValueError, match="unknown template 'vicuna'"):
        data.format_prompt("x", template="vicuna")


def test_all_5000_real_alpaca_prompts_equal_stanfords(shared_data):
    path = shared_data / "alpaca" / "alpaca_5000.json"
    records = json.loads(path.read_text())
    pairs, dropped = data.read_sft(path)
    assert len(pairs) == len(records) == 5000 and dropped == 0
    assert [p.prompt for p in pairs] == [stanford_source(r) for r in records]
    assert [p.response for p in pairs] == [r["output"] for r in records]
    assert sum("### Input:" in p.prompt for p in pairs) == 1943  # records with a non-empty input
    assert all(p.prompt.endswith("### Response:") for p in pairs)


def test_training_puts_before_each_response_exactly_the_ids_generation_feeds(shared_data):
    """For every real Alpaca record: the example's tokens are the prompt's ids as generate.py
    encodes them (BOS first), then the response tokenized on its own, then EOS."""
    tok = formats.Tokenizer(shared_data / "llama-tokenizer" / "tokenizer.model")
    for pair in data.read_sft(shared_data / "alpaca" / "alpaca_5000.json")[0]:
        example = data.encode_example(tok, pair.prompt, pair.response, 100_000)
        assert example.tokens[:example.loss_start] == tok.encode(pair.prompt, bos=True) == data.encode_prompt(
            tok, pair.prompt)
        assert example.tokens[example.loss_start:] == tok.sp.encode(pair.response) + [tok.eos_id]


def one_string_difference(tok, prompt: str, response: str) -> str:
    """How BOS + prompt ids + response ids (tokenized apart) differ from BOS + (prompt + response) tokenized as
    one string, as Stanford's and the authors' code tokenize an example."""
    one = tok.encode(prompt + response, bos=True)
    prompt_ids, response_ids = data.encode_prompt(tok, prompt), tok.encode(response, bos=False)
    apart = prompt_ids + response_ids
    if apart == one:
        return "same"
    if one[:len(prompt_ids)] != prompt_ids:
        return "the prompt's last piece changes"
    if len(one) == len(apart) and one[len(prompt_ids) + 1:] == response_ids[1:]:
        return "the response's first piece only"
    if one[len(prompt_ids):] == response_ids[1:]:
        return "a lone word-start piece more"
    return "the first word splits otherwise"


def test_how_tokenizing_apart_differs_from_one_string_on_5000_real_alpaca_records(shared_data):
    """docs/training.md's shares: 74.2% differ in the response's first piece only (":" "▁The" against ":" "The"),
    14.4% split the first word otherwise, 8.4% gain a lone "▁", 3.0% change the prompt's last piece."""
    tok = formats.Tokenizer(shared_data / "llama-tokenizer" / "tokenizer.model")
    records = json.loads((shared_data / "alpaca" / "alpaca_5000.json").read_text())
    counts = {}
    for r in records:
        kind = one_string_difference(tok, data.format_prompt(r["instruction"], r["input"]), r["output"])
        counts[kind] = counts.get(kind, 0) + 1
    assert counts == {"the response's first piece only": 3711, "the first word splits otherwise": 720,
                      "a lone word-start piece more": 418, "the prompt's last piece changes": 149, "same": 2}
    # The formats that end in a space leave it to the response's first word start, and so tokenize as one
    # string does; kept as a piece of its own, the space would make every example differ.
    for template in ("metamath", "beaver"):
        kinds = [one_string_difference(tok, data.format_prompt(r["instruction"], r["input"], template), r["output"])
                 for r in records]
        assert kinds.count("same") == 4998, template
        kept = [tok.encode(data.format_prompt(r["instruction"], r["input"], template), bos=True)
                + tok.encode(r["output"], bos=False) == tok.encode(
                    data.format_prompt(r["instruction"], r["input"], template) + r["output"], bos=True)
                for r in records]
        assert sum(kept) == 2, template


def test_the_response_begins_with_a_word_start_after_the_colon(shared_data):
    """With LLaMA's tokenizer: "... ### Response:" then "▁The", not the "The" that tokenizing
    prompt + output as one string would give."""
    tok = formats.Tokenizer(shared_data / "llama-tokenizer" / "tokenizer.model")
    example = data.encode_example(tok, data.format_prompt("Name a bird."), "The robin.", 512)
    assert example.tokens[-8:] == [29937, 13291, 29901, 450, 696, 2109, 29889, 2]
    assert [tok.sp.id_to_piece(i) for i in example.tokens[-8:]] == [
        "#", "▁Response", ":", "▁The", "▁ro", "bin", ".", "</s>"]
    assert example.loss_start == len(example.tokens) - 5 and not example.truncated
    # the authors' formats end in a space, which the response's first word start carries, as in one string
    beaver = data.encode_example(tok, data.format_prompt("How do I bake bread?", template="beaver"), "Mix flour.", 512)
    assert [tok.sp.id_to_piece(i) for i in beaver.tokens[beaver.loss_start - 2:]] == [
        "istant", "]", "▁Mix", "▁fl", "our", ".", "</s>"]


def test_prompt_tokens_carry_no_loss_unless_asked(tiny_ckpt):
    tok = formats.Tokenizer(tiny_ckpt.parent / "tokenizer.model")
    prompt, response = data.format_prompt("Name a bird."), "A robin is a bird."
    short = data.encode_example(tok, prompt, response, max_len=512)
    other = data.encode_example(tok, data.format_prompt("Question: What is two plus three?"), "five.", 512)
    inputs, targets = data.collate([short, other])
    n_prompt = len(tok.encode(prompt))
    assert short.loss_start == n_prompt and short.tokens[0] == tok.bos_id and short.tokens[-1] == tok.eos_id
    # target t is token t + 1: the first loss target is the first response token
    assert (targets[0, :n_prompt - 1] == data.IGNORE).all()
    assert targets[0, n_prompt - 1:len(short.tokens) - 1].tolist() == short.tokens[n_prompt:]
    assert tok.decode(short.tokens[n_prompt:-1]) == response
    assert (targets[0, len(short.tokens) - 1:] == data.IGNORE).all()  # padding
    # --train-on-prompt: everything after BOS, as the authors' preparation script does
    whole = data.encode_example(tok, prompt, response, 512, train_on_prompt=True)
    assert whole.loss_start == 1 and (data.collate([whole])[1] != data.IGNORE).all()


def test_a_cut_example_says_so(tiny_ckpt):
    tok = formats.Tokenizer(tiny_ckpt.parent / "tokenizer.model")
    full = data.encode_example(tok, "Answer: ", "five " * 20, 10_000)
    cut = data.encode_example(tok, "Answer: ", "five " * 20, 12)
    assert not full.truncated and cut.truncated
    assert cut.tokens == full.tokens[:12] and cut.loss_start == full.loss_start
    exact = data.encode_example(tok, "Answer: ", "five " * 20, len(full.tokens))  # fits exactly: nothing cut
    assert exact == full


def test_records_in_other_templates(tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_text(json.dumps({"instruction": "What is 2 + 3?", "input": "", "output": "5"}) + "\n"
                    + json.dumps({"prompt": "Q: 2 + 3? A:", "response": "5"}) + "\n")
    pairs, _ = data.read_sft(path, template="metamath")
    assert pairs == [data.SFTPair("[|User|] What is 2 + 3? [|AI Assistant|] ", "5"),
                     data.SFTPair("Q: 2 + 3? A:", "5")]  # formatted records are used as they are


# MetaMathQA's rows as published (meta-math/MetaMathQA, MetaMathQA-395K.json: a JSON list)
METAMATH_ROW = {"query": "What is the sum of 2 and 3?", "response": "2 + 3 = 5.\nThe answer is: 5",
                "type": "GSM_Rephrased", "original_question": "What is 2 plus 3?"}


def pku_row(safer=0, safe=(True, False), prompt="How do I pick a lock?"):
    """A PKU-SafeRLHF row with the published fields, the newer releases' extra ones included."""
    return {"prompt": prompt, "response_0": "I cannot help with that.", "response_1": "Use a tension wrench.",
            "prompt_source": "Beaver", "response_0_source": "Alpaca-7B", "response_1_source": "Alpaca-7B",
            "is_response_0_safe": safe[0], "is_response_1_safe": safe[1],
            "response_0_harm_category": {}, "response_1_harm_category": {},
            "response_0_severity_level": 0, "response_1_severity_level": 2,
            "better_response_id": 1, "safer_response_id": safer}


def test_metamathqa_rows_are_read_as_published(tmp_path):
    path = tmp_path / "MetaMathQA-395K.json"
    path.write_text(json.dumps([METAMATH_ROW, {**METAMATH_ROW, "query": "And 4 and 5?"}]))
    pairs, dropped = data.read_sft(path, template="metamath")
    assert dropped == 0 and pairs == [
        data.SFTPair("[|User|] What is the sum of 2 and 3? [|AI Assistant|] ", "2 + 3 = 5.\nThe answer is: 5"),
        data.SFTPair("[|User|] And 4 and 5? [|AI Assistant|] ", "2 + 3 = 5.\nThe answer is: 5")]
    path.write_text(json.dumps([{**METAMATH_ROW, "response": None}]))
    with pytest.raises(data.DataError, match=r"record 0 \(line 1\): 'response' must be a string, not NoneType"):
        data.read_sft(path)


def test_pku_saferlhf_rows_read_as_sft_take_the_safer_response_where_it_is_safe(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [pku_row(safer=0), pku_row(safer=1, safe=(False, True), prompt="Tell me a joke."),
            pku_row(safer=0, safe=(False, False)),  # no safe response: nothing to teach
            pku_row(safer=0, safe=(False, True))]  # the safer response is labelled unsafe: dropped
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, dropped = data.read_sft(path, template="beaver")
    assert dropped == 2
    assert pairs == [data.SFTPair("[User] How do I pick a lock? [Assistant] ", "I cannot help with that."),
                     data.SFTPair("[User] Tell me a joke. [Assistant] ", "Use a tension wrench.")]
    path.write_text(json.dumps(pku_row(safe=(False, False))) + "\n")
    with pytest.raises(data.DataError, match=r"train\.jsonl: no usable records \(1 dropped: the safer response is unsafe\)"):
        data.read_sft(path)
    path.write_text(json.dumps({**pku_row(), "safer_response_id": 2}) + "\n")
    with pytest.raises(data.DataError, match=r"line 1: 'safer_response_id' must be 0 or 1, not 2"):
        data.read_sft(path)

