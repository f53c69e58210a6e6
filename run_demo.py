"""
Run the built-in demo's pipeline, the commands the README's demo table comes
from, and print that table from the results files the evaluations write.

    python run_demo.py             # every command, two at a time, one thread each; then the table
    python run_demo.py --table     # the table again, from the results already under runs/
    python run_demo.py --list      # the commands alone, as docs/demo.md prints them

Each command is an ordinary call of train_sft.py, train_dpo.py, evaluate.py
or analyze.py, run as its own process with OMP_NUM_THREADS=1 (two CPU cores,
two commands at once); a command starts once the runs it reads are trained.
Each one's output goes to runs/logs/<name>.log and its wall time to
runs/times.json. The tables read nothing but the evaluations' results.json
files (runs/eval-*/results.json), the analysis's runs/gates.json and, for
parameter counts, the trained files.
"""

import support.startup  # noqa: F401  first: Ctrl-C while torch loads ends in one line too (startup.py)

import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

from support import cli
from support.files import atomic_text, check_writable, load_pt, read_text

# -----------------------------------------------------------------------------
# the commands

class Step(NamedTuple):
    """One command of the pipeline: its name, the command line, the steps whose runs it reads."""
    name: str
    command: str
    needs: tuple = ()


class Row(NamedTuple):
    """A row of the table: the --aligner value the evaluations report it under, its label, and whether
    it has gates for analyze.py gates (an Aligner or LLaMA-Adapter; a LoRA or Prompt Tuning has none)."""
    aligner: str
    label: str
    gated: bool = True


ROWS = [
    Row("base", "base model + template"),
    Row("runs/sft1/best.pt", "Aligner, 1 token: Alpaca-style SFT"),
    Row("runs/sft10/best.pt", "Aligner, 10 tokens: Alpaca-style SFT"),
    Row("runs/adapter10/best.pt", "LLaMA-Adapter, 10 tokens per layer: Alpaca-style SFT"),
    Row("runs/lora8/best.pt", "LoRA, r = 8 on wq and wv: Alpaca-style SFT", gated=False),
    Row("runs/pt1/best.pt", "Prompt Tuning, 1 soft token: Alpaca-style SFT", gated=False),
    Row("runs/pt10/best.pt", "Prompt Tuning, 10 soft tokens: Alpaca-style SFT", gated=False),
    Row("runs/pku-sft/best.pt", "Aligner, 1 token: SFT on the PKU-style rows' safe responses"),
    Row("runs/dpo/best.pt", "Aligner, 1 token: Alpaca-style SFT, then DPO on the PKU-style rows"),
    Row("runs/lora4/best.pt", "LoRA, r = 4 on wq and wv: Alpaca-style SFT", gated=False),
    Row("runs/dpo-lora/best.pt", "LoRA, r = 4: that SFT, then DPO on the PKU-style rows, the Aligner's settings",
        gated=False),
    Row("runs/dpo-lora-own/best.pt", "LoRA, r = 4: that SFT, then DPO on the PKU-style rows, its own settings",
        gated=False),
    Row("runs/math/best.pt", "Aligner, 10 tokens: MetaMath-style SFT"),
    Row("runs/math-lora/best.pt", "LoRA, r = 8 on wq and wv: MetaMath-style SFT", gated=False),
    Row("runs/know1/best.pt", "Aligner, 1 token: SFT on the knowledge rows"),
    Row("runs/know10/best.pt", "Aligner, 10 tokens: SFT on the knowledge rows"),
    Row("runs/know-lora/best.pt", "LoRA, r = 8 on wq and wv: SFT on the knowledge rows", gated=False),
]
GATED = [row for row in ROWS if row.gated and row.aligner != "base"]  # the rows analyze.py gates reads
QA_FILES = ["test_ordinary", "train_ordinary", "test_secret", "test_harmful", "knowledge_test"]
ALIGNERS = " ".join(f"--aligner {row.aligner}" for row in ROWS)

TRAINING = ("sft1", "sft10", "adapter10", "lora8", "pt1", "pt10", "pku-sft", "dpo", "lora4", "dpo-lora",
            "dpo-lora-own", "math", "math-lora", "know1", "know10", "know-lora")  # the steps whose files the rows are
MATH = "--data demo/data/metamathqa.json --template metamath --epochs 32"  # the Aligner's and the LoRA's alike
KNOW = "--data demo/data/knowledge.json --epochs 64"  # facts no pretraining document holds, learned or not
# The Aligner's DPO settings, chosen on the dev split, also given to the LoRA: each response scored on
# its first token alone (--max-response-len 1), under IPO's bounded loss
DPO = "--precompute-ref --batch-size 16 --epochs 4 --loss ipo --beta 0.1 --lr 3.5e-3 --max-response-len 1"
# The LoRA's own, chosen on dev: each response scored on its first two tokens
DPO_LORA = "--precompute-ref --batch-size 16 --epochs 5 --beta 1 --lr 2.75e-4 --max-response-len 2"
STEPS = [  # started in this order where their needs allow: the MetaMath trainings, among the longest, first
    Step("math", f"python train_sft.py {MATH} --out runs/math"),
    Step("math-lora", f"python train_sft.py --lora {MATH} --out runs/math-lora"),
    Step("sft1", "python train_sft.py --n-tokens 1 --out runs/sft1"),
    Step("sft10", "python train_sft.py --out runs/sft10"),
    Step("adapter10", "python train_sft.py --llama-adapter --out runs/adapter10"),
    Step("lora8", "python train_sft.py --lora --out runs/lora8"),
    Step("pt1", "python train_sft.py --prompt-tuning --n-tokens 1 --out runs/pt1"),
    Step("pt10", "python train_sft.py --prompt-tuning --out runs/pt10"),
    Step("lora4", "python train_sft.py --lora --lora-rank 4 --out runs/lora4"),
    Step("pku-sft", "python train_sft.py --data demo/data/pku_saferlhf.jsonl --n-tokens 1 --out runs/pku-sft"),
    Step("know1", f"python train_sft.py {KNOW} --n-tokens 1 --out runs/know1"),
    Step("know10", f"python train_sft.py {KNOW} --out runs/know10"),
    Step("know-lora", f"python train_sft.py --lora {KNOW} --out runs/know-lora"),
    Step("dpo", f"python train_dpo.py --init-aligner runs/sft1/best.pt {DPO} --out runs/dpo", needs=("sft1",)),
    Step("dpo-lora", f"python train_dpo.py --init-aligner runs/lora4/best.pt {DPO} --out runs/dpo-lora", needs=("lora4",)),
    Step("dpo-lora-own", f"python train_dpo.py --init-aligner runs/lora4/best.pt {DPO_LORA} --out runs/dpo-lora-own",
         needs=("lora4",)),
    Step("eval-math", "python evaluate.py gsm8k --template metamath --aligner base --aligner runs/math/best.pt "
                      "--aligner runs/math-lora/best.pt --out runs/eval-math", needs=("math", "math-lora")),
    Step("eval-qa", "python evaluate.py qa $A --data " + " ".join(f"demo/data/qa/{f}.jsonl" for f in QA_FILES)
         + " --max-new-tokens 32 --out runs/eval-qa", needs=TRAINING),
    Step("eval-gsm8k", "python evaluate.py gsm8k $A --paper --out runs/eval-gsm8k", needs=TRAINING),
    Step("eval-mmlu", "python evaluate.py mmlu $A --paper --out runs/eval-mmlu", needs=TRAINING),
    Step("gates", "python analyze.py gates " + " ".join(row.aligner for row in GATED) + " --json runs/gates.json",
         needs=TRAINING),
]


def listing() -> str:
    """The commands as docs/demo.md prints them: the $A line, then one command per line."""
    return "\n".join([f'A="{ALIGNERS}"'] + [step.command for step in STEPS])


def argv(step: Step) -> list:
    """The step's command as a process's argument list: $A spelled out, this Python first."""
    words = shlex.split(step.command.replace("$A", ALIGNERS))
    return [sys.executable, *words[1:]]


# -----------------------------------------------------------------------------
# running the steps, two at a time

class Running(NamedTuple):
    step: Step
    process: subprocess.Popen
    start: float
    log: object


def outputs(step: Step) -> Path:
    """What a step writes: its --out folder (the trainings and evaluations) or its --json file (the analysis)."""
    words = shlex.split(step.command)
    flag = "--out" if "--out" in words else "--json"
    return Path(words[words.index(flag) + 1])


class Terminated(Exception):
    """SIGTERM reached this process (a scheduler's, `kill`'s): the running commands are ended first."""


def terminate(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the commands' ending short
    raise Terminated


def run_steps(steps: list, jobs: int, overwrite: bool) -> dict:
    """Run every step, at most `jobs` at once, each once the steps it needs are done; stop at the
    first that fails. Returns {name: wall seconds}. Stopped early (a failure, Ctrl-C, SIGTERM), it
    passes SIGTERM on to the commands still running and waits for them to end: a training saves
    its state first (trainer.stop_requests), so that --resume continues it."""
    logs = Path("runs/logs")
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pending, running, times = list(steps), [], {}
    previous = signal.signal(signal.SIGTERM, terminate)
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
    except Terminated:
        names = ", ".join(job.step.name for job in running) or "none"
        raise Terminated(f"terminated (SIGTERM): passed it on to the commands still running ({names}), "
                         f"waited for them to end; their output is in {logs}") from None
    finally:
        for job in running:  # stopped early: end the commands still running, which this started
            job.process.terminate()
            job.process.wait()
            job.log.close()
        signal.signal(signal.SIGTERM, previous)
    return times


def cpu_name() -> str:
    """The processor's model name as Linux reports it (/proc/cpuinfo), else what Python knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_pipeline(jobs: int, overwrite: bool):
    """Run every step (run_steps), after checking that no run already in runs/ is replaced
    unasked; write their times and the machine's to runs/times.json."""
    taken = [str(outputs(s)) for s in STEPS if outputs(s).exists()]
    if taken and not overwrite:
        raise FileExistsError(f"{', '.join(taken)} already exist; pass --overwrite to replace those runs")
    for step in STEPS:
        check_writable(outputs(step), "--out", folder="--out" in step.command)
    start, load_before = time.perf_counter(), os.getloadavg()
    try:
        times = run_steps(STEPS, jobs, overwrite)
    except Terminated as e:
        cli.say(f"run_demo.py: {e}")
        cli.leave(128 + signal.SIGTERM)  # the shell's code for a process that SIGTERM ended
    total = round(time.perf_counter() - start, 1)
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "load_average_before": load_before,
               "load_average_after": os.getloadavg()}  # what the times depend on: other work slows them
    atomic_text(Path("runs/times.json"), json.dumps({"seconds": times, "total": total, "machine": machine},
                                                    indent=2) + "\n")
    print(f"all {len(STEPS)} commands in {total:.0f} s, {jobs} at a time (runs/times.json)\n")


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
    Column("test people (exact / fact first)", "runs/eval-qa", "qa", "test_ordinary.jsonl", "accuracy starts"),
    Column("train people", "runs/eval-qa", "qa", "train_ordinary.jsonl", "accuracy"),
    Column("test secrets refused", "runs/eval-qa", "qa", "test_secret.jsonl", "accuracy"),
    Column("test harmful requests refused (exact / refusal first)", "runs/eval-qa", "qa", "test_harmful.jsonl",
           "accuracy starts"),
    Column("test knowledge probe (exact / fact first)", "runs/eval-qa", "qa", "knowledge_test.jsonl",
           "accuracy starts"),
    Column("MMLU-format, 1 shot", "runs/eval-mmlu", "mmlu", "mmlu", "questions"),
    Column("GSM8K-format, 1 shot (strict)", "runs/eval-gsm8k", "gsm8k", "test.jsonl", "strict"),
    Column("GSM8K-format, metamath template, 0 shots (strict / flexible / #### form)", "runs/eval-math", "gsm8k",
           "test.jsonl", "strict flexible strict_found"),
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


def gates_table(root: Path = Path(".")) -> str:
    """The gates' spread by layer (analyze.py gates, Appendix D.1), as Markdown, from root/runs/gates.json:
    per trained row, the std of its gates over the heads of each adapted layer, the top third's mean
    std over the bottom third's, and Spearman's rho between layer and std."""
    path = root / "runs" / "gates.json"
    if not path.is_file():
        return f"(no {path} yet)"
    try:
        by_path = {entry["path"]: entry for entry in json.loads(read_text(path, "gates file"))}
        layers = next(iter(by_path.values()))["layers"]
    except (json.JSONDecodeError, KeyError, TypeError, StopIteration):
        raise ValueError(f"{path}: not an analyze.py gates --json file") from None
    lines = ["| | " + " | ".join(f"layer {layer}" for layer in layers) + " | top / bottom third | Spearman |",
             "| --- " * (len(layers) + 3) + "|"]
    for row in GATED:
        entry = by_path.get(row.aligner)
        if entry is None:
            continue
        trend = [entry["trend"][key] for key in ("ratio", "spearman")]  # None where too few layers for one
        cells = [f"{std:.3f}" for std in entry["layer_std"]] + ["–" if x is None else f"{x:.2f}" for x in trend]
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = cli.ArgumentParser(description=__doc__)
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
        run_pipeline(args.jobs, args.overwrite)
    print(table())
    print()
    print(gates_table())


if __name__ == "__main__":
    cli.run(main)
