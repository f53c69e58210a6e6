"""The authors' starting prefix: Philox4x32-10 against Random123's known answers, the CPU draw against
the released Aligners, and training from it (--prefix-init authors, --aligner-dtype bfloat16)."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import train_dpo
import train_sft
from aligner import AUTHORS_GPU_THREADS, authors_prefix, box_muller, cuda_normal, philox4x32_10
from test_errors import check_failure, run_script
from test_train_sft import aligner_tensors, run_args, write_task

RELEASED = torch.load(Path(__file__).parent / "data" / "authors_prefixes.pt", weights_only=True)


# -----------------------------------------------------------------------------
# the generator

def test_philox4x32_10_gives_random123s_known_answers():
    """The three philox4x32 10 lines of Random123's tests/kat_vectors: counter, key, output words."""
    kat = [((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
            (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)),
           ((0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff), (0xffffffff, 0xffffffff),
            (0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd)),
           ((0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), (0xa4093822, 0x299f31d0),
            (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1))]
    for counter, key, words in kat:
        assert tuple(int(w) for w in philox4x32_10(counter, key)) == words
    key = kat[2][1]
    counters = [np.array([c[i] for c, _, _ in kat], dtype=np.uint64) for i in range(4)]  # three at once
    one_by_one = [philox4x32_10(c, key) for c, _, _ in kat]
    assert [[int(w) for w in words] for words in philox4x32_10(counters, key)] == \
        [[int(words[i]) for words in one_by_one] for i in range(4)]


def test_box_muller_is_the_float64_formula_to_float32_precision():
    """sqrt(-2 ln u) sin v and cos v, u = (x + 1/2) / 2^32, v = 2 pi (y + 1/2) / 2^32, worked in float64;
    except that u is formed in float32, as curand forms it, so the largest words round u up to 1 and
    give 0."""
    top = np.array([2 ** 32 - 1], dtype=np.uint64)
    assert box_muller(top, top, np.array([True])).tolist() == [0.0]
    words = [(0, 0), (1, 2 ** 31), (0x6627e8d5, 0xe169c58d), (2 ** 31, 2 ** 32 - 1), (12345, 2 ** 30)]
    x, y = (np.array(column, dtype=np.uint64) for column in zip(*words))
    for cosine, trig in ((False, math.sin), (True, math.cos)):
        ours = box_muller(x, y, np.full(len(words), cosine))
        for (a, b), value in zip(words, ours):
            u, v = (a + 0.5) / 2 ** 32, 2 * math.pi * (b + 0.5) / 2 ** 32
            assert value.dtype == np.float32
            assert abs(float(value) - math.sqrt(-2 * math.log(u)) * trig(v)) < 1e-5 * (1 + abs(float(value)))


# -----------------------------------------------------------------------------
# the draw against the authors' released Aligners (tests/data/README.md)

def chance_matches(values: torch.Tensor) -> float:
    """How many of these bf16 values an unrelated N(0, 1) draw, cast to bf16, would hit: the sum over
    them of the probability that a standard normal rounds to each, that is the mass between the
    midpoints to its bf16 neighbours."""
    bits = values.flatten().contiguous().view(torch.int16).to(torch.int32)
    here = values.flatten().double()
    neighbours = [(bits + step).to(torch.int16).view(torch.bfloat16).double() for step in (-1, 1)]
    ends = torch.stack([(here + n) / 2 for n in neighbours])
    lower, upper = ends.min(0).values, ends.max(0).values
    phi = lambda t: 0.5 * (1 + torch.erf(t / math.sqrt(2)))
    return (phi(upper) - phi(lower)).sum().item()


def test_the_released_one_token_aligners_hold_thousands_of_the_draws_values():
    """The seed-1337 CUDA draw of nn.Embedding(1, 4096), made on the CPU, equals the released Alpaca and
    MetaMath Aligners at 3,404 and 2,405 of 4,096 positions, where an unrelated draw would match
    about 4 (3.75 and 4.23 expected; other seeds' draws match 2 to 8)."""
    draw = authors_prefix(1, 4096)
    assert draw.dtype == torch.bfloat16 and draw.shape == (1, 4096)
    for key, at_least in (("alpaca_1token_7b", 3390), ("metamath_1token_7b", 2390)):
        released = RELEASED[key]
        matches = (draw == released).sum().item()
        expected = chance_matches(released)
        assert 3 < expected < 5, (key, expected)
        assert matches >= at_least, (key, matches)
        other_seeds = [(cuda_normal(4096, seed).to(torch.bfloat16) == released.flatten()).sum().item()
                       for seed in (0, 1, 42)]
        assert max(other_seeds) < 20, (key, other_seeds)


def test_the_values_the_two_aligners_share_are_the_draw_left_unmoved():
    """Appendix D.2's "exactly the same" values of the Alpaca and MetaMath Aligners (2,407) are, all but
    two, the starting draw; and they are the large ones, which bf16 steps of the learning rate's
    size cannot move: MetaMath's Aligner kept every value of |v| >= 1 but 2, and none under 0.25."""
    draw = authors_prefix(1, 4096)
    alpaca, metamath = RELEASED["alpaca_1token_7b"], RELEASED["metamath_1token_7b"]
    shared = alpaca == metamath
    assert shared.sum().item() == 2407
    assert (shared & (alpaca == draw)).sum().item() >= 2395
    kept = metamath == draw
    large, small = draw.abs() >= 1, draw.abs() < 0.25
    assert kept[large].float().mean() > 0.99 and kept[small].sum().item() == 0


def test_past_the_gpus_threads_the_draw_strides_over_the_grid():
    """The 300-token Aligner (1,228,800 values) overflows the 129,024 threads of the authors' GPU, so
    each thread makes four values per Philox counter and then takes its next counter: the released
    runs at each such seam match the draw about as often as the first run does (60%), and a layout of
    one counter per value (threads = n) matches beyond the first run only by chance."""
    n = 300 * 4096
    strided = cuda_normal(n, 1337).to(torch.bfloat16)
    flat = cuda_normal(n, 1337, threads=n).to(torch.bfloat16)
    for start, released in zip(RELEASED["metamath_300token_7b_starts"], RELEASED["metamath_300token_7b_runs"]):
        assert (strided[start:start + 1024] == released).float().mean() > 0.5, start
        if start >= AUTHORS_GPU_THREADS:
            assert (flat[start:start + 1024] == released).sum().item() < 20, start


# -----------------------------------------------------------------------------
# training from it

def test_prefix_init_authors_starts_from_the_draw_and_bf16_keeps_the_files_bf16(tiny_ckpt, tmp_path):
    """--prefix-init authors: the initial Aligner (best.pt before any epoch ends) is the draw, whatever
    --seed; with --aligner-dtype bfloat16 the files, the Aligner and AdamW's state stay bf16."""
    task = write_task(tmp_path / "task.json", n=10)
    for seed, dtype in (("0", "float32"), ("5", "bfloat16")):
        out = tmp_path / f"run-{dtype}"
        train_sft.main(run_args(tiny_ckpt, task, out, "--prefix-init", "authors", "--aligner-dtype", dtype,
                                "--seed", seed, "--max-steps", "1"))
        prefix, gates = aligner_tensors(out / "best.pt")
        assert prefix.dtype == gates.dtype == getattr(torch, dtype)
        assert torch.equal(prefix.bfloat16(), authors_prefix(2, 64)), dtype
        state = torch.load(out / "state.pt", weights_only=True)
        assert all(t.dtype == getattr(torch, dtype) for s in state["optimizer"]["state"].values()
                   for k, t in s.items() if k != "step")
        assert json.loads((out / "settings.json").read_text())["aligner_dtype"] == dtype


def test_a_bf16_run_resumes_bit_for_bit(tiny_ckpt, tmp_path):
    """A bf16 run stopped inside its second epoch and resumed ends with the same Aligner files, bit for
    bit, as the one that never stopped."""
    task = write_task(tmp_path / "task.json", n=10)
    flags = ("--prefix-init", "authors", "--aligner-dtype", "bfloat16")
    train_sft.main(run_args(tiny_ckpt, task, tmp_path / "whole", *flags))
    train_sft.main(run_args(tiny_ckpt, task, tmp_path / "parts", *flags, "--max-steps", "3"))
    train_sft.main(run_args(tiny_ckpt, task, tmp_path / "parts", *flags, "--resume"))
    for name in ("epoch-2.pt", "best.pt"):
        for a, b in zip(aligner_tensors(tmp_path / "parts" / name), aligner_tensors(tmp_path / "whole" / name)):
            assert a.dtype == torch.bfloat16 and torch.equal(a, b), name


def test_a_run_recorded_before_these_settings_resumes_as_float32_randn(tiny_ckpt, tmp_path):
    """A run whose state.pt and settings.json predate --prefix-init and --aligner-dtype ran with randn and
    float32: it resumes with the defaults, and is refused with --aligner-dtype bfloat16."""
    task = write_task(tmp_path / "task.json", n=10)
    out = tmp_path / "run"
    train_sft.main(run_args(tiny_ckpt, task, out, "--max-steps", "2"))
    state = torch.load(out / "state.pt", weights_only=True)
    for key in ("prefix_init", "aligner_dtype"):
        del state["settings"][key]
    torch.save(state, out / "state.pt")
    with pytest.raises(ValueError, match=re.escape("--aligner-dtype float32 (now bfloat16)")):
        train_sft.main(run_args(tiny_ckpt, task, out, "--resume", "--aligner-dtype", "bfloat16"))
    train_sft.main(run_args(tiny_ckpt, task, out, "--resume"))
    assert aligner_tensors(out / "epoch-2.pt")[0].dtype == torch.float32


def test_bf16_from_a_shared_start_leaves_many_values_equal_and_float32_none(tiny_ckpt, tmp_path):
    """Section 4.4's finding in miniature: two Aligners trained on different tasks from the authors'
    start share many exactly equal prefix values in bf16, and none in float32, where every step moves
    every value with a gradient."""
    tasks = [write_task(tmp_path / "colors.json", n=12),
             tmp_path / "sums.json"]
    tasks[1].write_text(json.dumps([{"instruction": f"What is {i} plus {i + 1}?", "input": "",
                                     "output": f"It is {2 * i + 1}."} for i in range(12)]))
    equal = {}
    for dtype in ("bfloat16", "float32"):
        prefixes = []
        for task in tasks:
            out = tmp_path / f"{task.stem}-{dtype}"
            train_sft.main(run_args(tiny_ckpt, task, out, "--prefix-init", "authors", "--aligner-dtype", dtype,
                                    "--epochs", "1", "--warmup-epochs", "0", "--lr", "1e-3"))
            prefixes.append(aligner_tensors(out / "epoch-1.pt")[0].float())
        equal[dtype] = (prefixes[0] == prefixes[1]).sum().item()
    assert equal["bfloat16"] >= 64 and equal["float32"] == 0, equal  # of 128


def test_prefix_init_authors_is_refused_where_it_has_no_meaning(tiny_ckpt, tmp_path, capsys):
    """A LLaMA-Adapter (per-layer prefixes) and a DPO run from --init-aligner: one line, before any model loads."""
    task = write_task(tmp_path / "task.json", n=10)
    code, _, err = run_script(train_sft, run_args(tiny_ckpt, task, tmp_path / "a", "--prefix-init", "authors",
                                                  "--llama-adapter"), capsys)
    check_failure(code, err, "train_sft", ["--prefix-init authors", "LLaMA-Adapter"], expected_code=2)
    for flag, kind in (("--lora", "LoRA"), ("--prompt-tuning", "Prompt Tuning")):
        argv = run_args(tiny_ckpt, task, tmp_path / "a", "--prefix-init", "authors", flag)
        if flag == "--lora":  # a LoRA has no --n-tokens to give
            at = argv.index("--n-tokens")
            argv = argv[:at] + argv[at + 2:]
        code, _, err = run_script(train_sft, argv, capsys)
        check_failure(code, err, "train_sft", ["--prefix-init authors", kind], expected_code=2)
    code, _, err = run_script(train_dpo, ["--ckpt", tiny_ckpt, "--data", task, "--out", tmp_path / "b",
                                          "--prefix-init", "authors", "--init-aligner", task], capsys)
    check_failure(code, err, "train_dpo", ["--prefix-init authors", "--init-aligner"], expected_code=1)
