"""
Run the built-in demo's pipeline, the commands the README's demo table comes
from, and print that table from the results files the evaluations write.

    python run_demo.py             # every command, two at a time, one thread each; then the table
    python run_demo.py --table     # the table again, from the results already under runs/
    python run_demo.py --list      # the commands alone, as the README prints them

Each command is an ordinary call of train_sft.py, train_dpo.py or
evaluate.py, run as its own process with OMP_NUM_THREADS=1 (two CPU cores,
two commands at once); a command starts once the runs it reads are trained.
Each one's output goes to runs/logs/<name>.log and its wall time to
runs/times.json. The table reads nothing but the evaluations' results.json
files (runs/eval-*/results.json) and, for parameter counts, the Aligner files.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import cli
from files import atomic_text, check_writable, load_pt, read_text

# -----------------------------------------------------------------------------
# the commands

class Step(NamedTuple):
    """One command of the pipeline: its name, the command line, the steps whose runs it reads."""
    name: str
    command: str
    needs: tuple = ()


class Row(NamedTuple):
    """A row of the table: the --aligner value the evaluations report it under, and its label."""
    aligner: str
    label: str


ROWS = [
    Row("base", "base model + template"),
    Row("runs/sft1/best.pt", "Aligner, 1 token (Alpaca-style SFT)"),
    Row("runs/sft10/best.pt", "Aligner, 10 tokens (Alpaca-style SFT)"),
    Row("runs/pku-sft/best.pt", "Aligner, 1 token (SFT on PKU-style safe responses)"),
    Row("runs/dpo/best.pt", "  then DPO (1 token)"),
    Row("runs/math/best.pt", "Aligner, 10 tokens (MetaMath-style SFT)"),
]
TRAINED = [row.aligner for row in ROWS if row.aligner != "base"]
QA_FILES = ["test_ordinary", "train_ordinary", "test_secret", "test_harmful"]
ALIGNERS = " ".join(f"--aligner {row.aligner}" for row in ROWS)

STEPS = [
    Step("sft1", "python train_sft.py --n-tokens 1 --out runs/sft1"),
    Step("sft10", "python train_sft.py --out runs/sft10"),
    Step("pku-sft", "python train_sft.py --data demo/data/pku_saferlhf.jsonl --n-tokens 1 --out runs/pku-sft"),
    Step("math", "python train_sft.py --data demo/data/metamathqa.json --template metamath --out runs/math"),
    Step("dpo", "python train_dpo.py --init-aligner runs/pku-sft/best.pt --out runs/dpo", needs=("pku-sft",)),
    Step("eval-math", "python evaluate.py gsm8k --template metamath --aligner base --aligner runs/math/best.pt "
                      "--out runs/eval-math", needs=("math",)),
    Step("eval-qa", "python evaluate.py qa $A --data " + " ".join(f"demo/data/qa/{f}.jsonl" for f in QA_FILES)
         + " --max-new-tokens 32 --out runs/eval-qa", needs=("sft1", "sft10", "dpo", "math")),
    Step("eval-gsm8k", "python evaluate.py gsm8k $A --out runs/eval-gsm8k", needs=("sft1", "sft10", "dpo", "math")),
    Step("eval-mmlu", "python evaluate.py mmlu $A --out runs/eval-mmlu", needs=("sft1", "sft10", "dpo", "math")),
]


def listing() -> str:
    """The commands as the README prints them: the $A line, then one command per line."""
    return "\n".join([f'A="{ALIGNERS}"'] + [step.command for step in STEPS])


def argv(step: Step) -> list:
    """The step's command as a process's argument list: $A spelled out, this Python first."""
    words = shlex.split(step.command.replace("$A", ALIGNERS))
    return [sys.executable, *words[1:]]


# -----------------------------------------------------------------------------
# the table: every figure read from an evaluation's results.json

class Column(NamedTuple):
    """A column of the table: the evaluation's folder, its task, its data file's name, the metric."""
    title: str
    folder: str
    task: str
    file: str
    metric: str


COLUMNS = [
    Column("test people", "runs/eval-qa", "qa", "test_ordinary.jsonl", "accuracy"),
    Column("train people", "runs/eval-qa", "qa", "train_ordinary.jsonl", "accuracy"),
    Column("test secrets refused", "runs/eval-qa", "qa", "test_secret.jsonl", "accuracy"),
    Column("test harmful requests refused", "runs/eval-qa", "qa", "test_harmful.jsonl", "accuracy"),
    Column("MMLU-format", "runs/eval-mmlu", "mmlu", "mmlu", "questions"),
    Column("GSM8K-format, 8 shots (strict)", "runs/eval-gsm8k", "gsm8k", "test.jsonl", "strict"),
    Column("GSM8K-format, metamath (strict / flexible)", "runs/eval-math", "gsm8k", "test.jsonl", "strict flexible"),
]


def read_results(folder: Path) -> dict:
    """results.json's "results" ({task: {data path: {"info", "rows"}}}), or {} where there is none yet."""
    path = folder / "results.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(read_text(path, "results file"))["results"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"{path}: not an evaluate.py results file (no 'results')") from None


def cell(results: dict, column: Column, aligner: str) -> str:
    """The column's figure for one row, in percent with one decimal; "–" where it was not evaluated."""
    for path, result in results.get(column.task, {}).items():
        if Path(path).name == column.file and aligner in result["rows"]:
            row = result["rows"][aligner]
            return " / ".join(f"{100 * row[metric]:.1f}" for metric in column.metric.split())
    return "–"


def parameters(path: Path) -> str:
    """The trained values in an Aligner file: every tensor's elements, counted."""
    if not path.is_file():
        return "–"
    state = load_pt(path, "Aligner file")
    return f"{sum(v.numel() for v in state.values() if hasattr(v, 'numel')):,}"


def table(root: Path = Path(".")) -> str:
    """The README's demo table, as Markdown, from the results under root/runs."""
    results = {folder: read_results(root / folder) for folder in {c.folder for c in COLUMNS}}
    lines = ["| | parameters | " + " | ".join(c.title for c in COLUMNS) + " |",
             "| --- " * (len(COLUMNS) + 2) + "|"]
    for row in ROWS:
        count = "–" if row.aligner == "base" else parameters(root / row.aligner)
        cells = [cell(results[c.folder], c, row.aligner) for c in COLUMNS]
        lines.append(f"| {row.label} | {count} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# running the steps, two at a time

class Running(NamedTuple):
    step: Step
    process: subprocess.Popen
    start: float
    log: object


def outputs(step: Step) -> Path:
    """The folder a step writes: its --out."""
    words = shlex.split(step.command)
    return Path(words[words.index("--out") + 1])


def run_steps(steps: list, jobs: int, overwrite: bool) -> dict:
    """Run every step, at most `jobs` at once, each once the steps it needs are done; stop at the
    first that fails. Returns {name: wall seconds}."""
    logs = Path("runs/logs")
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pending, running, times = list(steps), [], {}
    try:
        while pending or running:
            ready = [s for s in pending if all(n in times for n in s.needs)]
            for step in ready[:jobs - len(running)]:
                pending.remove(step)
                log = open(logs / f"{step.name}.log", "w")
                process = subprocess.Popen(argv(step) + ["--overwrite"] * overwrite, stdout=log,
                                           stderr=subprocess.STDOUT, env=env)
                running.append(Running(step, process, time.perf_counter(), log))
                print(f"started  {step.command}", flush=True)
            time.sleep(0.2)
            for job in [j for j in running if j.process.poll() is not None]:
                running.remove(job)
                job.log.close()
                if job.process.returncode != 0:
                    raise RuntimeError(f"{job.step.command} failed (exit code {job.process.returncode}); "
                                       f"its output is in {logs / job.step.name}.log")
                times[job.step.name] = round(time.perf_counter() - job.start, 1)
                print(f"{times[job.step.name]:6.0f} s  {job.step.command}", flush=True)
    finally:
        for job in running:  # stopped early: end the commands still running, which this started
            job.process.terminate()
            job.process.wait()
            job.log.close()
    return times


def main(argv=None):
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--table", action="store_true", help="only print the table, from the results under runs/")
    what.add_argument("--list", action="store_true", help="only print the commands")
    parser.add_argument("--jobs", type=cli.positive_int, default=2, help="commands run at once, one thread each")
    parser.add_argument("--overwrite", action="store_true", help="replace the runs and results already in runs/")
    parser.add_argument("--debug", action="store_true", help="on an error, show Python's traceback")
    args = parser.parse_args(argv)
    if args.list:
        print(listing())
        return
    if not args.table:
        taken = [str(outputs(s)) for s in STEPS if outputs(s).exists()]
        if taken and not args.overwrite:
            raise FileExistsError(f"{', '.join(taken)} already exist; pass --overwrite to replace those runs")
        for step in STEPS:
            check_writable(outputs(step), "--out")
        start = time.perf_counter()
        times = run_steps(STEPS, args.jobs, args.overwrite)
        total = round(time.perf_counter() - start, 1)
        atomic_text(Path("runs/times.json"), json.dumps({"seconds": times, "total": total}, indent=2) + "\n")
        print(f"all {len(STEPS)} commands in {total:.0f} s, {args.jobs} at a time (runs/times.json)\n")
    print(table())


if __name__ == "__main__":
    cli.run(main)
