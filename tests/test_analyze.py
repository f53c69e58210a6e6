"""analyze.py on hand-made files whose figures are worked out by hand in each test.

The gates and prefixes below are small and chosen so that every standard deviation, mean,
rank correlation, equal count and difference can be checked on paper; the working is written
beside each expected number. Table 1's counts are the paper's own.
"""

import json
import math
import sys

import numpy as np
import pytest
import torch

import analyze
from aligner import Aligner
from llama import ModelArgs
from conftest import TINY, authors_aligner_state, lit_llama_adapter_state
from test_errors import run_script


def run(argv, capsys):
    """(exit code, stdout, stderr) of `python analyze.py argv`, in this process."""
    return run_script(analyze, argv, capsys)


def aligner_file(path, prefix, gates, start_layer, n_layers, layer_specific=False):
    """This project's file of an Aligner (prefix (N, dim)) or Adapter (prefix (n_adapted, N, dim))
    with these exact values."""
    prefix, gates = torch.tensor(prefix, dtype=torch.float32), torch.tensor(gates, dtype=torch.float32)
    args = ModelArgs(dim=prefix.shape[-1], n_layers=n_layers, n_heads=gates.shape[1], vocab_size=1)
    aligner = Aligner(args, n_tokens=prefix.shape[-2], start_layer=start_layer, layer_specific=layer_specific)
    aligner.prefix.data.copy_(prefix)
    aligner.gates.data.copy_(gates)
    aligner.save(path)
    return path


def loaded(label, prefix, layer_specific=False):
    """An in-memory Loaded with this prefix and zero gates, for `compare`."""
    prefix = torch.tensor(prefix, dtype=torch.float32)
    n_adapted = prefix.shape[0] if layer_specific else 2
    args = ModelArgs(dim=prefix.shape[-1], n_layers=n_adapted + 2, n_heads=1, vocab_size=1)
    aligner = Aligner(args, n_tokens=prefix.shape[-2], start_layer=2, layer_specific=layer_specific)
    aligner.prefix.data.copy_(prefix)
    return analyze.Loaded(label, analyze.Path(f"{label}.pt"), aligner)


# -----------------------------------------------------------------------------
# the gates

def test_gate_stats_per_layer_and_per_head_by_hand():
    gates = np.array([[1.0, 3.0],  # layer 1: mean 2, std sqrt((1 + 1) / 2) = 1
                      [0.0, 4.0],  # layer 2: mean 2, std sqrt((4 + 4) / 2) = 2
                      [2.0, 2.0]])  # layer 3: mean 2, std 0
    stats = analyze.gate_stats(gates, start_layer=1)
    assert stats.layers == [1, 2, 3]
    assert stats.layer_mean == [2.0, 2.0, 2.0]
    assert stats.layer_std == [1.0, 2.0, 0.0]
    # head 0: 1, 0, 2: mean 1, std sqrt((0 + 1 + 1) / 3); head 1: 3, 4, 2: mean 3, the same std
    assert stats.head_mean == [1.0, 3.0]
    assert stats.head_std == pytest.approx([math.sqrt(2 / 3)] * 2, abs=1e-15)


def test_layer_trend_that_falls_by_hand():
    trend = analyze.layer_trend([1, 2, 3], [1.0, 2.0, 0.0])  # three layers: a third is one layer
    assert trend.bottom_layers == [1, 1] and trend.top_layers == [3, 3]
    assert (trend.bottom_std, trend.top_std, trend.ratio, trend.rises) == (1.0, 0.0, 0.0, False)
    # ranks of std 2, 3, 1 against 1, 2, 3: d = -1, -1, 2, sum d^2 = 6, rho = 1 - 6 * 6 / (3 * 8) = -0.5
    assert trend.spearman == pytest.approx(-0.5, abs=1e-15)


def test_layer_trend_that_rises_by_hand():
    trend = analyze.layer_trend([2, 3, 4, 5, 6, 7], [1.0, 3.0, 2.0, 5.0, 4.0, 6.0])  # a third is two layers
    assert trend.bottom_layers == [2, 3] and trend.top_layers == [6, 7]
    assert trend.bottom_std == 2.0  # (1 + 3) / 2
    assert trend.top_std == 5.0  # (4 + 6) / 2
    assert trend.ratio == 2.5 and trend.rises
    # ranks 1, 3, 2, 5, 4, 6 against 1..6: d^2 = 0, 1, 1, 1, 1, 0; rho = 1 - 6 * 4 / (6 * 35) = 31 / 35
    assert trend.spearman == pytest.approx(31 / 35, abs=1e-15)


def test_layer_trend_thirds_of_seven_and_of_two_layers_and_none_of_one():
    seven = analyze.layer_trend(list(range(2, 9)), [1.0, 1.0, 9.0, 9.0, 9.0, 2.0, 4.0])  # 7 // 3 = 2 layers
    assert (seven.bottom_layers, seven.top_layers, seven.bottom_std, seven.top_std) == ([2, 3], [7, 8], 1.0, 3.0)
    two = analyze.layer_trend([30, 31], [0.5, 0.25])
    assert (two.bottom_std, two.top_std, two.ratio, two.rises, two.spearman) == (0.5, 0.25, 0.5, False, -1.0)
    assert analyze.layer_trend([31], [0.5]) is None
    flat = analyze.layer_trend([2, 3, 4], [0.0, 0.0, 0.0])
    assert flat.ratio is None and flat.spearman is None and not flat.rises


def test_spearman_with_ties_and_where_undefined():
    assert list(analyze.average_ranks(np.array([10.0, 20.0, 20.0, 5.0]))) == [2.0, 3.5, 3.5, 1.0]
    # y's ranks 1.5, 1.5, 3.5, 3.5; x's 1..4: sum dx dy = 4, sum dx^2 = 5, sum dy^2 = 4: rho = 4 / sqrt(20)
    assert analyze.spearman([1, 2, 3, 4], [1, 1, 2, 2]) == pytest.approx(2 / math.sqrt(5), abs=1e-15)
    assert analyze.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0, abs=1e-15)
    assert analyze.spearman([1, 2, 3], [7, 7, 7]) is None
    assert analyze.spearman([1], [2]) is None


def test_gates_command_prints_and_writes_the_figures(tmp_path, capsys):
    rising = aligner_file(tmp_path / "rising.pt", [[0.0] * 4], [[-1, 1], [-3, 3], [-2, 2], [-5, 5], [-4, 4], [-6, 6]],
                          start_layer=2, n_layers=8)
    falling = aligner_file(tmp_path / "falling.pt", [[0.0] * 4], [[1, 3], [0, 4], [2, 2]], start_layer=1, n_layers=4)
    code, out, err = run(["gates", rising, falling, "--json", tmp_path / "gates.json"], capsys)
    assert code == 0, err
    assert "[1] gate std rises from the bottom third (layers 2-3, mean std 2.0000) to the top third " \
           "(layers 6-7, 5.0000): ratio 2.5, Spearman 0.886" in out
    assert "[2] gate std does not rise from the bottom third (layer 1, mean std 1.0000) to the top third " \
           "(layer 3, 0.0000): ratio 0, Spearman -0.500" in out
    assert "the gate std rises in 1 of 2 files" in out
    assert "\n5      5.000000  0.000000\n" in out  # layer 5 of the first: gates -5, 5
    figures = json.loads((tmp_path / "gates.json").read_text())
    assert figures[0]["layer_std"] == [1.0, 3.0, 2.0, 5.0, 4.0, 6.0]
    assert figures[0]["layer_mean"] == [0.0] * 6
    assert figures[0]["head_mean"] == [-3.5, 3.5]  # (1 + 3 + 2 + 5 + 4 + 6) / 6
    assert figures[1]["head_std"] == pytest.approx([math.sqrt(2 / 3)] * 2, abs=1e-12)
    assert figures[1]["trend"]["spearman"] == pytest.approx(-0.5, abs=1e-12)
    assert figures[1]["gates"] == [[1, 3], [0, 4], [2, 2]]


def test_gates_of_an_authors_file_and_of_a_lit_llama_adapter(tmp_path, capsys):
    args = ModelArgs(**TINY, vocab_size=1)  # 4 layers, 4 heads: layers 2 and 3 carry gates
    authors = authors_aligner_state(args)
    authors["transformer.h.2.attn.gating_factor"] = torch.tensor([0.5, -0.5, 0.5, -0.5]).view(1, 4, 1, 1).bfloat16()
    authors["transformer.h.3.attn.gating_factor"] = torch.tensor([1.0, 1.0, 1.0, 1.0]).view(1, 4, 1, 1).bfloat16()
    adapter = lit_llama_adapter_state(args)
    adapter["transformer.h.2.attn.gating_factor"] = torch.tensor([0.0, 0.0, 0.25, 0.25]).view(1, 4, 1, 1).bfloat16()
    adapter["transformer.h.3.attn.gating_factor"] = torch.tensor([0.0, 0.0, 0.75, 0.75]).view(1, 4, 1, 1).bfloat16()
    torch.save(authors, tmp_path / "authors.pth")
    torch.save(adapter, tmp_path / "adapter.pth")
    code, out, err = run(["gates", tmp_path / "authors.pth", tmp_path / "adapter.pth", "--json", tmp_path / "g.json"],
                         capsys)
    assert code == 0, err
    assert "(Aligner: 1 token from layer 2, 72 parameters)" in out  # 64 + 2 x 4
    assert "(LLaMA-Adapter: 2 tokens in each of the 2 layers from layer 2, 264 parameters)" in out  # 2 x (2 x 64 + 4)
    first, second = json.loads((tmp_path / "g.json").read_text())
    assert (first["kind"], first["layer_std"], first["layer_mean"]) == ("Aligner", [0.5, 0.0], [0.0, 1.0])
    assert first["head_mean"] == [0.75, 0.25, 0.75, 0.25]  # (0.5 + 1) / 2, (-0.5 + 1) / 2
    assert first["trend"]["rises"] is False
    assert (second["kind"], second["layer_std"], second["layer_mean"]) == ("LLaMA-Adapter", [0.125, 0.375],
                                                                         [0.125, 0.375])
    assert second["trend"]["ratio"] == 3.0 and second["trend"]["rises"] is True


# -----------------------------------------------------------------------------
# comparing prefixes

def test_compare_same_shape_element_by_element_by_hand():
    a = loaded("[1]", [[0, 1, 2, 3, 4, 5, 6, 7]])
    b = loaded("[2]", [[0, 1, 2, 3.25, 4.5, 6, 8, 3]])  # |differences| 0, 0, 0, 0.25, 0.5, 1, 2, 4
    c = analyze.compare(a, b)
    assert (c.how, c.comparisons, c.values, c.equal) == ("element by element", 1, 8, 3)
    assert c.max_abs == 4.0
    assert c.median_abs == 0.25  # sorted 0, 0, 0, 0.25 | 0.5, ...: the lower of the middle two
    assert c.per_token == (3.0, 0.0, 3, 3)


def test_compare_same_shape_adapters_per_corresponding_token_by_hand():
    zeros = [[[0.0] * 4] * 2] * 2  # 2 layers x 2 tokens x 4 values
    other = [[[0.5, 0.0, 0.0, 0.0], [0.0] * 4],  # layer 0: token 0 has 3 equal values, token 1 all 4
             [[0.0] * 4, [1.0, 2.0, 1.0, 1.0]]]  # layer 1: token 0 all 4, token 1 none
    c = analyze.compare(loaded("[1]", zeros, layer_specific=True), loaded("[2]", other, layer_specific=True))
    assert (c.how, c.comparisons, c.values, c.equal) == ("element by element", 4, 16, 11)
    assert c.max_abs == 2.0 and c.median_abs == 0.0  # 11 of the 16 differences are 0
    # counts 3, 4, 4, 0: mean 11 / 4 = 2.75; deviations 0.25, 1.25, 1.25, -2.75: variance 10.75 / 4
    assert c.per_token.mean == 2.75 and c.per_token.std == pytest.approx(math.sqrt(10.75 / 4), abs=1e-12)
    assert (c.per_token.min, c.per_token.max) == (0, 4)


def test_compare_different_shapes_every_token_pair_by_hand(monkeypatch):
    one = loaded("[1]", [[1, 2, 3, 4]])
    three = loaded("[2]", [[1, 2, 3, 4.5],  # |differences| 0, 0, 0, 0.5: 3 equal
                           [2, 2, 5, 4],  # 1, 0, 2, 0: 2 equal
                           [0, 0, 0, 8]])  # 1, 2, 3, 4: none equal
    for chunk in (analyze.CHUNK, 4):  # all pairs at once, and one token of the first at a time
        monkeypatch.setattr(analyze, "CHUNK", chunk)
        c = analyze.compare(one, three)
        assert (c.how, c.comparisons, c.values, c.equal) == ("every token pair", 3, 12, 5)
        assert c.max_abs == 4.0
        assert c.median_abs == 0.5  # sorted 0 x5, 0.5 | 1, 1, 2, 2, 3, 4: the 6th of 12
        # counts 3, 2, 0: mean 5 / 3; deviations 4/3, 1/3, -5/3: variance (16 + 1 + 25) / 9 / 3 = 42 / 27
        assert c.per_token.mean == pytest.approx(5 / 3, abs=1e-12)
        assert c.per_token.std == pytest.approx(math.sqrt(42 / 27), abs=1e-12)
        assert (c.per_token.min, c.per_token.max) == (0, 3)
    # the other way round: each of the three against the one, the same pairs
    back = analyze.compare(three, one)
    assert (back.comparisons, back.equal, back.median_abs) == (3, 5, 0.5)


def test_compare_an_aligner_against_an_adapters_tokens_of_every_layer():
    aligner = loaded("[1]", [[1.0, 1.0]])
    adapter = loaded("[2]", [[[1.0, 1.0], [1.0, 0.0]], [[0.0, 0.0], [1.0, 3.0]]], layer_specific=True)
    c = analyze.compare(aligner, adapter)  # four tokens: equal values 2, 1, 0, 1
    assert (c.how, c.comparisons, c.values, c.equal, c.max_abs) == ("every token pair", 4, 8, 4, 2.0)
    assert c.per_token.mean == 1.0 and c.per_token.std == pytest.approx(math.sqrt(0.5), abs=1e-12)
    assert c.median_abs == 0.0  # 0, 0, 0, 0 | 1, 1, 1, 2


def test_compare_refuses_prefixes_of_different_widths():
    c = analyze.compare(loaded("[1]", [[0.0] * 4]), loaded("[2]", [[0.0] * 8]))
    assert c.how == "not comparable: widths 4 and 8" and c.per_token is None and c.values == 0


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 1001])
def test_streamed_median_is_torch_median(n):
    g = torch.Generator().manual_seed(n)
    values = torch.randn(n, generator=g).abs() * 10.0 ** torch.randint(-6, 3, (n,), generator=g)
    values[: n // 3] = 0.0  # ties at zero, as equal prefix values give
    values = values[torch.randperm(n, generator=g)]
    median = analyze.streamed_median(lambda: iter(values.split(97)), n)
    assert median == values.median().item()


def test_compare_command_on_authors_and_adapter_files(tmp_path, capsys):
    args = ModelArgs(**TINY, vocab_size=1)
    alpaca, metamath = authors_aligner_state(args, seed=0), authors_aligner_state(args, seed=0)
    changed = metamath["global_value_embedding.weight"].clone()
    changed[0, :10] += 1  # 10 of the 64 values differ (bf16 values below 8 in magnitude move by 1)
    for key in [k for k in metamath if k.endswith("adapter_wte.weight")] + ["global_value_embedding.weight"]:
        metamath[key] = changed
    torch.save(alpaca, tmp_path / "alpaca.pth")
    torch.save(metamath, tmp_path / "metamath.pth")
    torch.save(lit_llama_adapter_state(args), tmp_path / "adapter.pth")
    code, out, err = run(["compare", tmp_path / "alpaca.pth", tmp_path / "metamath.pth", tmp_path / "adapter.pth",
                          "--json", tmp_path / "c.json"], capsys)
    assert code == 0, err
    assert "[1] and [2] share 54 of 64 prefix values exactly" in out
    pairs = json.loads((tmp_path / "c.json").read_text())
    assert [(p["first"], p["second"], p["how"], p["comparisons"]) for p in pairs] == [
        ("[1]", "[2]", "element by element", 1, ), ("[1]", "[3]", "every token pair", 4),
        ("[2]", "[3]", "every token pair", 4)]
    assert pairs[0]["equal"] == 54 and pairs[0]["max_abs"] == 1.0 and pairs[0]["median_abs"] == 0.0
    assert pairs[0]["per_token"] == {"mean": 54.0, "std": 0.0, "min": 54, "max": 54}


def test_compare_prints_a_row_for_files_of_different_widths(tmp_path, capsys):
    a = aligner_file(tmp_path / "a.pt", [[0.0] * 4], [[0.0, 0.0]], start_layer=1, n_layers=2)
    b = aligner_file(tmp_path / "b.pt", [[0.0] * 8], [[0.0, 0.0]], start_layer=1, n_layers=2)
    code, out, err = run(["compare", a, b], capsys)
    assert code == 0, err
    assert "[1] [2]  not comparable: widths 4 and 8" in out


# -----------------------------------------------------------------------------
# Table 1

def test_params_llama2_7b_are_table_1s(tmp_path, capsys):
    code, out, err = run(["params", "--json", tmp_path / "t.json"], capsys)
    assert code == 0, err
    figures = json.loads((tmp_path / "t.json").read_text())
    counts = {m["name"]: m["params"] for m in figures["methods"]}
    assert counts == {"Aligner, N = 1": 5_056,  # 4,096 + 30 x 32
                      "Aligner, N = 10": 41_920,  # 40,960 + 960
                      "LLaMA-Adapter, N = 10": 1_229_760,  # 30 x (40,960 + 32)
                      "LoRA, r = 8 on wq, wv": 4_194_304,  # 32 layers x 2 matrices x 8 x (4,096 + 4,096)
                      "LoRA, r = 4 on wq, wv": 2_097_152,  # Appendix C's rank for the value experiment
                      "Prompt Tuning, N = 1": 4_096, "Prompt Tuning, N = 10": 40_960}  # not in Table 1: N x 4,096
    assert figures["base_params"] == 6_738_415_616  # LLaMA-2-7B
    # 24 x 2^30 - 2 x 6,738,415,616 = 12,292,972,544 bytes left; each adapter takes 2 bytes a parameter
    fits = {m["name"]: m["fit"] for m in figures["methods"]}
    assert fits == {"Aligner, N = 1": 1_215_681, "Aligner, N = 10": 146_624, "LLaMA-Adapter, N = 10": 4_998,
                    "LoRA, r = 8 on wq, wv": 1_465, "LoRA, r = 4 on wq, wv": 2_930, "Prompt Tuning, N = 1": 1_500_607,
                    "Prompt Tuning, N = 10": 150_060}
    for printed in ("5,056", "41,920", "1,229,760", "4,194,304", "5.06K", "4.19K", "1.23M", "4.19M",
                    "1.25M", "125K", "4.17K", "1.2K", "(Section 4.1: \"42K\")"):
        assert printed in out


def test_params_of_a_checkpoint_with_grouped_key_value_heads(tiny_ckpt, tmp_path, capsys):
    # TINY: dim 64, 4 layers, 4 heads of 16, 2 key/value heads; adapters on layers 2 and 3
    expected = {"Aligner, N = 1": 64 + 2 * 4, "Aligner, N = 10": 640 + 2 * 4, "LLaMA-Adapter, N = 10": 2 * (640 + 4),
                "LoRA, r = 8 on wq, wv": 4 * 8 * ((64 + 64) + (64 + 2 * 16)),  # wv: 64 in, 32 out
                "LoRA, r = 4 on wq, wv": 4 * 4 * ((64 + 64) + (64 + 2 * 16)),
                "Prompt Tuning, N = 1": 64, "Prompt Tuning, N = 10": 640}
    for argv in (["--ckpt", tiny_ckpt], ["--params", tiny_ckpt / "params.json"]):
        out_json = tmp_path / f"{argv[0][2:]}.json"
        code, out, err = run(["params", *argv, "--json", out_json], capsys)
        assert code == 0, err
        figures = json.loads(out_json.read_text())
        assert {m["name"]: m["params"] for m in figures["methods"]} == expected
        assert "Table 1 prints" not in out  # the paper's column belongs to LLaMA-2-7B only


def test_params_of_a_hugging_face_llama2_7b_config_is_table_1s_shape(tmp_path, capsys):
    folder = tmp_path / "Llama-2-7b-hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({  # meta-llama/Llama-2-7b-hf's config.json, its shape keys
        "model_type": "llama", "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 11008,
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-05,
        "vocab_size": 32000}))
    code, out, err = run(["params", "--ckpt", folder], capsys)
    assert code == 0, err
    assert "1,229,760" in out and "Table 1 prints 4.19K" in out


# -----------------------------------------------------------------------------
# bad input: one line naming the culprit, exit code 1, nothing written

def one_line(code, err, *culprits):
    assert code == 1, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("analyze.py: error: "), err
    for culprit in culprits:
        assert str(culprit) in lines[0], (culprit, lines[0])


def test_bad_inputs_are_named_in_one_line(tmp_path, capsys):
    good = aligner_file(tmp_path / "good.pt", [[0.0] * 4], [[0.0, 0.0]], start_layer=1, n_layers=2)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    (tmp_path / "text.pt").write_text("not a torch file\n")
    (tmp_path / "exists.json").write_text("{}\n")
    (tmp_path / "my.json").write_text("{}\n")
    cases = [
        (["gates", tmp_path / "missing.pt"], ["missing.pt"]),
        (["compare", good, tmp_path / "missing.pt"], ["missing.pt"]),
        (["gates", good, tmp_path / "other.pt"], ["other.pt", "not an Aligner file"]),
        (["gates", tmp_path / "text.pt"], ["text.pt"]),
        (["compare", good], ["compare needs two files", "good.pt"]),
        (["gates", good, "--json", tmp_path / "exists.json"], ["--json", "exists.json", "--overwrite"]),
        (["params", "--params", tmp_path / "my.json"], ["--params", "my.json"]),
        (["params", "--ckpt", tmp_path / "nowhere"], ["--ckpt", "nowhere"]),
    ]
    for argv, culprits in cases:
        before = sorted(p.name for p in tmp_path.iterdir())
        one_line(*run(argv, capsys)[::2], *culprits)
        assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "exists.json").read_text() == "{}\n"


def test_a_command_line_argparse_refuses_exits_2(capsys):
    code, _, err = run([], capsys)
    assert code == 2 and err.startswith("analyze.py: error: ") and len(err.strip().splitlines()) == 1


# -----------------------------------------------------------------------------
# pictures

def without(monkeypatch, *modules):
    """Make these modules unimportable, as if they were not installed."""
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def test_without_matplotlib_everything_else_prints_and_one_line_says_what_was_skipped(tmp_path, capsys,
                                                                                         monkeypatch):
    without(monkeypatch, "matplotlib", "matplotlib.pyplot", "sklearn", "sklearn.manifold")
    a = aligner_file(tmp_path / "a.pt", [[0.0] * 4], [[1, 3], [0, 4], [2, 2]], start_layer=1, n_layers=4)
    b = aligner_file(tmp_path / "b.pt", [[1.0] * 4], [[1, 3], [0, 4], [2, 2]], start_layer=1, n_layers=4)
    for command in ("gates", "compare"):
        code, out, err = run([command, a, b, "--plots", tmp_path / "figs"], capsys)
        assert code == 0, err
        assert ("the gate std rises in 0 of 2" if command == "gates" else "[1] [2]  element by element") in out
        assert err == ("analyze.py: skipped the plots for --plots " f"{tmp_path / 'figs'}: matplotlib is not "
                       "installed (pip install -r requirements-analysis.txt)\n")
        assert not (tmp_path / "figs").exists()


def is_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_are_drawn_as_png_files(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install -r requirements-analysis.txt)")
    pytest.importorskip("sklearn", reason="scikit-learn is not installed (pip install -r requirements-analysis.txt)")
    a = aligner_file(tmp_path / "a.pt", [[0.0, 1.0, 2.0, 3.0]], [[1, 3], [0, 4], [2, 2]], start_layer=1, n_layers=4)
    b = aligner_file(tmp_path / "b.pt", [[0.0, 1.0, 2.0, 4.0]], [[1, 2], [0, 4], [2, 5]], start_layer=1, n_layers=4)
    adapter = aligner_file(tmp_path / "c.pt", torch.arange(36.0).view(3, 3, 4).tolist(), [[1, 2], [0, 4], [2, 5]],
                           start_layer=1, n_layers=4, layer_specific=True)
    figs = tmp_path / "figs"
    code, out, err = run(["gates", a, b, adapter, "--plots", figs], capsys)
    assert code == 0, err
    code, out, err = run(["compare", a, b, adapter, "--plots", figs], capsys)
    assert code == 0, err
    names = ["fig07-gate-std-per-layer.png", "fig08-gate-mean-per-layer.png", "fig09-gate-std-per-head.png",
             "fig10-gate-mean-per-head.png", "fig11-all-gates.png", "tsne-dim4.png", "fig16-abs-diff.png"]
    assert sorted(p.name for p in figs.iterdir()) == sorted(names)
    assert all(is_png(figs / name) for name in names)
    # drawn again: refused without --overwrite, replaced with it
    code, _, err = run(["gates", a, "--plots", figs], capsys)
    one_line(code, err, "--plots", "fig07-gate-std-per-layer.png")
    code, _, err = run(["gates", a, "--plots", figs, "--overwrite"], capsys)
    assert code == 0, err


def test_without_scikit_learn_the_t_sne_alone_is_skipped(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install -r requirements-analysis.txt)")
    without(monkeypatch, "sklearn", "sklearn.manifold")
    a = aligner_file(tmp_path / "a.pt", [[0.0] * 4], [[1, 3]], start_layer=1, n_layers=2)
    b = aligner_file(tmp_path / "b.pt", [[1.0] * 4], [[1, 3]], start_layer=1, n_layers=2)
    code, out, err = run(["compare", a, b, "--plots", tmp_path / "figs"], capsys)
    assert code == 0, err
    assert err == "analyze.py: skipped the t-SNE maps: scikit-learn is not installed " \
                  "(pip install -r requirements-analysis.txt)\n"
    assert [p.name for p in (tmp_path / "figs").iterdir()] == ["fig16-abs-diff.png"]
