"""
Data: the prompt templates, the built-in demo's paths, reading training files, examples into tokens.

What the scripts share about data: the prompt templates, where the built-in
demo lives, reading the training files, and turning examples into tokens.

Templates (`--template`), each taken byte for byte from its source:
- alpaca: Stanford Alpaca's two PROMPT_DICT strings (tatsu-lab/stanford_alpaca,
  train.py), ending at "### Response:" with nothing after it. The Aligner
  authors' generate_prompt (scripts/prepare_alpaca.py) is the same text.
- metamath: "[|User|] {instruction} [|AI Assistant|] ", the authors'
  scripts/prepare_metaMath.py (their generate script calls it "orca").
- beaver: "[User] {instruction} [Assistant] ", the authors'
  scripts/prepare_beaver_safe.py for PKU-SafeRLHF.
- none: the instruction as it is.
A template without an input slot (all but alpaca's second string) puts a
non-empty input after the instruction, separated by a blank line. Training,
generation and evaluation all format prompts through `format_prompt`.

Files, a JSON list or JSON Lines. For SFT: Alpaca's {"instruction", "input",
"output"}; MetaMathQA's {"query", "response", "type", "original_question"};
PKU-SafeRLHF's own rows, whose safer response is the target where it is itself
safe (see `read_sft`); or already formatted
{"prompt", "response"}. For DPO: PKU-SafeRLHF's rows or {"prompt", "chosen",
"rejected"}. A bad record stops the run with its file and line.

An example is BOS + prompt + response + EOS, with the prompt and the response
tokenized apart and their ids joined (`encode_example`), so the prompt's ids
are exactly those that generation feeds the model for the same prompt
(`encode_prompt`). Stanford's and the authors' code instead tokenize
prompt + output as one string. The two differ where SentencePiece would let
the prompt's end and the response's start share or split pieces: the
response's first piece carries the word-start marker ("### Response:" then
"▁The", where one string gives "The"), and more rarely its first word splits
otherwise, it gains a lone "▁", or the prompt's last piece changes (docs/training.md
has the shares on real Alpaca records). A prompt's trailing spaces are left to
the response: SentencePiece writes a space as the "▁" that starts the next
word, so "[Assistant] " + "The" is "]" "▁The" in one string, while the space
tokenized alone would end every prompt in a lone "▁" piece that one-string
text never has. So the metamath and beaver formats, which end in a space,
tokenize as one string does. The loss covers the response only, as Stanford's
train.py does (it masks the prompt); `train_on_prompt` puts it on every token
after BOS, as the authors' preparation scripts do (mask_inputs=False).
"""

import json
from pathlib import Path
from typing import NamedTuple

import torch

from support.files import read_text

DEMO_DIR = Path(__file__).resolve().parents[1] / "demo"
DEMO_CKPT = DEMO_DIR / "llama-demo"  # Meta layout; demo/tokenizer.model lies beside it
DEMO_DATA = DEMO_DIR / "data"


class Template(NamedTuple):
    """A prompt format: one string, or two where an input has a slot of its own."""
    no_input: str
    with_input: str = None  # None: the input follows the instruction after a blank line


TEMPLATES = {
    "alpaca": Template(
        no_input=("Below is an instruction that describes a task. "
                  "Write a response that appropriately completes the request.\n\n"
                  "### Instruction:\n{instruction}\n\n### Response:"),
        with_input=("Below is an instruction that describes a task, paired with an input that provides further "
                    "context. Write a response that appropriately completes the request.\n\n"
                    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")),
    "metamath": Template("[|User|] {instruction} [|AI Assistant|] "),
    "beaver": Template("[User] {instruction} [Assistant] "),
    "none": Template("{instruction}"),
}


def format_prompt(instruction: str, input: str = "", template: str = "alpaca") -> str:
    """The prompt in one of TEMPLATES; the response follows it directly."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
    t = TEMPLATES[template]
    if not input:
        return t.no_input.format(instruction=instruction)
    if t.with_input is not None:
        return t.with_input.format(instruction=instruction, input=input)
    return t.no_input.format(instruction=f"{instruction}\n\n{input}")


# -----------------------------------------------------------------------------
# reading records: a JSON list (Alpaca's file) or JSON Lines, each record with
# the place it came from, so that a bad one is reported by its line

class DataError(ValueError):
    """A data file the scripts cannot use; the message names the file and the line."""


def read_records(path) -> list:
    """[(where, record)] from a JSON list or a JSON Lines file; `where` reads 'line 12' or 'record 3 (line 9)'."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no data file here")
    text = read_text(path, "data file")
    start = len(text) - len(text.lstrip())
    if text[start:start + 1] == "[":
        return _json_list(path, text, start)
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"line {lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {lineno}: not valid JSON ({e.msg}); "
                            "expected one JSON object per line, or one JSON list") from None
    return records


def _json_list(path, text, pos) -> list:
    """Walk a JSON list element by element, so each record keeps the line it starts on."""
    decoder = json.JSONDecoder()
    records = []
    pos += 1  # past "["

    def skip_space(pos):
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    counted = [0, 1]  # (offset, line there): lines are counted forward only, once

    def line_at(pos):
        counted[1] += text.count("\n", counted[0], pos)
        counted[0] = pos
        return counted[1]

    def fail(pos, what):
        raise DataError(f"{path}, record {len(records)} (line {line_at(pos)}): {what}")

    pos = skip_space(pos)
    if text[pos:pos + 1] == "]":
        return records
    while True:
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            fail(e.pos, f"not valid JSON ({e.msg})")
        records.append((f"record {len(records)} (line {line_at(pos)})", record))
        pos = skip_space(end)
        if text[pos:pos + 1] == "]":
            break
        if text[pos:pos + 1] != ",":
            fail(pos, "expected ',' or ']' after this record")
        pos = skip_space(pos + 1)
    if text[pos + 1:].strip():
        fail(pos + 1, "unexpected text after the closing ']'")
    return records


def string_fields(path, where, record, required, optional=()) -> dict:
    """The record's string fields, or a DataError that says which key is wrong."""
    if not isinstance(record, dict):
        raise DataError(f"{path}, {where}: expected a JSON object, got {type(record).__name__}")
    out = {}
    for key in (*required, *optional):
        if key not in record:
            if key in optional:
                out[key] = ""
                continue
            raise DataError(f"{path}, {where}: missing key {key!r} (the record has {sorted(record)})")
        if not isinstance(record[key], str):
            raise DataError(f"{path}, {where}: {key!r} must be a string, not {type(record[key]).__name__}")
        out[key] = record[key]
    return out


class SFTPair(NamedTuple):
    prompt: str  # the exact text the model sees before the response
    response: str


class Preference(NamedTuple):
    prompt: str
    chosen: str
    rejected: str


PKU_KEYS = ("prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe",
            "safer_response_id", "better_response_id")
METAMATH_KEYS = ("query", "response")  # MetaMathQA's rows also carry "type" and "original_question"


class PKURow(NamedTuple):
    """One PKU-SafeRLHF row, read: its prompt and the response `pair` prefers, and the other one."""
    prompt: str
    chosen: str
    rejected: str
    chosen_safe: bool


def pku_row(path, where, record, pair: str) -> PKURow:
    """A PKU-SafeRLHF row checked key by key; `pair` ("safer" or "better") names the id of the chosen response."""
    r = string_fields(path, where, record, ("prompt", "response_0", "response_1"))
    for key in PKU_KEYS[3:5]:
        if not isinstance(record.get(key), bool):
            raise DataError(f"{path}, {where}: {key!r} must be true or false, not {record.get(key)!r}")
    for key in PKU_KEYS[5:]:
        if record.get(key) not in (0, 1) or isinstance(record.get(key), bool):
            raise DataError(f"{path}, {where}: {key!r} must be 0 or 1, not {record.get(key)!r}")
    chosen = record[f"{pair}_response_id"]
    return PKURow(r["prompt"], r[f"response_{chosen}"], r[f"response_{1 - chosen}"],
                  record[f"is_response_{chosen}_safe"])


def read_sft(path, template: str = "alpaca") -> tuple:
    """([SFTPair], n_dropped) from any of the SFT record kinds, told apart by their keys:

    - Alpaca's {"instruction", "input", "output"}: the prompt is format_prompt in `template`;
    - MetaMathQA's {"query", "response", ...}: the query in `template` (`metamath` is the
      authors' format for it, scripts/prepare_metaMath.py);
    - PKU-SafeRLHF's rows: the prompt in `template`, the safer response as the target. A row
      whose safer response is itself unsafe is dropped and counted, as train_dpo.py drops such
      pairs. The authors' Beaver SFT run (finetune/aligner.py, get_batch, on the rows that
      scripts/prepare_beaver_safe.py keeps with exist_safe) trains on the safer response of every
      row where either response is safe; the two differ only on rows whose labels disagree (the
      safer response unsafe, the other safe);
    - already formatted {"prompt", "response"}: used as they are.
    """
    pairs, dropped = [], 0
    for where, record in read_records(path):
        if not isinstance(record, dict):
            raise DataError(f"{path}, {where}: expected a JSON object, got {type(record).__name__}")
        if "response_0" in record:
            row = pku_row(path, where, record, "safer")
            if not row.chosen_safe:
                dropped += 1
                continue
            pairs.append(SFTPair(format_prompt(row.prompt, template=template), row.chosen))
        elif "query" in record:
            r = string_fields(path, where, record, METAMATH_KEYS)
            pairs.append(SFTPair(format_prompt(r["query"], template=template), r["response"]))
        elif "prompt" in record:
            r = string_fields(path, where, record, ("prompt", "response"))
            pairs.append(SFTPair(r["prompt"], r["response"]))
        elif "instruction" in record:
            r = string_fields(path, where, record, ("instruction", "output"), optional=("input",))
            pairs.append(SFTPair(format_prompt(r["instruction"], r["input"], template), r["output"]))
        else:
            raise DataError(f"{path}, {where}: expected the keys of Alpaca (instruction, input, output), "
                            f"MetaMathQA (query, response), PKU-SafeRLHF ({', '.join(PKU_KEYS)}) or "
                            f"prompt, response; the record has {sorted(record)}")
    if not pairs and dropped:
        raise DataError(f"{path}: no usable records ({dropped} dropped: the safer response is unsafe)")
    if not pairs:
        raise DataError(f"{path}: no records")
    return pairs, dropped


def read_preferences(path, pair="safer", keep_unsafe=False, template: str = "alpaca"):
    """([Preference], n_dropped) from preference rows.

    Either {"prompt", "chosen", "rejected"} (the prompt used as it is, as for
    SFT's {"prompt", "response"}), or PKU-SafeRLHF's own rows, whose prompt
    goes through format_prompt in `template`: `pair` names the id ("safer" or "better")
    that picks the chosen response. As the paper does (Appendix C), a PKU pair
    whose chosen response is not itself safe is dropped unless keep_unsafe.
    """
    if pair not in ("safer", "better"):
        raise ValueError(f"pair must be 'safer' or 'better', not {pair!r}")
    triples, dropped = [], 0
    for where, record in read_records(path):
        if isinstance(record, dict) and "chosen" in record:
            r = string_fields(path, where, record, ("prompt", "chosen", "rejected"))
            triples.append(Preference(r["prompt"], r["chosen"], r["rejected"]))
            continue
        if not isinstance(record, dict) or "response_0" not in record:
            raise DataError(f"{path}, {where}: expected keys prompt, chosen, rejected, or "
                            f"PKU-SafeRLHF's {', '.join(PKU_KEYS)}")
        row = pku_row(path, where, record, pair)
        if not keep_unsafe and not row.chosen_safe:
            dropped += 1
            continue
        triples.append(Preference(format_prompt(row.prompt, template=template), row.chosen, row.rejected))
    if not triples:
        raise DataError(f"{path}: no usable preference pairs ({dropped} dropped as unsafe)")
    return triples, dropped


# -----------------------------------------------------------------------------
# tokens: BOS + prompt + response + EOS, with the loss on the response

IGNORE = -100  # the target of a position that carries no loss (cross_entropy's ignore_index)


class Example(NamedTuple):
    """One tokenized example: the loss covers tokens[loss_start:], each predicted from those before."""
    tokens: list  # BOS, the prompt's ids, the response's ids, EOS (cut to max_len)
    loss_start: int
    truncated: bool  # cut to max_len, which drops the EOS and perhaps more


def encode_prompt(tokenizer, prompt: str) -> list:
    """BOS + the prompt's ids: what training puts before a response, and what generation feeds.

    The prompt's trailing spaces are left out: in one-string text SentencePiece writes them as
    the "▁" that starts the response's first word, and tokenized alone they would be a lone "▁"
    piece (see the module docstring).
    """
    return tokenizer.encode(prompt.rstrip(" "), bos=True)


def encode_example(tokenizer, prompt: str, response: str, max_len: int, train_on_prompt: bool = False) -> Example:
    """BOS + the prompt's ids + the response's ids + EOS, the two texts tokenized apart: the
    prompt's ids are exactly those generation feeds the model. Cut to max_len tokens."""
    prompt_ids = encode_prompt(tokenizer, prompt)
    tokens = prompt_ids + tokenizer.encode(response, bos=False, eos=True)
    loss_start = 1 if train_on_prompt else len(prompt_ids)
    return Example(tokens[:max_len], loss_start, len(tokens) > max_len)


def n_targets(example: Example) -> int:
    return max(0, len(example.tokens) - example.loss_start)


def collate(examples: list, pad_id: int = 0):
    """Right-pad Examples to the longest: inputs and targets, both (B, T - 1).

    Right padding needs no mask: causal attention never lets a real token see
    the padding after it, and padded positions have the IGNORE target.
    """
    seqlen = max(len(e.tokens) for e in examples)
    tokens = torch.full((len(examples), seqlen), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), seqlen), IGNORE, dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e.tokens)
        tokens[b, :n] = torch.tensor(e.tokens)
        labels[b, e.loss_start:n] = tokens[b, e.loss_start:n]
    return tokens[:, :-1], labels[:, 1:]  # position t predicts token t + 1


def check_demo(*paths):
    """Refuse, with the command that builds it, when the built-in demo is not there."""
    for path in paths:
        if not Path(path).exists():
            raise FileNotFoundError(f"{path} is missing: the built-in demo is not built; "
                                    "run `python -m support.build_demo` first (or pass --ckpt and --data)")
