"""What a newcomer meets first: the demo's pipeline as docs/demo.md prints it and run_demo.py runs it, the demo's
generate.py, names that tell files apart, progress that reads as progress, counts in the
right number, and the shipped demo files tracked by git.
"""

import io
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import analyze
from support import cli
import evaluate
import generate
import run_demo
from aligner import Aligner
from support.data import DEMO_CKPT
from llama import ModelArgs
from support.formats import read_params
from test_errors import model_args, run_script  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


def test_the_demo_pages_pipeline_block_holds_run_demos_commands_and_no_others():
    page = (ROOT / "docs" / "demo.md").read_text()
    block = page.split("The pipeline, as `python run_demo.py` runs it")[1].split("```bash\n")[1].split("```")[0]
    assert block.strip().splitlines() == run_demo.listing().splitlines()


def demo_aligner(folder: Path) -> Path:
    """An Aligner for the demo model where the quick start saves one, runs/sft/best.pt under `folder`."""
    torch.manual_seed(0)
    aligner = Aligner(ModelArgs(**read_params(DEMO_CKPT)), n_tokens=1)
    aligner.gates.data += 0.5
    path = folder / "runs" / "sft" / "best.pt"
    path.parent.mkdir(parents=True)
    aligner.save(path)
    return path


def test_the_demos_generate_shows_the_base_beside_the_quick_starts_aligner(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_script(generate, ["--max-new-tokens", "3"], capsys)
    assert code == 0, err
    assert "`python train_sft.py` trains an Aligner into runs/sft/best.pt" in err
    assert "--- base ---" not in out  # the base model alone
    demo_aligner(tmp_path)
    code, out, err = run_script(generate, ["--max-new-tokens", "3", "--out", "answers.jsonl"], capsys)
    assert code == 0, err
    assert "beside the Aligner in runs/sft/best.pt" in err
    assert "--- base ---" in out and "--- sft-best ---" in out
    assert "wrote 2 answers to answers.jsonl" in err
    code, out, err = run_script(generate, ["--max-new-tokens", "3", "--aligner", "base"], capsys)
    assert code == 0 and "--- sft-best ---" not in out  # an --aligner given is what runs


def test_a_runs_best_pt_is_named_by_its_run_folder(model_args, tmp_path):
    assert generate.aligner_names(["runs/sft10/best.pt"]) == ["sft10-best"]
    assert generate.aligner_names(["base", "runs/sft/epoch-2.pt", "out/aligner.pt"]) == ["base", "sft-epoch-2",
                                                                                        "aligner"]
    paths = []
    for run in ("sft1", "sft10"):
        (tmp_path / run).mkdir()
        Aligner(model_args, n_tokens=1).save(tmp_path / run / "best.pt")
        paths.append(tmp_path / run / "best.pt")
    files = analyze.read_files(paths)
    assert [analyze.legend_name(f) for f in files] == ["[1] sft1-best", "[2] sft10-best"]
    text, _ = analyze.gates_report(files)
    assert text.splitlines()[-3].endswith("   sft1-best") and text.splitlines()[-2].endswith("   sft10-best")


def test_a_log_gets_a_progress_line_at_least_every_ten_seconds():
    now = [0.0]
    log = io.StringIO()
    bar = cli.Progress(1000, "evaluating mmlu [base]", file=log, unit="questions", clock=lambda: now[0])
    bar.update(1)
    assert log.getvalue() == ""  # 0.1% done after no time at all
    now[0] = 10.0
    bar.update(1)
    now[0] = 15.0
    bar.update(1)
    assert log.getvalue() == "evaluating mmlu [base]: 2/1000 questions (0%)\n"
    bar.update(47)
    assert log.getvalue().splitlines()[-1] == "evaluating mmlu [base]: 50/1000 questions (5%)"


def test_evaluates_result_rows_stay_aligned_with_long_names(capsys):
    rows = {"base": {"accuracy": 0.5, "starts": 0.5, "n": 2},
            "runs/a-very-long-folder-name-for-a-run/best.pt": {"accuracy": 1.0, "starts": 1.0, "n": 2}}
    evaluate.print_table("qa", {"demo/qa.jsonl": {"info": {}, "rows": rows}})
    lines = [line for line in capsys.readouterr().out.splitlines() if "exact match" in line]
    assert len({line.index("exact match") for line in lines}) == 1, lines


def test_counts_take_the_right_number():
    assert [cli.plural(n, "answer") for n in (0, 1, 2)] == ["0 answers", "1 answer", "2 answers"]
    assert cli.plural(1, "temporary file") == "1 temporary file"


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs git and a checkout")
def test_no_tracked_file_is_ignored():
    """.gitignore must not hide a file the project ships (demo/tokenizer.model among them)."""
    ignored = subprocess.run(["git", "ls-files", "--cached", "--ignored", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    assert ignored == []
    assert "demo/tokenizer.model" in subprocess.run(["git", "ls-files", "demo"], cwd=ROOT, capture_output=True,
                                                    text=True, check=True).stdout.split()
