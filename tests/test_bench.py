"""The benchmark's machinery: the Meta -> transformers conversion, the FLOP count, the memory probe."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from llama import ModelArgs, Transformer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gpu  # noqa: E402
import memory  # noqa: E402
import run as bench  # noqa: E402

TINY = dict(dim=8, n_layers=2, n_heads=2, vocab_size=16, multiple_of=8)  # SwiGLU width 24


def test_meta_weights_in_transformers_give_the_same_logits():
    """Renamed keys plus the rotary row permutation of wq and wk (grouped-query heads
    included) make LlamaForCausalLM compute our logits; without the permutation it does not."""
    pytest.importorskip("transformers")
    import hf

    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=32, max_seq_len=64)
    ours = Transformer(args).requires_grad_(False).eval()
    theirs = hf.load_hf(ours.state_dict(), args)
    tokens = torch.randint(0, 96, (2, 24))
    with torch.no_grad():
        expected = ours(tokens)
        torch.testing.assert_close(theirs(input_ids=tokens).logits, expected, atol=2e-5, rtol=1e-4)
        unpermuted = hf.to_hf_state(ours.state_dict(), args)
        for i in range(args.n_layers):
            unpermuted[f"model.layers.{i}.self_attn.q_proj.weight"] = ours.layers[i].attention.wq.weight
            unpermuted[f"model.layers.{i}.self_attn.k_proj.weight"] = ours.layers[i].attention.wk.weight
        theirs.load_state_dict(unpermuted)
        assert not torch.allclose(theirs(input_ids=tokens).logits, expected, atol=1e-3)


def test_flop_count_matches_a_hand_count():
    """dim 8, 2 layers, SwiGLU width 24, vocab 16, 1 x 4 tokens, adapter from layer 1:
    weights per layer 4*64 + 3*8*24 = 832, head 128, causal pairs 4*5/2 = 10."""
    args = ModelArgs(**TINY)
    attention = 4 * 8 * 10  # Q K^T and P V: 2 FLOPs x dim per visible pair, twice
    forward = 2 * (2 * 832 * 4 + attention) + 2 * 128 * 4
    backward = 1 * (2 * 832 * 4 + 2 * attention) + 2 * 128 * 4
    assert bench.train_step_flops(args, batch=1, seqlen=4, start_layer=1) == forward + backward == 23296
    # with every layer adapted it is the usual rule: 4 x parameters x tokens plus 3 x attention
    matmul_params = 2 * 832 + 128
    assert bench.train_step_flops(args, 1, 4, 0) == 4 * matmul_params * 4 + 3 * attention * 2


def test_flop_count_uses_the_models_own_weights():
    """layer_weights lists exactly the matrices a layer holds, and the causal pair count is the mask's."""
    args = ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=40, multiple_of=32)
    model = Transformer(args)
    matrices = sum(p.numel() for name, p in model.named_parameters()
                   if p.dim() == 2 and not name.startswith(("tok_", "output")))
    assert sum(i * o for i, o in bench.layer_weights(args)) * args.n_layers == matrices
    visible = torch.ones(7, 7).tril().sum().item()
    assert bench.attention_flops(args, batch=1, seqlen=7) == 4 * args.dim * visible


def test_matmul_limit_times_the_products_the_step_counts():
    """The plain products of the matrix-product limit add up to the step's FLOPs less attention."""
    args = ModelArgs(**TINY)
    batch, seqlen, start = 3, 5, 1
    products = sum(2 * m * k * n * c for m, k, n, c in bench.matmul_products(args, batch * seqlen, start))
    attention = bench.attention_flops(args, batch, seqlen)
    expected = bench.train_step_flops(args, batch, seqlen, start) - attention * (args.n_layers + 2 * (args.n_layers - start))
    assert products == expected


def test_peak_memory_probe_sees_a_freed_allocation():
    """After clear_refs resets VmHWM, an allocation freed before the reading still shows in it."""
    Path("/proc/self/clear_refs").write_text("5")
    base = bench.rss_kib("VmRSS")
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    del x
    assert bench.rss_kib("VmHWM") - base >= 60 * 1024


def test_lm_loss_predicts_the_next_token():
    """A model whose logits put all mass on the true next token has loss ~0; the last position is not scored."""
    tokens = torch.tensor([[1, 4, 2, 3]])
    logits = torch.full((1, 4, 5), -1e4)
    logits[0, torch.arange(3), tokens[0, 1:]] = 1e4
    assert bench.lm_loss(logits, tokens).item() < 1e-6
    logits[0, 3] = 0.0  # anything at the last position
    assert bench.lm_loss(logits, tokens).item() < 1e-6


def test_gpu_script_runs_small_on_the_cpu():
    """bench/gpu.py's measurement (random weights, both checkpointing settings) runs end to end."""
    args = ModelArgs(dim=32, n_layers=3, n_heads=4, vocab_size=64, multiple_of=16, max_seq_len=16)
    text = gpu.run(args, torch.device("cpu"), torch.float32, batch=2, seq_len=16, steps=1, warmup=0)
    rows = [line for line in text.splitlines() if line.startswith(("| off", "| on"))]
    assert len(rows) == 2


def test_memory_count_on_the_meta_device_equals_the_cpu_kernels():
    """bench/memory.py counts what autograd saves on the meta device, with attention counted as
    the fused kernels save it; the CPU's fused kernel, run for real, saves exactly as much."""
    args = ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=100, multiple_of=32, max_seq_len=32)
    counted = memory.saved_bytes(args, batch=2, seq_len=32, n_tokens=3, start_layer=1)
    torch.manual_seed(0)
    measured = memory.saved_bytes(args, batch=2, seq_len=32, n_tokens=3, start_layer=1, device="cpu")
    assert counted == measured
    assert set(counted["by_layer"]) == {1, 2, "outside the layers"}  # layer 0 is below start_layer: nothing saved


def test_precision_rows_run_small(tmp_path):
    """bench/run.py's precision section: both bases train from the same start to nearby losses."""
    from support.formats import save

    torch.manual_seed(0)
    save(Transformer(ModelArgs(dim=32, n_layers=3, n_heads=4, vocab_size=64, multiple_of=16)), tmp_path / "m")
    ours = bench.load_ours(tmp_path / "m")
    text = bench.precision(tmp_path / "m", ours, torch.randint(3, 64, (2, 16)), rounds=1, warmup=0, loss_steps=3)
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in text.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"float32", "bfloat16"}
    first32, first16 = float(rows["float32"][5]), float(rows["bfloat16"][5])
    assert abs(first32 - first16) < 0.05 * first32


def test_gpu_decode_table_runs_small_on_the_cpu(monkeypatch):
    """bench/gpu.py's decode table runs end to end: every row of ours, a bank, the limit rows, the
    targets, and transformers' rows where it is installed. The compiled rows decode eagerly here
    (compiling four tiny graphs would take a minute; test_generate.py tests the compiled step):
    what is checked of them is that they ask generate for it."""
    compile_flags = []
    real = gpu.generate
    monkeypatch.setattr(gpu, "generate", lambda *a, compile, **kw: compile_flags.append(compile) or real(*a, **kw))
    args = ModelArgs(dim=32, n_layers=3, n_heads=4, vocab_size=64, multiple_of=16, max_seq_len=64, max_batch_size=2)
    torch.manual_seed(0)
    model = gpu.random_model(args, torch.device("cpu"), torch.float32)
    text = gpu.decode_run(model, torch.device("cpu"), batches=(1, 2), bank_size=50, generations=1, new_tokens=3,
                          prompt_lengths=(4, 9), bandwidth_bytes=1 << 24, tolerance=1e-4)
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith(("| 1 ", "| 2 "))]
    with_transformers = importlib.util.find_spec("transformers") is not None
    assert len(rows) == 2 * (4 + with_transformers) + 2  # per batch: 4 of ours, transformers, the limit
    assert all(float(row[3]) > 0 for row in rows)  # tokens / s
    assert compile_flags == ([False] * 4 + [True] * 4) * 2  # 2 generations of each row, eager rows first
    assert sum(line.startswith("- ") for line in text.splitlines()) == 7 + with_transformers  # the targets


def test_our_lora_row_trains_its_own_parameters(tmp_path, monkeypatch):
    """The LoRA-against-LoRA row: one step through make_trainer moves our LoRA's B off zero, with
    dropout 0 as PEFT's row has it, and leaves the base's weights alone."""
    from support.formats import save
    from lora import LoRA

    made = []

    class Recorded(LoRA):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(bench, "LoRA", Recorded)
    torch.manual_seed(0)
    save(Transformer(ModelArgs(**TINY, max_seq_len=32)), tmp_path / "model")
    model = bench.load_ours(tmp_path / "model")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bench.make_trainer("LoRA r=8 (q, v), every layer", tmp_path / "model", model=model)(torch.randint(3, 16, (2, 12)))
    assert len(made) == 1 and made[0].dropout == 0.0 and made[0].rank == 8
    assert torch.count_nonzero(made[0].b_q) > 0 and torch.count_nonzero(made[0].b_v) > 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
