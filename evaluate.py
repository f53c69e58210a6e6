"""
Evaluate a LLaMA checkpoint, alone or with one or more Aligners side by side, on
GSM8K, MMLU, or exact-match QA.

    python evaluate.py                                   # the built-in demo: all three tasks
    python evaluate.py gsm8k --ckpt llama-2-7b --data gsm8k/test.jsonl --aligner aligner.pt
    python evaluate.py gsm8k --ckpt llama-2-7b --data gsm8k/test.jsonl --aligner aligner.pt --alpaca
    python evaluate.py mmlu --ckpt llama-2-7b --data mmlu --max-seq-len 4096 --aligner base --aligner aligner.pt
    python evaluate.py qa --ckpt demo/llama-demo --data a.jsonl b.jsonl --out runs/eval

Protocols (the Aligner paper's Experiment 3 scores GSM8K and MMLU; these
follow lm-evaluation-harness and the original MMLU release, so that the
numbers compare with the LLaMA-2 paper's and the harness's):

- GSM8K, as the harness's `gsm8k` task: `--shots` examples (8 by default, as
  in the LLaMA-2 paper; the Aligner paper used 1) drawn from the train file
  with random.Random(--seed).sample, a fresh draw for each test item in file
  order (the harness's default sampler, whose seed is 1234); each shot
  `Question: {q}\nAnswer: {a}`, shots joined by a blank line, then
  `Question: {q}\nAnswer:`. Greedy decoding, stopping at `Question:`, a
  blank line or EOS, at most 256 new tokens (`--max-new-tokens`). Two
  scores: strict (the number after `#### `, the harness's regex) and flexible
  (the last number in the output). Both sides lose commas, `$` and a trailing
  period before an exact string comparison.
  `--alpaca` instead puts the bare question in the Alpaca template, zero-shot
  (for instruction-tuned models; the flexible score is the one to read).
- MMLU, as the original release's evaluation (Hendrycks et al.): the header
  `The following are multiple choice questions (with answers) about
  {subject}.`, the first `--shots` (5) rows of the subject's dev file, then the
  test question ending in `Answer:`. The prediction is the letter whose
  continuation " A" ... " D" has the highest log-likelihood after the prompt.
  With LLaMA's tokenizer each is one token, so this is one forward per
  question reading the next-token distribution at the last position; where a
  tokenizer splits a letter into several tokens, each letter's tokens are
  scored in full (one row per letter). Accuracy per subject, per category
  (the release's 57-subject map; a category pools its questions) and overall,
  both as the mean over questions and the mean over subjects.
- QA: the Alpaca prompt, greedy decoding until EOS, exact match of the
  stripped completion with the stripped reference.

Departures: a prompt longer than the context (`--max-seq-len`, less the
tokens to generate) drops shots from the end until it fits (the original
MMLU rule, here used for GSM8K too; the harness would cut tokens from the
left); if even zero shots do not fit, tokens after BOS are cut from the left.
The flexible GSM8K extractor ignores matches of the harness's regex that hold
no digit (a run of dots such as "..." is not a number).
"""

import argparse
import csv
import json
import random
import re
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from aligner import Aligner
from data import DEMO_CKPT, DEMO_DATA, check_demo, format_prompt, read_records, string_fields
from generate import generate
from files import atomic_write
from llama import load

TASKS = ("gsm8k", "mmlu", "qa")
LETTERS = ("A", "B", "C", "D")

# -----------------------------------------------------------------------------
# GSM8K: answer extraction and scoring

STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")  # the harness's strict-match filter
NUMBER = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")  # the harness's flexible-extract filter


def normalize(answer: str) -> str:
    """What both sides lose before comparing: commas, `$`, and a trailing period."""
    answer = answer.strip().replace(",", "").replace("$", "")
    return re.sub(r"\.$", "", answer)


def extract_strict(text: str):
    """The number after the first `#### `, normalized; None where there is none."""
    match = STRICT.search(text)
    return normalize(match.group(1)) if match else None


def extract_flexible(text: str):
    """The last number in the text, normalized; None where there is none."""
    numbers = [a or b for a, b in NUMBER.findall(text)]
    numbers = [n for n in numbers if re.search(r"[0-9]", n)]
    return normalize(numbers[-1]) if numbers else None


def gold_answer(answer: str):
    """The reference: what follows the last `#### ` of a GSM8K answer, normalized; None without one."""
    if "#### " not in answer:
        return None
    return normalize(answer.rsplit("#### ", 1)[1])


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
    with open(path, newline="", encoding="utf-8") as f:
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


def mmlu_prompt(subject: str, shots: list, row) -> str:
    header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
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
# shared pieces: files, prompts that fit, batches

def read_items(path, keys) -> list:
    """The records of a JSON Lines (or JSON list) file, each with string fields `keys`."""
    items = []
    for where, record in read_records(path):
        string_fields(path, where, record, keys)  # else a DataError that names the file, line and key
        items.append(record)
    if not items:
        raise ValueError(f"{path}: no records")
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


def by_length(prompts, batch_size: int):
    """Index batches, longest prompts first: little padding, and a batch too big for memory fails at once."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def generate_all(model, tokenizer, prompts, aligner, batch_size, max_new_tokens, stop, desc, compile=False):
    outputs = [None] * len(prompts)
    with tqdm(total=len(prompts), desc=desc, file=sys.stderr) as bar:
        for batch in by_length(prompts, batch_size):
            texts = generate(model, tokenizer, [prompts[i] for i in batch], aligner,
                             max_new_tokens=max_new_tokens, stop=list(stop), compile=compile)
            for i, text in zip(batch, texts):
                outputs[i] = text
            bar.update(len(batch))
    return outputs


# -----------------------------------------------------------------------------
# the three tasks: each returns (one row of results, per-item predictions)

def prepare_gsm8k(path, tokenizer, shots: int, args):
    """Token prompts and references for one GSM8K file; shots come from train.jsonl beside it."""
    items = read_items(path, ("question", "answer"))[:args.limit]
    golds = [gold_answer(item["answer"]) for item in items]
    for n, gold in enumerate(golds, 1):
        if gold is None:
            raise ValueError(f"{path}, record {n}: the answer does not end in '#### N'")
    if args.alpaca:
        shots = 0
    train_path = Path(path).with_name("train.jsonl")
    pool = read_items(train_path, ("question", "answer")) if shots else []
    if len(pool) < shots:
        raise ValueError(f"{train_path}: {len(pool)} records, fewer than --shots {shots}")
    rng = random.Random(args.seed)  # a fresh draw for each item, in file order, as the harness does
    limit = args.max_seq_len - args.max_new_tokens
    prompts, dropped, cut = [], 0, 0
    for item in items:
        if args.alpaca:
            build = lambda k: tokenizer.encode(format_prompt(item["question"]), bos=True)
        else:
            drawn = rng.sample(pool, shots)
            build = lambda k: tokenizer.encode(gsm8k_prompt(item["question"], drawn[:k]), bos=True)
        ids, k = fit_shots(build, shots, len, limit)
        if len(ids) > limit:
            ids, cut = cut_left(ids, len(ids) - limit), cut + 1
        prompts.append(ids)
        dropped += shots - k
    info = {"template": "alpaca" if args.alpaca else "few-shot", "shots": shots,
            "shots_dropped": dropped, "prompts_cut": cut}
    return items, golds, prompts, info


def run_gsm8k(model, tokenizer, aligner, name, prepared, args):
    items, golds, prompts, info = prepared
    stop = () if args.alpaca else ("Question:", "\n\n")
    outputs = generate_all(model, tokenizer, prompts, aligner, args.batch_size, args.max_new_tokens, stop,
                           f"gsm8k [{name}]", args.compile)
    predictions, strict, flexible = [], 0, 0
    for n, (item, gold, output) in enumerate(zip(items, golds, outputs)):
        s, f = extract_strict(output), extract_flexible(output)
        strict += s == gold
        flexible += f == gold
        predictions.append({"aligner": name, "index": n, "gold": gold, "output": output,
                            "strict": s, "flexible": f, "strict_correct": s == gold, "flexible_correct": f == gold})
    n = len(items)
    return {"strict": strict / n, "flexible": flexible / n, "n": n}, predictions


def prepare_mmlu(folder, tokenizer, shots: int, args):
    """Per test question: (subject, context ids, letter continuations, gold letter)."""
    folder = Path(folder)
    items, dropped, cut = [], 0, 0
    size = lambda built: len(built[0]) + max(len(c) for c in built[1]) - 1  # the longest row it makes
    for subject in mmlu_subjects(folder):
        rows = read_mmlu_csv(folder / "test" / f"{subject}_test.csv")[:args.limit]
        dev = []
        if shots:
            dev_path = folder / "dev" / f"{subject}_dev.csv"
            if not dev_path.is_file():
                raise FileNotFoundError(f"{dev_path}: missing; the few-shot examples come from the dev split")
            dev = read_mmlu_csv(dev_path)[:shots]
        encoded = letter_continuations(tokenizer, [mmlu_prompt(subject, dev, row) for row in rows])
        for row, built in zip(rows, encoded):
            k = len(dev)
            if size(built) > args.max_seq_len and dev:  # rare: encode again with fewer shots
                build = lambda k: letter_continuations(tokenizer, [mmlu_prompt(subject, dev[:k], row)])[0]
                built, k = fit_shots(build, len(dev) - 1, size, args.max_seq_len)
            context, continuations = built
            if size(built) > args.max_seq_len:
                context, cut = cut_left(context, size(built) - args.max_seq_len), cut + 1
            items.append((subject, context, continuations, row[5]))
            dropped += len(dev) - k
    single = sum(all(len(c) == 1 for c in item[2]) for item in items)
    info = {"shots": shots, "shots_dropped": dropped, "prompts_cut": cut,
            "letters_single_token": single, "letters_multi_token": len(items) - single}
    return items, info


def run_mmlu(model, tokenizer, aligner, name, prepared, args):
    items, info = prepared
    preds = [None] * len(items)
    scores = [None] * len(items)
    with tqdm(total=len(items), desc=f"mmlu [{name}]", file=sys.stderr) as bar:
        for batch in by_length([item[1] for item in items], args.batch_size):
            logp = continuation_logprobs(model, [items[i][1:3] for i in batch], aligner)  # (B, 4)
            for i, row in zip(batch, logp.tolist()):
                scores[i] = row
                preds[i] = LETTERS[max(range(4), key=row.__getitem__)]
            bar.update(len(batch))
    result = aggregate([(item[0], pred == item[3]) for item, pred in zip(items, preds)])
    predictions = [{"aligner": name, "subject": item[0], "gold": item[3], "pred": pred,
                    "logprobs": [round(x, 4) for x in s], "correct": pred == item[3]}
                   for item, pred, s in zip(items, preds, scores)]
    return result, predictions


def prepare_qa(path, tokenizer, shots: int, args):
    items = read_items(path, ("instruction", "output"))[:args.limit]
    prompts = [tokenizer.encode(format_prompt(item["instruction"], item.get("input", "")), bos=True)
               for item in items]
    too_long = [n for n, p in enumerate(prompts, 1) if len(p) + args.max_new_tokens > args.max_seq_len]
    if too_long:
        raise ValueError(f"{path}, record {too_long[0]}: the prompt and --max-new-tokens exceed "
                         f"--max-seq-len {args.max_seq_len}")
    return items, prompts, {}


def run_qa(model, tokenizer, aligner, name, prepared, args):
    items, prompts, _ = prepared
    outputs = generate_all(model, tokenizer, prompts, aligner, args.batch_size, args.max_new_tokens, (),
                           f"qa [{name}]", args.compile)
    correct = [out.strip() == item["output"].strip() for item, out in zip(items, outputs)]
    predictions = [{"aligner": name, "index": n, "gold": item["output"], "output": out, "correct": c}
                   for n, (item, out, c) in enumerate(zip(items, outputs, correct))]
    return {"accuracy": sum(correct) / len(items), "n": len(items)}, predictions


# -----------------------------------------------------------------------------
# the script

def load_aligner(path, args):
    """An Aligner file of this project or of the paper's authors (lit-llama layout)."""
    state = torch.load(path, map_location="cpu", weights_only=True) if Path(path).is_file() else None
    if isinstance(state, dict) and "global_value_embedding.weight" in state.get("model", state):
        return Aligner.from_lit_llama(path, args)
    return Aligner.load(path, args)


def default_data(task):
    return {"gsm8k": [DEMO_DATA / "gsm8k" / "test.jsonl"], "mmlu": [DEMO_DATA / "mmlu"],
            "qa": sorted((DEMO_DATA / "qa").glob("*.jsonl"))}[task]


def print_table(task, results):
    for source, result in results.items():
        print(f"\n{task}: {source}" + (f"  {json.dumps(result['info'])}" if result["info"] else ""))
        for name, r in result["rows"].items():
            if task == "gsm8k":
                line = f"strict {100 * r['strict']:6.2f}  flexible {100 * r['flexible']:6.2f}"
            elif task == "mmlu":
                line = (f"questions {100 * r['questions']:6.2f}  subjects {100 * r['subjects']:6.2f}  "
                        + "  ".join(f"{c} {100 * a:5.2f}" for c, a in r["categories"].items()))
            else:
                line = f"exact match {100 * r['accuracy']:6.2f}"
            print(f"  {name:<30} {line}  (n={r['n']})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", nargs="?", choices=(*TASKS, "all"), default="all",
                        help="what to evaluate; all: the three tasks on their default data (default)")
    parser.add_argument("--ckpt", help="Meta checkpoint folder (default: the built-in demo, data.DEMO_CKPT)")
    parser.add_argument("--aligner", action="append", default=[],
                        help="an Aligner file; repeat for side-by-side rows; 'base' is the model alone "
                             "(the only row when none is given)")
    parser.add_argument("--data", nargs="+", help="gsm8k: test .jsonl (shots from train.jsonl beside it); "
                        "mmlu: folder with dev/ and test/; qa: .jsonl files, each reported alone "
                        "(default: the demo's data for the task)")
    parser.add_argument("--shots", type=int, help="few-shot examples (default: gsm8k 8, mmlu 5)")
    parser.add_argument("--alpaca", action="store_true",
                        help="gsm8k: zero-shot in the Alpaca template, for instruction-tuned models")
    parser.add_argument("--limit", type=int, help="only the first N items of each file (mmlu: of each subject)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="prompts per forward or generation batch (default 16)")
    parser.add_argument("--max-new-tokens", type=int, default=256,
                        help="generation limit for gsm8k and qa (default 256)")
    parser.add_argument("--max-seq-len", type=int, default=2048,
                        help="the model's context (default 2048; 4096 for LLaMA-2): "
                             "longer prompts drop shots until they fit")
    parser.add_argument("--seed", type=int, default=1234,
                        help="the seed of the gsm8k few-shot draw (default 1234, the harness's)")
    parser.add_argument("--out", help="folder for results.json and <task>.jsonl per-item predictions")
    parser.add_argument("--compile", action="store_true",
                        help="gsm8k and qa: decode with the compiled step (generate.py --compile)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the model runs (bfloat16 on cuda, float32 on cpu)")
    args = parser.parse_args(argv)
    tasks = TASKS if args.task == "all" else (args.task,)
    if args.data and len(tasks) > 1:
        parser.error("--data needs a single task (gsm8k, mmlu or qa)")

    # --- load
    if args.ckpt is None:
        check_demo(DEMO_CKPT, DEMO_DATA)
        args.ckpt = DEMO_CKPT
        print(f"no --ckpt given: evaluating the built-in demo ({DEMO_CKPT} on {DEMO_DATA})")

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model, tokenizer = load(args.ckpt, args.device, dtype, max_seq_len=args.max_seq_len,
                            max_batch_size=args.batch_size)
    aligners = {}
    for path in args.aligner or ["base"]:
        aligners[path] = None if path == "base" else load_aligner(path, model.args).to(args.device)

    # --- evaluate: prompts are built once per file, then run under each Aligner
    results, predictions = {}, {}
    with torch.inference_mode():
        for task in tasks:
            shots = args.shots if args.shots is not None else {"gsm8k": 8, "mmlu": 5, "qa": 0}[task]
            paths = [Path(p) for p in (args.data or default_data(task))]
            if not paths:
                sys.exit(f"{task}: no data files; pass --data")
            prepare, run = {"gsm8k": (prepare_gsm8k, run_gsm8k), "mmlu": (prepare_mmlu, run_mmlu),
                            "qa": (prepare_qa, run_qa)}[task]
            results[task], predictions[task] = {}, []
            for path in paths:
                prepared = prepare(path, tokenizer, shots, args)
                rows = {}
                for name, aligner in aligners.items():
                    rows[name], preds = run(model, tokenizer, aligner, name, prepared, args)
                    predictions[task] += [{"data": str(path), **p} for p in preds]
                results[task][str(path)] = {"info": prepared[-1], "rows": rows}
            print_table(task, results[task])

    # --- save
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        summary = {"ckpt": str(args.ckpt), "aligners": list(aligners), "results": results}
        atomic_write(out / "results.json", lambda f: json.dump(summary, f, indent=2), mode="w")
        for task, preds in predictions.items():
            lines = "".join(json.dumps(p) + "\n" for p in preds)
            atomic_write(out / f"{task}.jsonl", lambda f: f.write(lines), mode="w")
        print(f"\nwrote {out / 'results.json'} and per-item predictions beside it")
    return results


if __name__ == "__main__":
    main()
