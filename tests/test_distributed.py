"""FSDP on CPU: two processes under torchrun with Gloo, against one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def torchrun(script, *args, nproc=2, timeout=180):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(script), *map(str, args)]
    result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_sharded_base_equals_the_whole_one_and_each_rank_holds_half(tmp_path):
    """Each rank reads only its own rows of every weight, holds about half the bytes, and the
    sharded model gives the whole model's logits and the Aligner's gradients (Meta shards: 2)."""
    make_checkpoint(tmp_path / "tiny", n_shards=2)
    torchrun(ROOT / "tests" / "fsdp_checks.py", tmp_path / "tiny", tmp_path / "report.json")
    reports = json.loads((tmp_path / "report.json").read_text())
    assert len(reports) == 2
    for r in reports:
        assert r["requests_within_own_rows"] and r["n_requests"] > 0
        assert 0.45 < r["local_bytes"] / r["whole_bytes"] <= 0.55
        assert r["base"] < 1e-5
        for n in (1, 3):
            assert max(r[f"N={n}"]) < 1e-5, r
            assert r[f"N={n} gates moved"] > 0
