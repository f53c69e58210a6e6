"""The prompt templates against their sources' exact text, and the token boundary between
prompt and response that training and generation share."""

import json

import pytest

import data
import llama

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
    pairs = data.read_sft(path)
    assert len(pairs) == len(records) == 5000
    assert [p.prompt for p in pairs] == [stanford_source(r) for r in records]
    assert [p.response for p in pairs] == [r["output"] for r in records]
    assert sum("### Input:" in p.prompt for p in pairs) == 1943  # records with a non-empty input
    assert all(p.prompt.endswith("### Response:") for p in pairs)


def test_training_puts_before_each_response_exactly_the_ids_generation_feeds(shared_data):
    """For every real Alpaca record: the example's tokens are the prompt's ids as generate.py
    encodes them (BOS first), then the response tokenized on its own, then EOS."""
    tok = llama.Tokenizer(shared_data / "llama-tokenizer" / "tokenizer.model")
    for pair in data.read_sft(shared_data / "alpaca" / "alpaca_5000.json"):
        example = data.encode_example(tok, pair.prompt, pair.response, 100_000)
        assert example.tokens[:example.loss_start] == tok.encode(pair.prompt, bos=True)
        assert example.tokens[example.loss_start:] == tok.sp.encode(pair.response) + [tok.eos_id]


def test_the_response_begins_with_a_word_start_after_the_colon(shared_data):
    """With LLaMA's tokenizer: "... ### Response:" then "▁The", not the "The" that tokenizing
    prompt + output as one string would give."""
    tok = llama.Tokenizer(shared_data / "llama-tokenizer" / "tokenizer.model")
    example = data.encode_example(tok, data.format_prompt("Name a bird."), "The robin.", 512)
    assert example.tokens[-8:] == [29937, 13291, 29901, 450, 696, 2109, 29889, 2]
    assert [tok.sp.id_to_piece(i) for i in example.tokens[-8:]] == [
        "#", "▁Response", ":", "▁The", "▁ro", "bin", ".", "</s>"]
    assert example.loss_start == len(example.tokens) - 5 and not example.truncated
    # the authors' formats end in a space, which is a piece of its own before the response's first
    beaver = data.encode_example(tok, data.format_prompt("How do I bake bread?", template="beaver"), "Mix flour.", 512)
    assert [tok.sp.id_to_piece(i) for i in beaver.tokens[beaver.loss_start - 3:]] == [
        "istant", "]", "▁", "▁Mix", "▁fl", "our", ".", "</s>"]


def test_prompt_tokens_carry_no_loss_unless_asked(tiny_ckpt):
    tok = llama.Tokenizer(tiny_ckpt.parent / "tokenizer.model")
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
    tok = llama.Tokenizer(tiny_ckpt.parent / "tokenizer.model")
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
    pairs = data.read_sft(path, template="metamath")
    assert pairs == [data.SFTPair("[|User|] What is 2 + 3? [|AI Assistant|] ", "5"),
                     data.SFTPair("Q: 2 + 3? A:", "5")]  # formatted records are used as they are
