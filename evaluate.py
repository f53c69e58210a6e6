r"""
Evaluate a LLaMA checkpoint, alone or with one or more Aligners side by side, on
GSM8K, MMLU, or exact-match QA.

    python evaluate.py                                   # the built-in demo: all three tasks
    python evaluate.py gsm8k --ckpt llama-2-7b --data gsm8k/test.jsonl --aligner aligner.pt
    python evaluate.py gsm8k --ckpt llama-2-7b --data gsm8k/test.jsonl --aligner aligner.pt --paper
    python evaluate.py mmlu --ckpt llama-2-7b --data mmlu --aligner base --aligner aligner.pt
    python evaluate.py qa --ckpt demo/llama-demo --data a.jsonl b.jsonl --out runs/eval
    python evaluate.py mmlu --ckpt llama-2-7b --data mmlu --paper --aligner runs/alpaca-lora/best.pt  # a LoRA

Protocols. The defaults are LLaMA-2's published setting (GSM8K 8 shots, MMLU
5), so that LLaMA-2-7B's 14.6 and 45.3 can be checked; --paper gives the
Aligner paper's shots, one each (Section 4.3). The Aligner paper's Experiment 3
scores GSM8K and MMLU without saying how; these follow lm-evaluation-harness
and the original MMLU release, and mmlu --scoring generate the authors' log.

- GSM8K, as the harness's `gsm8k` task (lm_eval/tasks/gsm8k/gsm8k.yaml):
  `--shots` examples drawn from train.jsonl beside the test file with
  random.Random(--seed).sample, a fresh draw for each test item in file order
  (the harness's default sampler; its seed is 1234); each shot
  `Question: {q}\nAnswer: {a}`, shots joined by a blank line, then
  `Question: {q}\nAnswer:`. Greedy decoding until one of the harness's stop
  strings, `Question:`, `</s>`, `<|im_end|>`, or EOS, at most 256 new tokens
  (--max-new-tokens). The harness's two filters: strict-match, the first
  match of `#### (\-?[0-9\.\,]+)`; flexible-extract, the last match of
  `(-?[$0-9.,]{2,})|(-?[0-9]+)` taken as it is (its first non-empty group);
  `[invalid]` where nothing matches. Its exact_match metric then removes `,`,
  `$`, everything up to the last `#### ` and a final `.` from both the
  prediction and the whole reference answer, lower-cases both, and compares.
  Also reported: the share of answers in which strict-match finds a
  `#### N` at all, right or wrong (the answer's form). With --template the bare question is put in that prompt format instead,
  zero-shot (for instruction-tuned models), with the same stops and filters.
- MMLU, as the original release's evaluate.py (hendrycks/test): the header
  `The following are multiple choice questions (with answers) about
  {subject}.` where the release's format_subject writes a space before each
  word of the subject, so two follow "about"; the first `--shots` rows of
  the subject's dev file, each `{q}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer: {x}\n\n`;
  then the test question ending in `Answer:`. The prediction is the letter
  whose " A" ... " D" has the highest log-likelihood after the prompt. With
  LLaMA's tokenizer each is one token, so this is one forward per question
  reading the next-token distribution at the last position; where a
  tokenizer splits a letter into several tokens, each letter's tokens are
  scored in full (one row per letter). Accuracy per subject, per category
  (the release's 57-subject map; a category pools its questions) and
  overall, both as the mean over questions and the mean over subjects.
  `--scoring generate` instead scores as the Aligner authors' MMLU log
  (the tenth .pth of their aligner_weights/, 68 JSON records) appears to:
  each test question zero-shot in Stanford Alpaca's prompt, the question as
  the instruction and its four choices as the input, written as Python
  writes a list (43 of the log's 68 model_answer fields are a choice exactly
  as repr() quotes it); greedy decoding up to the first line break; and the
  answer counted right where, stripped and without one final ".", it equals
  the right choice's text likewise (answer_matches; it reproduces all 68 of
  the log's is_model_correct). The prompt is ours: no script in the
  authors' repository formats one.
- QA: the question in --template (Stanford Alpaca's by default), greedy
  decoding until EOS, exact match of the stripped completion with the
  stripped reference; also the share of completions that start with the
  reference, whatever follows it (the right answer, said first, in any form).

With --out every per-item record holds `prompt`, the exact text given to the
model (as the harness's --log_samples does), and generation tasks their
`stop` strings.

Departures: a prompt longer than the context (--max-seq-len, 4096 by default,
less the tokens to generate) drops shots from its end until it fits, counted
in results.json and warned about (the original MMLU rule, which counts GPT-2
tokens against 2048; here used for GSM8K too, where the harness would cut
tokens from the left); if even zero shots do not fit, tokens after BOS are
cut from the left, and the record says how many. MMLU's CSV fields are read
as written: the release's pandas.read_csv turns the 10 test fields "None"
into "nan" under pandas 2 or later (pandas 1, of the release's time, kept
"None"), so under a recent pandas those 10 of its 14,042 prompts differ.
"""

import support.startup  # noqa: F401  first: Ctrl-C while torch loads ends in one line too (startup.py)

import argparse
import csv
import io
import json
import random
import re
import sys
from pathlib import Path
from typing import NamedTuple

import torch

import lora
from generate import generate
from support import cli, distributed
from support.data import (DEMO_CKPT, DEMO_DATA, TEMPLATES, DataError, check_demo, encode_prompt, format_prompt,
                          read_records, string_fields)
from support.files import atomic_write, check_writable, read_text, refuse_clashes, refuse_existing
from support.formats import check_adapter_files, check_context, checkpoint_inputs, load, read_adapter

TASKS = ("gsm8k", "mmlu", "qa")
LETTERS = ("A", "B", "C", "D")
LLAMA_2_SHOTS = {"gsm8k": 8, "mmlu": 5, "qa": 0}  # the LLaMA-2 paper's setting, the default
PAPER_SHOTS = {"gsm8k": 1, "mmlu": 1, "qa": 0}  # the Aligner paper's shots, Section 4.3 (--paper)

# -----------------------------------------------------------------------------
# GSM8K: the harness's stop strings, filters and metric (lm_eval/tasks/gsm8k/gsm8k.yaml)

GSM8K_STOP = ("Question:", "</s>", "<|im_end|>")  # `until`; EOS ends generation as well
STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")  # strict-match: the first match
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")  # flexible-extract: the last match (group_select -1)
FALLBACK = "[invalid]"  # what a filter gives where its regex finds nothing
IGNORED = (",", "\\$", "(?s).*#### ", "\\.$")  # exact_match's regexes_to_ignore, removed in this order


def regex_filter(text: str, pattern, group_select: int) -> str:
    """The harness's `regex` filter: match number `group_select` of findall, its first
    non-empty group where the pattern has several, stripped; FALLBACK where none."""
    matches = pattern.findall(text)
    if not matches:
        return FALLBACK
    match = matches[group_select]
    if isinstance(match, tuple):  # one string per group; the groups that did not take part are empty
        match = next((group for group in match if group), FALLBACK)
    return match.strip()


def extract_strict(text: str) -> str:
    return regex_filter(text, STRICT, 0)


def extract_flexible(text: str) -> str:
    """The last match as it is, even one that holds no digit ("..." after a number)."""
    return regex_filter(text, FLEXIBLE, -1)


def normalize(text: str) -> str:
    """What exact_match compares (ignore_case true, ignore_punctuation false)."""
    for pattern in IGNORED:
        text = re.sub(pattern, "", text)
    return text.lower()


def exact_match(prediction: str, reference: str) -> bool:
    """The harness's exact_match: both sides normalized; the reference is the whole answer."""
    return normalize(prediction) == normalize(reference)


def gsm8k_prompt(question: str, shots: list) -> str:
    """Each shot `Question: {q}\\nAnswer: {a}`, shots joined by a blank line, then the item."""
    blocks = [f"Question: {shot['question']}\nAnswer: {shot['answer']}" for shot in shots]
    blocks.append(f"Question: {question}\nAnswer:")
    return "\n\n".join(blocks)


# -----------------------------------------------------------------------------
# MMLU: the files, the prompt, the letter scores and their aggregation

# The original release's map from subject to category (its categories.py):
# STEM 18 subjects, humanities 13, social sciences 12, other 14.
CATEGORIES = {
    "STEM": """abstract_algebra astronomy college_biology college_chemistry college_computer_science
        college_mathematics college_physics computer_security conceptual_physics electrical_engineering
        elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science
        high_school_mathematics high_school_physics high_school_statistics machine_learning""",
    "humanities": """formal_logic high_school_european_history high_school_us_history high_school_world_history
        international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy
        prehistory professional_law world_religions""",
    "social sciences": """econometrics high_school_geography high_school_government_and_politics
        high_school_macroeconomics high_school_microeconomics high_school_psychology human_sexuality
        professional_psychology public_relations security_studies sociology us_foreign_policy""",
    "other": """anatomy business_ethics clinical_knowledge college_medicine global_facts human_aging management
        marketing medical_genetics miscellaneous nutrition professional_accounting professional_medicine
        virology""",
}
SUBJECT_CATEGORY = {subject: category for category, names in CATEGORIES.items() for subject in names.split()}


def read_mmlu_csv(path) -> list:
    """Rows (question, A, B, C, D, answer letter) of one `<subject>_<split>.csv`; no header.

    Fields are quoted and may span lines, so this is a CSV parser's job, not split(",").
    """
    rows = []
    with io.StringIO(read_text(path, "MMLU file"), newline="") as f:
        reader = csv.reader(f)
        for row in reader:
            if len(row) != 6:
                raise ValueError(f"{path}, line {reader.line_num}: {len(row)} fields; an MMLU row has 6 "
                                 "(question, A, B, C, D, answer letter)")
            if row[5].strip() not in LETTERS:
                raise ValueError(f"{path}, line {reader.line_num}: answer {row[5]!r} is not one of A, B, C, D")
            rows.append((*row[:5], row[5].strip()))
    return rows


def mmlu_subjects(folder, split="test") -> list:
    """The subjects with a `<split>/<subject>_<split>.csv` file, sorted."""
    split_dir = Path(folder) / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"{split_dir}: missing; an MMLU folder holds dev/ and test/ "
                                "of <subject>_<split>.csv files")
    subjects = sorted(p.name[:-len(f"_{split}.csv")] for p in split_dir.glob(f"*_{split}.csv"))
    if not subjects:
        raise FileNotFoundError(f"{split_dir}: no <subject>_{split}.csv files")
    return subjects


def mmlu_example(row, with_answer: bool) -> str:
    question, a, b, c, d, answer = row
    text = f"{question}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:"
    return text + f" {answer}\n\n" if with_answer else text


def format_subject(subject: str) -> str:
    """" abstract algebra" for abstract_algebra: the release puts a space before every word,
    so its header reads "about  abstract algebra." with two spaces."""
    return "".join(" " + word for word in subject.split("_"))


def mmlu_prompt(subject: str, shots: list, row) -> str:
    header = f"The following are multiple choice questions (with answers) about {format_subject(subject)}.\n\n"
    return header + "".join(mmlu_example(shot, True) for shot in shots) + mmlu_example(row, False)


def letter_continuations(tokenizer, prompts: list) -> list:
    """Per prompt: its tokens, and per letter the tokens that " A" ... " D" add after them.

    As the harness does: encode the prompt alone and the prompt with the
    letter, and take the second's tokens beyond the first's length. All
    strings go to SentencePiece in one call, which spreads them over the cores.
    """
    texts = list(prompts) + [p + " " + letter for letter in LETTERS for p in prompts]
    ids = [[tokenizer.bos_id] + t for t in tokenizer.sp.encode(texts)]
    out = []
    for i, prompt in enumerate(prompts):
        context = ids[i]
        continuations = [ids[len(prompts) * (1 + j) + i][len(context):] for j in range(len(LETTERS))]
        if any(not c for c in continuations):
            raise ValueError(f"the tokenizer adds no token for a letter after {prompt[-40:]!r}")
        out.append((context, continuations))
    return out


def continuation_logprobs(model, items, aligner=None, pad_id: int = 0) -> torch.Tensor:
    """log P(continuation | context) for each item's continuations, in one right-padded forward.

    items: [(context ids, [continuation ids, ...]), ...] with the same number
    of continuations each. An item whose continuations are single tokens is one
    row, read at its last real position; otherwise each continuation is its own
    row, context + continuation[:-1], and its tokens' log-probabilities are summed.
    Right padding changes nothing: the mask is causal, and no read looks past a
    row's own tokens. Returns (n_items, n_continuations) float32.
    """
    n_items, n_cont = len(items), len(items[0][1])
    rows, reads = [], []  # reads: (row, position, token, item, continuation)
    for i, (context, continuations) in enumerate(items):
        if all(len(c) == 1 for c in continuations):
            reads += [(len(rows), len(context) - 1, c[0], i, j) for j, c in enumerate(continuations)]
            rows.append(context)
        else:
            for j, c in enumerate(continuations):
                reads += [(len(rows), len(context) - 1 + t, token, i, j) for t, token in enumerate(c)]
                rows.append(context + c[:-1])

    device = model.tok_embeddings.weight.device
    seqlen = max(len(r) for r in rows)
    tokens = torch.full((len(rows), seqlen), pad_id, dtype=torch.long)
    for b, row in enumerate(rows):
        tokens[b, :len(row)] = torch.tensor(row)
    logits = model(tokens.to(device), aligner=aligner)  # (R, T, V) float32

    row_idx, pos, tok, item, cont = (torch.tensor(x, device=device) for x in zip(*reads))
    logp = torch.log_softmax(logits[row_idx, pos].float(), dim=-1)  # (reads, V)
    picked = logp.gather(1, tok[:, None])[:, 0]  # (reads,)
    scores = torch.zeros(n_items, n_cont, device=device)
    scores.index_put_((item, cont), picked, accumulate=True)
    return scores.cpu()


def aggregate(records) -> dict:
    """Accuracies from [(subject, correct), ...]: per subject, per category (pooled questions),
    and overall as the mean over questions and as the mean over subjects."""
    by_subject = {}
    for subject, correct in records:
        by_subject.setdefault(subject, []).append(bool(correct))
    subject_acc = {s: sum(v) / len(v) for s, v in sorted(by_subject.items())}
    by_category = {}
    for category in CATEGORIES:
        pooled = [c for s, v in by_subject.items() if SUBJECT_CATEGORY.get(s) == category for c in v]
        if pooled:
            by_category[category] = sum(pooled) / len(pooled)
    n = sum(len(v) for v in by_subject.values())
    return {"questions": sum(sum(v) for v in by_subject.values()) / n,
            "subjects": sum(subject_acc.values()) / len(subject_acc),
            "categories": by_category, "by_subject": subject_acc, "n": n}


# -----------------------------------------------------------------------------
# MMLU scored as the Aligner authors' log scored it (--scoring generate)

MMLU_ANSWER_STOP = ("\n",)  # the answer is its first line


def mmlu_generation_prompt(question: str, choices: list) -> str:
    """Alpaca's prompt with the question as the instruction and the choices as Python writes a list:
    the authors' log holds answers that copy a choice with repr()'s quotes, as from such a list."""
    return format_prompt(question, repr(list(choices)), "alpaca")


def without_final_period(text: str) -> str:
    text = text.strip()
    return text[:-1] if text.endswith(".") else text


def answer_matches(answer: str, right_choice: str) -> bool:
    """The rule that reproduces every is_model_correct of the authors' MMLU log from its model_answer:
    equal text once both are stripped and a final "." is dropped. Quotes are not removed: the log counts
    the 16 answers that give the right choice in quotes as wrong."""
    return without_final_period(answer) == without_final_period(right_choice)


# -----------------------------------------------------------------------------
# shared pieces: files, prompts that fit, batches

class GenerationItem(NamedTuple):
    """One GSM8K or QA item, ready to generate from."""
    prompt: str  # the exact text given to the model
    ids: list  # its tokens, BOS first (the oldest cut when even zero shots were too long)
    gold: str  # the reference: GSM8K's whole answer, or QA's output
    shots: int  # the shots it holds, fewer than asked where the prompt was too long
    tokens_cut: int  # tokens cut after BOS where even zero shots were too long


class ChoiceItem(NamedTuple):
    """One MMLU question, ready to score."""
    subject: str
    prompt: str  # the exact text given to the model
    context: list  # its tokens, BOS first
    continuations: list  # per letter, the tokens " A" ... " D" add after the context
    gold: str  # the answer letter
    shots: int
    tokens_cut: int


class AnswerItem(NamedTuple):
    """One MMLU question, ready to answer in words (--scoring generate)."""
    subject: str
    prompt: str  # the exact text given to the model
    ids: list  # its tokens, BOS first
    gold: str  # the right choice's text
    tokens_cut: int  # tokens cut after BOS where the prompt was too long


class Prepared(NamedTuple):
    """A data file's items, built once and then run under each Aligner."""
    items: list
    info: dict  # the protocol's settings and counts, reported in results.json


def read_items(path, keys) -> list:
    """The records of a JSON Lines (or JSON list) file, each with string fields `keys`."""
    items = []
    for where, record in read_records(path):
        string_fields(path, where, record, keys)  # else a DataError that names the file, line and key
        items.append(record)
    if not items:
        raise DataError(f"{path}: no records")
    return items


def fit_shots(build, n_shots: int, size, limit: int):
    """(build(k), k) for the most shots k <= n_shots whose size(build(k)) <= limit: shots are
    dropped from the end, as the original MMLU evaluation does. Where even zero shots are
    too long, (build(0), 0): the caller cuts tokens with cut_left."""
    for k in range(n_shots, -1, -1):
        built = build(k)
        if size(built) <= limit:
            return built, k
    return built, 0


def cut_left(ids: list, n: int) -> list:
    """Drop the n oldest tokens after BOS."""
    return ids[:1] + ids[1 + n:]


def shot_counts(items: list, shots: int) -> dict:
    """What results.json reports about prompts that had to be shortened."""
    return {"shots": shots, "prompts_dropping_shots": sum(item.shots < shots for item in items),
            "shots_dropped": sum(shots - item.shots for item in items),
            "prompts_cut": sum(item.tokens_cut > 0 for item in items)}


def by_length(prompts, batch_size: int):
    """Index batches, longest prompts first: little padding, and a batch too big for memory fails at once."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def in_batches(batches: list, work, lockstep, desc: str) -> dict:
    """The union of work(batch) -> {index: result} over these index batches, with a progress bar.
    Under FSDP (lockstep) each rank works through its share of the batches, whole, in step with
    the others, and every rank gets every result: the batches are the one process's, so are the results."""
    mine = batches if lockstep is None else lockstep.share(batches)
    results = {}
    with cli.progress(sum(map(len, mine)), f"evaluating {desc}", unit="questions",
                      disable=lockstep is not None and lockstep.d.rank != 0) as bar:
        for batch in mine:
            results.update(work(batch))
            bar.update(len(batch))
    if lockstep is not None:
        lockstep.finish()
        results = lockstep.gather(results)
    return results


def generate_all(model, tokenizer, prompts, aligner, batch_size, max_new_tokens, stop, desc, compile=False,
                 lockstep=None) -> list:
    def work(batch):
        texts = generate(model, tokenizer, [prompts[i] for i in batch], aligner, max_new_tokens=max_new_tokens,
                         stop=list(stop), compile=compile, lockstep=lockstep)
        return dict(zip(batch, texts))

    outputs = in_batches(by_length(prompts, batch_size), work, lockstep, desc)
    return [outputs[i] for i in range(len(prompts))]


# -----------------------------------------------------------------------------
# the three tasks: prepare builds a file's items once; run returns (one row of results, per-item records)

def prepare_gsm8k(path, tokenizer, shots: int, args) -> Prepared:
    """Prompts and references for one GSM8K file; shots come from train.jsonl beside it."""
    records = read_items(path, ("question", "answer"))[:args.limit]
    for n, record in enumerate(records, 1):
        if "#### " not in record["answer"]:
            raise DataError(f"{path}, record {n}: the answer does not end in '#### N'")
    if args.template:
        shots = 0
    train_path = Path(path).with_name("train.jsonl")
    pool = read_items(train_path, ("question", "answer")) if shots else []
    if len(pool) < shots:
        raise DataError(f"{train_path}: {cli.plural(len(pool), 'record')}, fewer than --shots {shots}")
    rng = random.Random(args.seed)  # a fresh draw for each item, in file order, as the harness does
    limit = args.max_seq_len - args.max_new_tokens
    items = []
    for record in records:
        drawn = [] if args.template else rng.sample(pool, shots)

        def build(k):
            if args.template:
                text = format_prompt(record["question"], template=args.template)
                return text, encode_prompt(tokenizer, text)
            text = gsm8k_prompt(record["question"], drawn[:k])
            return text, tokenizer.encode(text, bos=True)

        (prompt, ids), k = fit_shots(build, shots, lambda built: len(built[1]), limit)
        cut = max(0, len(ids) - limit)
        items.append(GenerationItem(prompt, cut_left(ids, cut), record["answer"], k, cut))
    info = {"template": args.template or "few-shot", **shot_counts(items, shots), "stop": list(GSM8K_STOP)}
    return Prepared(items, info)


def run_gsm8k(model, tokenizer, aligner, name, prepared: Prepared, args, lockstep=None):
    items = prepared.items
    outputs = generate_all(model, tokenizer, [item.ids for item in items], aligner, args.batch_size,
                           args.max_new_tokens, GSM8K_STOP, f"gsm8k [{name}]", args.compile, lockstep)
    records = []
    for n, (item, output) in enumerate(zip(items, outputs)):
        strict, flexible = extract_strict(output), extract_flexible(output)
        records.append({"aligner": name, "index": n, "prompt": item.prompt, "stop": list(GSM8K_STOP),
                        "shots": item.shots, "tokens_cut": item.tokens_cut, "gold": normalize(item.gold),
                        "output": output, "strict": strict, "flexible": flexible,
                        "strict_correct": exact_match(strict, item.gold),
                        "flexible_correct": exact_match(flexible, item.gold)})
    n = len(items)
    return {"strict": sum(r["strict_correct"] for r in records) / n,
            "flexible": sum(r["flexible_correct"] for r in records) / n,
            "strict_found": sum(r["strict"] != FALLBACK for r in records) / n, "n": n}, records


def longest_row(context: list, continuations: list) -> int:
    """The tokens of the longest row continuation_logprobs makes of an MMLU question."""
    return len(context) + max(len(c) for c in continuations) - 1


def prepare_mmlu(folder, tokenizer, shots: int, args) -> Prepared:
    """Per test question a ChoiceItem; the shots are the first rows of the subject's dev file."""
    folder = Path(folder)
    items = []
    for subject in mmlu_subjects(folder):
        rows = read_mmlu_csv(folder / "test" / f"{subject}_test.csv")[:args.limit]
        dev = []
        if shots:
            dev_path = folder / "dev" / f"{subject}_dev.csv"
            if not dev_path.is_file():
                raise FileNotFoundError(f"{dev_path}: missing; the few-shot examples come from the dev split")
            dev = read_mmlu_csv(dev_path)[:shots]
        prompts = [mmlu_prompt(subject, dev, row) for row in rows]
        encoded = letter_continuations(tokenizer, prompts)
        for row, prompt, (context, continuations) in zip(rows, prompts, encoded):
            k = len(dev)
            if longest_row(context, continuations) > args.max_seq_len and dev:  # rare: encode again, fewer shots
                def build(k):
                    text = mmlu_prompt(subject, dev[:k], row)
                    return (text, *letter_continuations(tokenizer, [text])[0])
                (prompt, context, continuations), k = fit_shots(build, len(dev) - 1,
                                                                lambda b: longest_row(*b[1:]), args.max_seq_len)
            cut = max(0, longest_row(context, continuations) - args.max_seq_len)
            items.append(ChoiceItem(subject, prompt, cut_left(context, cut), continuations, row[5], k, cut))
    single = sum(all(len(c) == 1 for c in item.continuations) for item in items)
    info = {**shot_counts(items, shots), "letters_single_token": single, "letters_multi_token": len(items) - single}
    return Prepared(items, info)


def run_mmlu(model, tokenizer, aligner, name, prepared: Prepared, args, lockstep=None):
    items = prepared.items

    def work(batch):
        if lockstep is not None:
            lockstep.turn()
        logp = continuation_logprobs(model, [(items[i].context, items[i].continuations) for i in batch],
                                     aligner)  # (B, 4)
        return dict(zip(batch, logp.tolist()))

    by_item = in_batches(by_length([item.context for item in items], args.batch_size), work, lockstep,
                         f"mmlu [{name}]")
    scores = [by_item[i] for i in range(len(items))]
    preds = [LETTERS[max(range(4), key=score.__getitem__)] for score in scores]
    result = aggregate([(item.subject, pred == item.gold) for item, pred in zip(items, preds)])
    records = [{"aligner": name, "subject": item.subject, "prompt": item.prompt, "shots": item.shots,
                "tokens_cut": item.tokens_cut, "gold": item.gold, "pred": pred,
                "logprobs": [round(x, 4) for x in score], "correct": pred == item.gold}
               for item, pred, score in zip(items, preds, scores)]
    return result, records


def prepare_mmlu_generated(folder, tokenizer, shots: int, args) -> Prepared:
    """Per test question an AnswerItem: zero-shot, in Alpaca's prompt (mmlu_generation_prompt)."""
    limit = args.max_seq_len - args.max_new_tokens
    items = []
    for subject in mmlu_subjects(folder):
        for row in read_mmlu_csv(Path(folder) / "test" / f"{subject}_test.csv")[:args.limit]:
            question, choices, letter = row[0], row[1:5], row[5]
            prompt = mmlu_generation_prompt(question, choices)
            ids = encode_prompt(tokenizer, prompt)
            cut = max(0, len(ids) - limit)
            items.append(AnswerItem(subject, prompt, cut_left(ids, cut), choices[LETTERS.index(letter)], cut))
    info = {"scoring": "generate", "template": "alpaca", "shots": 0, "stop": list(MMLU_ANSWER_STOP),
            "prompts_cut": sum(item.tokens_cut > 0 for item in items)}
    return Prepared(items, info)


def run_mmlu_generated(model, tokenizer, aligner, name, prepared: Prepared, args, lockstep=None):
    items = prepared.items
    outputs = generate_all(model, tokenizer, [item.ids for item in items], aligner, args.batch_size,
                           args.max_new_tokens, MMLU_ANSWER_STOP, f"mmlu [{name}]", args.compile, lockstep)
    records = [{"aligner": name, "subject": item.subject, "prompt": item.prompt, "stop": list(MMLU_ANSWER_STOP),
                "tokens_cut": item.tokens_cut, "gold": item.gold, "output": output,
                "correct": answer_matches(output, item.gold)}
               for item, output in zip(items, outputs)]
    return aggregate([(r["subject"], r["correct"]) for r in records]), records


def prepare_qa(path, tokenizer, shots: int, args) -> Prepared:
    records = read_items(path, ("instruction", "output"))[:args.limit]
    template = args.template or "alpaca"
    prompts = [format_prompt(r["instruction"], r.get("input", ""), template) for r in records]
    items = [GenerationItem(prompt, encode_prompt(tokenizer, prompt), r["output"], 0, 0)
             for prompt, r in zip(prompts, records)]
    too_long = [n for n, item in enumerate(items, 1) if len(item.ids) + args.max_new_tokens > args.max_seq_len]
    if too_long:
        raise DataError(f"{path}, record {too_long[0]}: the prompt and --max-new-tokens exceed "
                        f"--max-seq-len {args.max_seq_len}")
    return Prepared(items, {"template": template})


def run_qa(model, tokenizer, aligner, name, prepared: Prepared, args, lockstep=None):
    items = prepared.items
    outputs = generate_all(model, tokenizer, [item.ids for item in items], aligner, args.batch_size,
                           args.max_new_tokens, (), f"qa [{name}]", args.compile, lockstep)
    records = [{"aligner": name, "index": n, "prompt": item.prompt, "stop": [], "gold": item.gold,
                "output": out, "correct": out.strip() == item.gold.strip(),
                "starts_with_gold": out.strip().startswith(item.gold.strip())}
               for n, (item, out) in enumerate(zip(items, outputs))]
    n = len(items)
    return {"accuracy": sum(r["correct"] for r in records) / n,
            "starts": sum(r["starts_with_gold"] for r in records) / n, "n": n}, records


# -----------------------------------------------------------------------------
# the script: flags

TASK_NAMES = {"gsm8k": "GSM8K", "mmlu": "MMLU", "qa": "QA"}  # as the module docstring's protocols name them
WRITTEN = ("results.json", *(f"{task}.jsonl" for task in TASKS))  # every file a run writes in --out


def demo_data_shown(task: str) -> str:
    """The demo's data for a task, as `evaluate.py TASK --help` shows it: relative to the project."""
    root = Path(__file__).resolve().parent
    shown = {"gsm8k": DEMO_DATA / "gsm8k" / "test.jsonl", "mmlu": DEMO_DATA / "mmlu", "qa": DEMO_DATA / "qa" / "*.jsonl"}
    return f"the demo's, {shown[task].relative_to(root)}"


def task_description(task: str) -> str:
    """`evaluate.py TASK --help`'s description: the task's protocol, from the module docstring."""
    protocol = next(part for part in __doc__.split("\n- ") if part.startswith(TASK_NAMES[task]))
    return f"evaluate.py {task}: " + protocol.split("\n\n")[0]


class TaskHelp(argparse.Action):
    """-h/--help: the help of the task named before it (`evaluate.py mmlu --help`: that task's flags
    and their defaults), or with no task the whole script's."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0,
                         help="show this help and exit; after a task (evaluate.py mmlu --help), that task's")

    def __call__(self, parser, namespace, values, option_string=None):
        task = getattr(namespace, "task", "all")
        (make_parser(task) if task in TASKS else parser).print_help()
        parser.exit()


def make_parser(task: str = "all"):
    """The command line. For one task, only the flags that task reads, with that task's defaults:
    what `evaluate.py TASK --help` shows. The script parses with the whole parser (task "all")."""
    every = task not in TASKS

    def applies(*tasks) -> bool:
        return every or task in tasks

    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0] if every else task_description(task),
                                add_help=False)
    parser.add_argument("-h", "--help", action=TaskHelp)
    parser.add_argument("task", nargs="?", choices=(*TASKS, "all"), default="all" if every else argparse.SUPPRESS,
                        help="what to evaluate; all: the three tasks on their default data" if every else
                        f"the task: {task} in this help")
    cli.add_checkpoint_flag(parser)
    parser.add_argument("--aligner", action="append", default=[],
                        help="an Aligner file, this project's or the authors' released one, or a LoRA (file "
                             "or PEFT folder); repeat for side-by-side rows; 'base' is the model alone (the only "
                             "row when none is given)")
    parser.add_argument("--merge-lora", action="store_true",
                        help="write the one --aligner, a LoRA, into the base's wq and wv before evaluating "
                             "(the same scores to float rounding), rather than apply it beside them")
    data_help = {"gsm8k": "test .jsonl (shots from train.jsonl beside it)",
                 "mmlu": "folder with dev/ and test/ of <subject>_<split>.csv",
                 "qa": ".jsonl files of instruction/output, each reported alone"}
    parser.add_argument("--data", nargs="+", type=cli.path, default=None if every else demo_data_shown(task),
                        help="; ".join(f"{t}: {h}" for t, h in data_help.items()) + " (default: the demo's data "
                             "for the task)" if every else data_help[task])
    if applies("gsm8k", "mmlu"):
        parser.add_argument("--shots", type=cli.non_negative_int,
                            default=None if every else LLAMA_2_SHOTS[task],
                            help="few-shot examples, at most those the data holds (default: gsm8k 8, mmlu 5, "
                                 "LLaMA-2's setting; qa takes none)" if every else
                            "few-shot examples, at most those the data holds (LLaMA-2's setting)")
        parser.add_argument("--paper", action="store_true",
                            help="the Aligner paper's shots: one for gsm8k and for mmlu (excludes --shots)")
    if applies("gsm8k", "qa"):
        template_help = {"qa": "the prompt format", "gsm8k": "the bare question in this format, zero-shot, "
                         "instead of the harness's few-shot prompt (none: the few-shot prompt)"}
        parser.add_argument("--template", choices=list(TEMPLATES), default="alpaca" if task == "qa" else None,
                            help="qa: the prompt format (default alpaca); gsm8k: " + template_help["gsm8k"]
                            + "; mmlu uses the original release's prompt, or Alpaca's under --scoring generate"
                            if every else template_help[task])
    parser.add_argument("--limit", type=cli.positive_int,
                        help="only the first N items of each file (mmlu: of each subject); none: all")
    parser.add_argument("--batch-size", type=cli.positive_int, default=16,
                        help="prompts per forward or generation batch")
    if applies("mmlu"):
        parser.add_argument("--scoring", choices=("letter", "generate"), default="letter",
                            help="mmlu: letter, the answer letter of highest log-likelihood (the original "
                                 "release's); generate, a zero-shot answer in words matched against the right "
                                 "choice, as the Aligner authors' MMLU log scores (excludes --shots and --paper)")
    parser.add_argument("--max-new-tokens", type=cli.positive_int, default=256,
                        help="generation limit" + (" for gsm8k, qa and mmlu --scoring generate" if every else
                                                   " of an answer under --scoring generate" if task == "mmlu" else ""))
    parser.add_argument("--max-seq-len", type=cli.positive_int, default=4096,
                        help="the context, 4096 in LLaMA-2, at most the checkpoint's (see --beyond-context): "
                             "longer prompts drop shots until they fit, and the run says how many did")
    if applies("gsm8k"):
        parser.add_argument("--seed", type=cli.seed, default=1234,
                            help="the seed of the gsm8k few-shot draw (the harness's)")
    parser.add_argument("--out", type=cli.out_path, default=None,
                        help="folder for results.json and <task>.jsonl per-item records; none: print only")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an evaluation already in --out (its results.json and <task>.jsonl files, "
                             "nothing else)")
    cli.add_common_flags(parser)
    parser.add_argument("--compile", action="store_true",
                        help="decode with the compiled step (generate.py --compile)"
                        + (": gsm8k, qa and mmlu --scoring generate" if every else ""))
    return parser


def parse_flags(argv) -> tuple:
    """(args, tasks): the flags, parsed and checked against each other, and the tasks they ask for."""
    parser = make_parser()
    args = parser.parse_args(argv)
    tasks = TASKS if args.task == "all" else (args.task,)
    if args.data and len(tasks) > 1:
        parser.error("--data needs a single task (gsm8k, mmlu or qa)")
    generating = {"gsm8k", "qa"} | ({"mmlu"} if args.scoring == "generate" else set())
    if args.max_new_tokens >= args.max_seq_len and generating & set(tasks):
        parser.error(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt within "
                     f"--max-seq-len {args.max_seq_len}")
    if args.paper and args.shots is not None:
        parser.error("--paper sets the shots (one for gsm8k and mmlu); give either --paper or --shots")
    if args.scoring == "generate" and (args.paper or args.shots is not None):
        parser.error(f"{'--paper' if args.paper else '--shots'}: mmlu --scoring generate asks each question "
                     "zero-shot; leave it out")
    if args.template and tasks == ("mmlu",):
        parser.error("--template applies to qa and gsm8k; mmlu uses the original release's prompt "
                     "(Alpaca's under --scoring generate)")
    if tasks == ("qa",) and (args.shots or args.paper):
        parser.error(f"{'--paper' if args.paper else '--shots'}: qa takes no shots (gsm8k and mmlu do)")
    return args, tasks


# -----------------------------------------------------------------------------
# what can be checked before anything loads

def default_data(task):
    return {"gsm8k": [DEMO_DATA / "gsm8k" / "test.jsonl"], "mmlu": [DEMO_DATA / "mmlu"],
            "qa": sorted((DEMO_DATA / "qa").glob("*.jsonl"))}[task]


def task_shots(task: str, args) -> int:
    """The shots a task runs with: --shots, --paper's, or LLaMA-2's setting; qa takes none."""
    if task == "qa":
        return 0
    if task == "gsm8k" and args.template or task == "mmlu" and args.scoring == "generate":
        return 0  # the bare question, zero-shot
    if args.shots is not None:
        return args.shots
    return (PAPER_SHOTS if args.paper else LLAMA_2_SHOTS)[task]


def check_shots(task: str, path, shots: int):
    """Refuse, before the model loads, more shots than a task's data holds: GSM8K draws them from
    train.jsonl beside the test file, MMLU takes the first rows of each subject's dev file."""
    if not shots:
        return
    if task == "gsm8k":
        train_path = Path(path).with_name("train.jsonl")
        available = {train_path: len(read_items(train_path, ("question", "answer")))}
    else:
        available = {}
        for subject in mmlu_subjects(path):
            dev_path = Path(path) / "dev" / f"{subject}_dev.csv"
            if not dev_path.is_file():
                raise FileNotFoundError(f"{dev_path}: missing; the few-shot examples come from the dev split")
            available[dev_path] = len(read_mmlu_csv(dev_path))
    where, fewest = min(available.items(), key=lambda item: item[1])
    if fewest < shots:
        raise DataError(f"--shots {shots}: {where} holds {fewest} example{'s' * (fewest != 1)} to draw shots from")


def check_data(args, tasks: tuple):
    """The checkpoint (with no --ckpt, the built-in demo's) and each task's data: there, of the
    right kind, and holding the shots asked for."""
    if args.ckpt is None:
        check_demo(DEMO_CKPT, DEMO_DATA)
        args.ckpt = DEMO_CKPT
        print(f"no --ckpt given: evaluating the built-in demo ({DEMO_CKPT} on {DEMO_DATA})")
    for task in tasks:
        paths = args.data or default_data(task)
        if not paths:
            raise FileNotFoundError(f"{task}: no data files; pass --data")
        if not args.data:
            check_demo(*paths)
        for path in paths:
            if not Path(path).exists():
                raise FileNotFoundError(f"--data {path}: no such file or folder")
            if task != "mmlu" and Path(path).is_dir():
                raise FileNotFoundError(f"--data {path}: a folder; {task} reads a file of JSON records"
                                        + (", with train.jsonl beside it for the shots" if task == "gsm8k" else ""))
            check_shots(task, path, task_shots(task, args))


def check_aligners(args):
    """Each --aligner file readable and usable (formats.check_adapter_files), and --merge-lora's
    one LoRA mergeable: a damaged file stops the run here, before the model loads."""
    shapes = check_adapter_files(args.aligner)
    if args.merge_lora:
        lora.check_merge(args.aligner, shapes, args.fsdp)


def check_out(args, tasks: tuple):
    """--out writable, none of its files an input, and no earlier evaluation there replaced unasked."""
    if not args.out:
        return
    check_writable(args.out, "--out")
    refuse_clashes(checkpoint_inputs(args.ckpt, args.tokenizer)
                   + [("--data", p) for task in tasks for p in args.data or default_data(task)]
                   + [("--aligner", p) for p in args.aligner if p != "base"],
                   [("--out", Path(args.out) / name) for name in WRITTEN])
    if not args.overwrite:  # an earlier evaluation's files, whichever tasks it ran
        refuse_existing([Path(args.out) / name for name in WRITTEN])


# -----------------------------------------------------------------------------
# load

class Models(NamedTuple):
    """What a run evaluates with: the frozen base, its tokenizer, each row's Aligner by its
    --aligner name (None: the base alone), and under FSDP the Lockstep that keeps the ranks' forwards in step."""
    model: torch.nn.Module
    tokenizer: object
    aligners: dict
    lockstep: distributed.Lockstep | None


def load_models(args, d, dtype) -> Models:
    """The base, and every --aligner (or with --merge-lora the base with its LoRA written into wq and wv)."""
    model, tokenizer = (distributed.load_sharded if d.fsdp else load)(
        args.ckpt, d.device, dtype, tokenizer_path=args.tokenizer, max_seq_len=args.max_seq_len,
        max_batch_size=args.batch_size)
    lockstep = distributed.Lockstep(model, d) if d.fsdp else None  # under FSDP each rank takes its share
    aligners = {}
    for path in args.aligner or ["base"]:
        aligners[path] = None if path == "base" else read_adapter(path, model.args).to(d.device)
    if args.merge_lora:  # W + (alpha / r) B A in the base's own wq and wv; the model then runs as it is
        lora.merge(model, aligners[args.aligner[0]])
        aligners[args.aligner[0]] = None
    return Models(model, tokenizer, aligners, lockstep)


# -----------------------------------------------------------------------------
# evaluate

def print_table(task, results):
    """A task's scores: for each data file, a line per Aligner."""
    width = max(len(name) for result in results.values() for name in result["rows"])  # long paths stay aligned
    for source, result in results.items():
        print(f"\n{task}: {source}" + (f"  {json.dumps(result['info'])}" if result["info"] else ""))
        for name, r in result["rows"].items():
            if task == "gsm8k":
                line = (f"strict {100 * r['strict']:6.2f}  flexible {100 * r['flexible']:6.2f}  "
                        f"in the #### form {100 * r['strict_found']:6.2f}")
            elif task == "mmlu":
                line = (f"questions {100 * r['questions']:6.2f}  subjects {100 * r['subjects']:6.2f}  "
                        + "  ".join(f"{c} {100 * a:5.2f}" for c, a in r["categories"].items()))
            else:
                line = f"exact match {100 * r['accuracy']:6.2f}  starts with the reference {100 * r['starts']:6.2f}"
            print(f"  {name:<{width}}  {line}  (n={r['n']})")


def task_functions(task: str, args) -> tuple:
    """(prepare, run) of a task: prepare builds a data file's items once, run scores them under one Aligner."""
    if task == "mmlu" and args.scoring == "generate":
        return prepare_mmlu_generated, run_mmlu_generated
    return {"gsm8k": (prepare_gsm8k, run_gsm8k), "mmlu": (prepare_mmlu, run_mmlu), "qa": (prepare_qa, run_qa)}[task]


def warn_if_shortened(task, path, prepared: Prepared, args):
    """Say on stderr when prompts had to drop shots or tokens to fit the context: the protocol changed."""
    info, n = prepared.info, len(prepared.items)
    if info.get("prompts_dropping_shots"):
        print(f"warning: {task} {path}: {info['prompts_dropping_shots']} of {cli.plural(n, 'prompt')} dropped shots "
              f"({info['shots_dropped']} in all) to fit --max-seq-len {args.max_seq_len}", file=sys.stderr)
    if info.get("prompts_cut"):
        print(f"warning: {task} {path}: {info['prompts_cut']} of {cli.plural(n, 'prompt')} were cut from the left "
              f"to fit --max-seq-len {args.max_seq_len} even without shots", file=sys.stderr)


def evaluate_task(task: str, args, models: Models, d) -> tuple:
    """(results, records) of one task, each data file's prompts built once, then run under each
    Aligner; rank 0 prints the table. results: {data file: {"info", "rows": {Aligner: scores}}};
    records: the per-item records of every file and Aligner."""
    shots = task_shots(task, args)
    prepare, run = task_functions(task, args)
    results, records = {}, []
    for path in [Path(p) for p in (args.data or default_data(task))]:
        prepared = prepare(path, models.tokenizer, shots, args)
        if d.rank == 0:
            warn_if_shortened(task, path, prepared, args)
        rows = {}
        for name, aligner in models.aligners.items():
            rows[name], item_records = run(models.model, models.tokenizer, aligner, name, prepared, args,
                                           models.lockstep)
            records += [{"data": str(path), **r} for r in item_records]
        results[str(path)] = {"info": prepared.info, "rows": rows}
    if d.rank == 0:
        print_table(task, results)
    return results, records


# -----------------------------------------------------------------------------
# save

def save(out: Path, ckpt, aligners: list, results: dict, records: dict):
    """results.json and a <task>.jsonl of per-item records per task run, in `out`; an earlier
    run's records of the other tasks are removed (--overwrite replaces a whole evaluation)."""
    out.mkdir(parents=True, exist_ok=True)
    summary = {"ckpt": str(ckpt), "aligners": aligners, "results": results}
    atomic_write(out / "results.json", lambda f: json.dump(summary, f, indent=2), mode="w")
    for task, task_records in records.items():
        lines = "".join(json.dumps(r) + "\n" for r in task_records)
        atomic_write(out / f"{task}.jsonl", lambda f: f.write(lines), mode="w")
    for task in set(TASKS) - set(records):
        (out / f"{task}.jsonl").unlink(missing_ok=True)
    print(f"\nwrote {out / 'results.json'} and per-item records beside it")


def main(argv=None):
    args, tasks = parse_flags(argv)
    device, dtype = cli.place(args)
    d = distributed.init_distributed(device, args.fsdp, args.compile)
    distributed.check_ranks_agree(d, args, ("data", "aligner"))  # under torchrun, every rank the same run
    check_data(args, tasks)
    check_aligners(args)
    check_out(args, tasks)
    check_context(args.ckpt, args.max_seq_len, args.beyond_context)
    models = load_models(args, d, dtype)
    results, records = {}, {}
    with torch.inference_mode():
        for task in tasks:
            results[task], records[task] = evaluate_task(task, args, models, d)
    if args.out and d.rank == 0:
        save(Path(args.out), args.ckpt, list(models.aligners), results, records)
    distributed.exit_distributed()
    return results


if __name__ == "__main__":
    cli.run(main)
