"""
The question files of the paper's GPT-4-judged evaluations, and the answer files that the judges read.

The paper judges answers with GPT-4 in three places: the Vicuna benchmark's 80
questions, pairwise (Table 2: win/loss/tie and the adjusted win rate) and one
answer at a time (Table 3: a score out of 10), both after "Chiang et al., 2023";
and the PKU Beaver safety prompts, by category (Fig. 3). The judge runs outside
this project; generate.py reads the question files as they are published and
writes answers as the public judge scripts read them.

Question files, each record told apart by its keys (data.read_records: JSON
Lines, or one JSON list):

- FastChat's LLM-as-a-judge (lm-sys/FastChat, fastchat/llm_judge/data/vicuna_bench/question.jsonl
  and fastchat/llm_judge/data/mt_bench/question.jsonl): {"question_id": int, "category": str,
  "turns": [str, ...]}. Vicuna's questions have one turn; MT-bench's 80 have two, and some a
  "reference" (read by the judge, not here).
- the Vicuna evaluation that llm_judge replaced (fastchat/eval/table/question.jsonl, removed
  from FastChat in commit a0ba8c97, "Deprecate old evaluation package"): {"question_id", "text",
  "category"}. Its 80 questions are vicuna_bench's, id for id, text for text and category for category.
- the Beaver safety prompts (PKU-Alignment/safe-rlhf, safe_rlhf/evaluate/gpt4/problem.json): one
  JSON list of {"prompt", "category"}, 83 prompts in 8 categories ("Social Bias", "Crime", ...).
  The Aligner authors' generate/aligner.py reads a JSON list of {"prompt", optional "input"}
  (its data/evaluation/beaver_safety_eval_questions.json, not in their repository): the same keys.
- Alpaca's {"instruction", optional "input"}, as generate.py has always read.

A file whose name ends in neither .json nor .jsonl holds one instruction per
line. All records of a file are of one kind. A question's id is the file's own
"question_id", kept as the file writes it (an int in FastChat's files); records
without one (the Beaver prompts, Alpaca's, plain lines) are numbered from 1 in
file order, as FastChat numbers its questions (our choice).

Answer files, one per model id, each record in the question file's order:

- FastChat llm_judge's model answers (fastchat/llm_judge/gen_model_answer.py writes them,
  common.py's load_model_answers reads data/<bench>/model_answer/<model id>.jsonl, keyed by
  question_id, and the judge reads choices[0]["turns"][t] for turn t):
  {"question_id", "answer_id": str, "model_id": str, "choices": [{"index": 0, "turns": [str, ...]}],
  "tstamp": float}.
- for the older Vicuna question file, the older answers that fastchat/eval/eval_gpt_review.py
  reads (written by fastchat/eval/get_model_answer.py; the review pairs the i-th answer of two
  files with the i-th question and asserts their question_ids agree):
  {"question_id", "text", "answer_id", "model_id", "metadata": {}}.

Answers to any other file (the Beaver prompts among them) are llm_judge's
records; question_file writes the question.jsonl that FastChat's judge needs
beside them. safe-rlhf's own GPT-4 evaluation (safe_rlhf/evaluate/gpt4/eval.py)
reads no answer file: it generates both models' answers itself, from Hugging
Face checkpoints, before it asks GPT-4.

Both scripts open these files with Python's default encoding, so the answers are
written as ASCII JSON (non-ASCII characters as \\u escapes), as FastChat's own
json.dumps writes them. An answer is the generated text stripped of surrounding
whitespace, as gen_model_answer.py and the authors' generate/aligner.py strip
theirs. answer_id is a random UUID's hex (FastChat draws a shortuuid; the judges
only copy it).

Multi-turn questions (MT-bench): our templates hold one instruction, so a later
turn is prompted with the conversation so far, in the template turn by turn:
the previous turn's prompt, its answer, a blank line, then the new turn in the
template (next_turn_prompt). FastChat's gen_model_answer.py likewise prompts a
second turn with the first turn's question and answer before it.
"""

import json
import re
import time
import uuid
from pathlib import Path
from typing import NamedTuple

from support.data import DataError, format_prompt, read_records
from support.files import read_text

# the kinds of question file; the kind decides the answer format
LLM_JUDGE = "FastChat llm_judge"   # {"question_id", "category", "turns"}
VICUNA_EVAL = "FastChat eval"      # {"question_id", "text", "category"}
BEAVER = "Beaver"                  # {"prompt", optional "input", "category"}
ALPACA = "Alpaca"                  # {"instruction", optional "input"}
LINES = "plain text"               # one instruction per line

KINDS = {  # the key that tells a record's kind, in the order they are tried
    "turns": LLM_JUDGE, "text": VICUNA_EVAL, "prompt": BEAVER, "instruction": ALPACA}


class Question(NamedTuple):
    """One question: its turns (one, or MT-bench's two) and where it came from."""
    turns: tuple        # the user's turns, each an instruction for the template
    input: str          # Alpaca's and the authors' optional input, with the first turn
    source: str         # for messages: 'vicuna.jsonl, line 7' or '--prompt 2'
    question_id: object = None  # as the file writes it (int in FastChat's files), else its position from 1
    category: str = ""
    kind: str = LINES

    @property
    def instruction(self) -> str:
        return self.turns[0]


# -----------------------------------------------------------------------------
# reading

def read_questions(path) -> list:
    """The questions of a file of any kind above; a bad record stops with its file and line."""
    path = Path(path)
    if path.suffix not in (".json", ".jsonl"):
        return plain_questions(path)
    questions = []
    for where, record in read_records(path):
        question = question_of(path, where, record, position=len(questions) + 1)
        if questions and question.kind != questions[0].kind:
            raise DataError(f"{path}, {where}: a {question.kind} record in a file whose first record is "
                            f"{questions[0].kind}'s; one file holds one kind")
        questions.append(question)
    if not questions:
        raise DataError(f"{path}: no prompts in this file")
    return questions


def plain_questions(path: Path) -> list:
    """One instruction per non-empty line, numbered from 1."""
    questions = []
    for number, line in enumerate(read_text(path, "prompts file").splitlines(), 1):
        if line.strip():
            questions.append(Question((line,), "", f"{path}, line {number}", len(questions) + 1))
    if not questions:
        raise DataError(f"{path}: no prompts in this file")
    return questions


def question_of(path, where, record, position: int) -> Question:
    """One record read by its keys (KINDS); `position` (from 1) is its id where it has none."""
    source = f"{path}, {where}"
    if not isinstance(record, dict):
        raise DataError(f"{source}: expected a JSON object, got {type(record).__name__}")
    kind = next((KINDS[key] for key in KINDS if key in record), None)
    if kind is None:
        raise DataError(f"{source}: expected the keys of FastChat llm_judge (question_id, category, turns), "
                        f"the FastChat eval (question_id, text, category), the Beaver prompts (prompt, category) "
                        f"or Alpaca (instruction, input); the record has {sorted(record)}")
    category = optional_string(source, record, "category")
    if kind == LLM_JUDGE:
        turns = record["turns"]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise DataError(f"{source}: \"turns\" must be a non-empty list of strings")
        return Question(tuple(turns), "", source, question_id(source, record), category, kind)
    if kind == VICUNA_EVAL:
        return Question((string(source, record, "text"),), "", source, question_id(source, record), category, kind)
    key = "prompt" if kind == BEAVER else "instruction"
    return Question((string(source, record, key),), optional_string(source, record, "input"), source,
                    position, category, kind)


def string(source: str, record: dict, key: str) -> str:
    if not isinstance(record[key], str):
        raise DataError(f"{source}: {key!r} must be a string, not {type(record[key]).__name__}")
    return record[key]


def optional_string(source: str, record: dict, key: str) -> str:
    """record[key], or "" where it is missing or null."""
    if record.get(key) is None:
        return ""
    return string(source, record, key)


def question_id(source: str, record: dict):
    """FastChat's question_id, an int (or a string), kept as it is: the judges match answers to questions by it."""
    if "question_id" not in record:
        raise DataError(f"{source}: missing key 'question_id' (the record has {sorted(record)})")
    qid = record["question_id"]
    if isinstance(qid, bool) or not isinstance(qid, (int, str)):
        raise DataError(f"{source}: 'question_id' must be an integer or a string, not {qid!r}")
    return qid


def check_unique_ids(questions: list):
    """Stop where two questions share an id: a judge would keep only one of their answers."""
    seen = {}
    for q in questions:
        if q.question_id in seen:
            raise DataError(f"question_id {q.question_id!r} is given twice ({seen[q.question_id]} and {q.source}); "
                            "a judge matches answers to questions by their ids")
        seen[q.question_id] = q.source


# -----------------------------------------------------------------------------
# conversations

def next_turn_prompt(previous_prompt: str, answer: str, turn: str, template: str) -> str:
    """The prompt of a conversation's next turn: the previous turn's prompt, its answer, a blank
    line, then the new turn in the template (our choice; see the module docstring).

    The answer follows the prompt after one space: a trained Aligner saw each response's first
    word start a new word after the prompt (data.encode_example), and a prompt's own trailing
    spaces (the beaver and metamath formats) fold into that one.
    """
    return f"{previous_prompt.rstrip(' ')} {answer}\n\n{format_prompt(turn, template=template)}"


# -----------------------------------------------------------------------------
# model ids and answer files

def check_model_ids(ids: list, flag: str = "--model-id"):
    """Each id names a file <id>.jsonl that the judges find by a glob of *.jsonl: not empty, no
    folder in it, not hidden (a glob skips names that start with '.'), and no two alike."""
    for model_id in ids:
        if not model_id or model_id.startswith(".") or re.search(r"[/\\\x00]", model_id):
            raise ValueError(f"{flag}: {model_id!r} cannot name an answer file <id>.jsonl; "
                             "use letters, digits, '-', '_' and '.', not first")
    repeated = sorted({m for m in ids if ids.count(m) > 1})
    if repeated:
        raise ValueError(f"{flag}: the model id {repeated[0]!r} is given to two models; "
                         "name each --aligner with its own --model-id")


def answers_path(folder, model_id: str) -> Path:
    """Where a model's answers go: <folder>/<model id>.jsonl, as llm_judge's data/<bench>/model_answer/ holds them."""
    return Path(folder) / f"{model_id}.jsonl"


def llm_judge_answer(question: Question, model_id: str, turns: list) -> dict:
    """One record of FastChat llm_judge's model_answer/<model id>.jsonl."""
    return {"question_id": question.question_id, "answer_id": uuid.uuid4().hex, "model_id": model_id,
            "choices": [{"index": 0, "turns": [t.strip() for t in turns]}], "tstamp": time.time()}


def vicuna_eval_answer(question: Question, model_id: str, turns: list) -> dict:
    """One record of the answer files that fastchat/eval/eval_gpt_review.py reads."""
    return {"question_id": question.question_id, "text": turns[0].strip(), "answer_id": uuid.uuid4().hex,
            "model_id": model_id, "metadata": {}}


def answer_files(folder, questions: list, model_ids: list, answers: list) -> dict:
    """{path: text} of one answer file per model: answers[k][i] holds model k's answers to question i,
    turn by turn. The older Vicuna records where every question comes from that file, llm_judge's otherwise."""
    record = vicuna_eval_answer if all(q.kind == VICUNA_EVAL for q in questions) else llm_judge_answer
    return {answers_path(folder, model_id): jsonl(record(q, model_id, turns) for q, turns in zip(questions, per_model))
            for model_id, per_model in zip(model_ids, answers)}


def question_file(questions: list) -> str:
    """The questions as FastChat llm_judge's question.jsonl ({"question_id", "category", "turns"}), with the
    ids the answers carry: the file a judge needs for prompts published without one (the Beaver prompts).
    A first turn's input follows it after a blank line."""
    return jsonl({"question_id": q.question_id, "category": q.category,
                  "turns": [q.turns[0] + (f"\n\n{q.input}" if q.input else ""), *q.turns[1:]]} for q in questions)


def jsonl(records) -> str:
    """JSON Lines in ASCII, as FastChat writes its own (json.dumps' default), so any locale reads them."""
    return "".join(json.dumps(r) + "\n" for r in records)
