"""The paper's claims about the Aligner, checked on tiny random models."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from aligner import Aligner, AlignerBank
from conftest import authors_aligner_state, lit_llama_adapter_state
from llama import ModelArgs, Transformer, prefix_attention
from lora import LoRA
from prompt_tuning import PromptTuning
from support import formats
from support.files import FileError
from support.formats import read_adapter, read_aligner


@st.composite
def configurations(draw):
    n_kv_heads = draw(st.sampled_from([1, 2, 4]))
    n_heads = n_kv_heads * draw(st.sampled_from([1, 2]))
    n_layers = draw(st.integers(1, 4))
    args = ModelArgs(dim=n_heads * draw(st.sampled_from([4, 8])), n_layers=n_layers, n_heads=n_heads,
                     n_kv_heads=n_kv_heads, vocab_size=40, multiple_of=8, max_seq_len=32)
    return args, draw(st.integers(1, 6)), draw(st.integers(0, n_layers - 1))


@settings(max_examples=40, deadline=None)
@given(config=configurations(), seqlen=st.integers(1, 12), bsz=st.integers(1, 3),
       prefix_scale=st.floats(1e-3, 1e3), layer_specific=st.booleans(), seed=st.integers(0, 2**16))
def test_gates_at_zero_give_exactly_the_base_model(config, seqlen, bsz, prefix_scale, layer_specific, seed):
    """Bit-for-bit, not merely close: the sequence attention is the same computation with or
    without an Aligner (or a LLaMA-Adapter), and the added term is 0 * (finite value) = 0, and x + 0 = x."""
    args, n_tokens, start_layer = config
    torch.manual_seed(seed)
    model = Transformer(args).eval()
    aligner = Aligner(args, n_tokens=n_tokens, start_layer=start_layer, layer_specific=layer_specific)
    with torch.no_grad():
        aligner.prefix.mul_(prefix_scale)
        tokens = torch.randint(0, args.vocab_size, (bsz, seqlen))
        assert torch.equal(model(tokens, aligner=aligner), model(tokens))


@settings(max_examples=30, deadline=None)
@given(config=configurations(), seqlen=st.integers(1, 12), bsz=st.integers(1, 3), a_scale=st.floats(1e-3, 1e3),
       rank=st.integers(1, 8), training=st.booleans(), seed=st.integers(0, 2**16))
def test_lora_with_b_at_zero_gives_exactly_the_base_model(config, seqlen, bsz, a_scale, rank, training, seed):
    """The paper's other baseline likewise: a LoRA whose B is zero (as it starts) adds 0 to every query
    and value, whatever A holds and with its dropout on, so the logits are the base's bit for bit."""
    args, _, _ = config
    torch.manual_seed(seed)
    model = Transformer(args).eval()
    lora = LoRA(args, rank=rank, dropout=0.5).train(training)
    with torch.no_grad():
        lora.a_q.mul_(a_scale)
        lora.a_v.mul_(a_scale)
        tokens = torch.randint(0, args.vocab_size, (bsz, seqlen))
        assert torch.equal(model(tokens, aligner=lora), model(tokens))


def test_one_token_softmax_is_one_so_the_term_is_gate_times_v_p():
    """With N = 1 the prefix term is beta_l * V_p, whatever the queries."""
    torch.manual_seed(0)
    k_p, v_p, gate = torch.randn(1, 4, 1, 8), torch.randn(1, 4, 1, 8), torch.randn(1, 4, 1, 1)
    for q in (torch.randn(2, 4, 5, 8), 100 * torch.randn(2, 4, 5, 8)):
        torch.testing.assert_close(prefix_attention(q, k_p, v_p, gate), (gate * v_p).expand(2, 4, 5, 8))


def test_one_token_aligner_is_a_constant_shift_of_each_adapted_attention_output():
    """The whole model with a one-token Aligner equals the base model whose attention output
    (before wo) in each adapted layer is shifted by the constant beta_l * V_p."""
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=16)
    model = Transformer(args).eval()
    aligner = Aligner(args, n_tokens=1, start_layer=2)
    with torch.no_grad():
        aligner.gates.normal_()
    tokens = torch.randint(0, 50, (2, 7))

    hooks = []
    with torch.no_grad():
        for layer_id in range(aligner.start_layer, args.n_layers):
            attention = model.layers[layer_id].attention
            v_p = attention.wv(aligner.prefix).view(args.n_kv_heads, args.head_dim)  # the one token's values
            v_p = v_p.repeat_interleave(args.n_heads // args.n_kv_heads, dim=0)  # (H, hd): head h reads h // n_rep
            gate = aligner.gates[layer_id - aligner.start_layer]  # (H,)
            shift = (gate[:, None] * v_p).flatten()  # (H * hd,), heads in wo's input order
            hooks.append(attention.wo.register_forward_pre_hook(lambda m, inputs, s=shift: (inputs[0] + s,)))
        shifted = model(tokens)
        for hook in hooks:
            hook.remove()
        aligned = model(tokens, aligner=aligner)
        base = model(tokens)
    torch.testing.assert_close(aligned, shifted, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(aligned, base, atol=1e-3)  # the shift is visible: the test can fail


def frozen_model_and_aligner(n_layers, n_tokens, start_layer, open_gates=True):
    """A tiny frozen model and an Aligner on it; open_gates draws the gates, which start at zero."""
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=n_layers, n_heads=4, vocab_size=50, multiple_of=16)
    model = Transformer(args).requires_grad_(False)
    aligner = Aligner(args, n_tokens=n_tokens, start_layer=start_layer)
    if open_gates:
        with torch.no_grad():
            aligner.gates.normal_()
    return model, aligner


def test_only_the_aligner_gets_gradients_and_early_layers_need_no_backward():
    model, aligner = frozen_model_and_aligner(n_layers=4, n_tokens=3, start_layer=2)
    needs_grad = []
    for layer in model.layers:
        layer.register_forward_hook(lambda m, inputs, out: needs_grad.append(out.requires_grad))
    model(torch.randint(0, 50, (2, 6)), aligner=aligner).logsumexp(-1).mean().backward()
    assert needs_grad == [False, False, True, True]  # autograd records nothing below start_layer
    assert all(p.grad is None for p in model.parameters())
    assert aligner.prefix.grad.abs().sum() > 0 and aligner.gates.grad.abs().sum() > 0


def test_fresh_aligner_trains_its_gates_first():
    """At init the prefix gets no gradient (its term is multiplied by zero gates); the gates do."""
    model, aligner = frozen_model_and_aligner(n_layers=3, n_tokens=2, start_layer=1, open_gates=False)
    model(torch.randint(0, 50, (1, 5)), aligner=aligner).logsumexp(-1).mean().backward()
    assert torch.count_nonzero(aligner.prefix.grad) == 0
    assert torch.count_nonzero(aligner.gates.grad) > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    model, aligner = frozen_model_and_aligner(n_layers=3, n_tokens=2, start_layer=1)
    tokens = torch.randint(0, 50, (2, 6))
    grads = []
    for checkpointing in (False, True):
        model.grad_checkpointing = checkpointing
        aligner.zero_grad()
        model(tokens, aligner=aligner).logsumexp(-1).mean().backward()
        grads.append((aligner.prefix.grad.clone(), aligner.gates.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


LLAMA_2_7B = ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000)


@pytest.mark.parametrize("n_tokens, layer_specific, expected", [(1, False, 5_056), (10, False, 41_920),
                                                                  (10, True, 1_229_760)])
def test_trainable_parameter_count_for_llama_2_7b(n_tokens, layer_specific, expected):
    """N * dim + (n_layers - start_layer) * n_heads; for LLaMA-Adapter the N * dim prefix in each of the 30
    adapted layers: Table 1's 5.06K and 1.23M (its 4.19K for Aligner 10 is 41,920, Section 4.1's "42K")."""
    assert Aligner(LLAMA_2_7B, n_tokens=n_tokens, layer_specific=layer_specific).num_params() == expected


def test_a_fresh_prefix_is_standard_normal_and_the_gates_zero():
    """P starts as an embedding does, N(0, 1), the scale of an RMS-normalised hidden state: for
    LLaMA-2-7B's 10 x 4096 values the sample mean is within 0.02 of 0 and the deviation of 1."""
    torch.manual_seed(0)
    aligner = Aligner(LLAMA_2_7B, n_tokens=10)
    assert abs(aligner.prefix.mean().item()) < 0.02 and abs(aligner.prefix.std().item() - 1) < 0.02
    assert torch.count_nonzero(aligner.gates) == 0


@pytest.mark.parametrize("n_tokens, start_layer", [(0, 2), (1, 4), (1, -1)])
def test_an_aligner_needs_a_token_and_a_start_layer_inside_the_model(n_tokens, start_layer):
    args = ModelArgs(dim=32, n_layers=4, n_heads=4, vocab_size=50)
    Aligner(args, n_tokens=1, start_layer=3)  # the last layer alone may be adapted
    with pytest.raises(ValueError):
        Aligner(args, n_tokens=n_tokens, start_layer=start_layer)


@pytest.mark.parametrize("other", [dict(n_layers=5), dict(dim=64), dict(n_heads=8)],
                         ids=["more layers", "wider", "more heads"])
def test_the_model_refuses_an_aligner_of_another_shape(other):
    """An Aligner made for a base of another shape stops the forward with a line that says so,
    even where its tensors would broadcast (more layers: surplus gates)."""
    args = ModelArgs(dim=32, n_layers=4, n_heads=4, vocab_size=50)
    model = Transformer(args).eval()
    wrong = Aligner(ModelArgs(**{**dict(dim=32, n_layers=4, n_heads=4, vocab_size=50), **other}), n_tokens=2)
    with pytest.raises(ValueError, match="does not fit this model"):
        model(torch.randint(0, 50, (1, 5)), aligner=wrong)


@pytest.mark.parametrize("other", [dict(n_kv_heads=2), dict(n_tokens=3), dict(start_layer=1),
                                   dict(layer_specific=True)],
                         ids=["another base", "more tokens", "another start layer", "a LLaMA-Adapter"])
def test_a_bank_refuses_aligners_that_differ_in_shape(other):
    """A bank holds Aligners of one n_tokens, start_layer and base shape; one made for a base with
    other key/value heads has tensors of the same shape, and is refused all the same."""
    base = dict(dim=32, n_layers=4, n_heads=4, vocab_size=50)
    first = Aligner(ModelArgs(**base), n_tokens=2, start_layer=2)
    second = Aligner(ModelArgs(**base, **{k: v for k, v in other.items() if k == "n_kv_heads"}),
                     **{"n_tokens": 2, "start_layer": 2, **{k: v for k, v in other.items() if k != "n_kv_heads"}})
    with pytest.raises(ValueError, match="must share their kind, n_tokens, start_layer and base shape"):
        AlignerBank([first, None, second])


# --- files -------------------------------------------------------------------

def test_save_and_load_round_trip(tmp_path):
    args = ModelArgs(dim=32, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=16)
    aligner = Aligner(args, n_tokens=3, start_layer=1)
    with torch.no_grad():
        aligner.gates.normal_()
    aligner.save(tmp_path / "a.pt")
    loaded = Aligner.load(tmp_path / "a.pt", args)
    assert (loaded.n_tokens, loaded.start_layer) == (3, 1)
    assert torch.equal(loaded.prefix, aligner.prefix) and torch.equal(loaded.gates, aligner.gates)


def test_loading_against_another_shape_is_a_clear_error(tmp_path):
    args = ModelArgs(dim=32, n_layers=4, n_heads=4, vocab_size=50)
    Aligner(args, n_tokens=1).save(tmp_path / "a.pt")
    for other in (ModelArgs(dim=64, n_layers=4, n_heads=4, vocab_size=50),
                  ModelArgs(dim=32, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=50)):
        with pytest.raises(ValueError) as info:
            Aligner.load(tmp_path / "a.pt", other)
        assert "a.pt" in str(info.value) and "\n" not in str(info.value)


def test_not_an_aligner_file(tmp_path):
    torch.save({"weights": torch.ones(2)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="x.pt: not an Aligner file"):
        Aligner.load(tmp_path / "x.pt")


def test_authors_lit_llama_file_is_imported_bit_for_bit(tmp_path):
    """A file in the authors' layout: bf16 prefix and gates (1, H, 1, 1) from layer 2, per-layer
    adapter_wte copies of the prefix; bf16 widens to float32 exactly."""
    args = ModelArgs(dim=32, n_layers=5, n_heads=4, vocab_size=50, multiple_of=16)
    state = authors_aligner_state(args, n_tokens=2)
    torch.save(state, tmp_path / "lit.pth")
    for aligner in (read_aligner(tmp_path / "lit.pth", args), read_adapter(tmp_path / "lit.pth", args)):
        assert (aligner.n_tokens, aligner.start_layer) == (2, 2)
        assert torch.equal(aligner.prefix, state["global_value_embedding.weight"].float())
        for i in range(2, 5):
            assert torch.equal(aligner.gates[i - 2], state[f"transformer.h.{i}.attn.gating_factor"].float().flatten())
    with pytest.raises(ValueError, match="not an Aligner file"):  # Aligner.load reads only our own files
        Aligner.load(tmp_path / "lit.pth")
    torch.save({"model": state}, tmp_path / "fabric.pth")  # as lightning's fabric.save nests it
    assert torch.equal(read_aligner(tmp_path / "fabric.pth", args).gates, aligner.gates)


def test_read_takes_this_projects_files_too(tmp_path):
    args = ModelArgs(dim=32, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=16)
    ours = Aligner(args, n_tokens=3, start_layer=1)
    ours.save(tmp_path / "a.pt")
    read = read_aligner(tmp_path / "a.pt", args)
    assert torch.equal(read.prefix, ours.prefix) and torch.equal(read.gates, ours.gates)


def test_a_copy_of_the_prefix_that_differs_is_refused_by_file_and_key(tmp_path):
    args = ModelArgs(dim=32, n_layers=4, n_heads=4, vocab_size=50, multiple_of=16)
    state = authors_aligner_state(args)
    state["transformer.h.3.attn.adapter_wte.weight"][0, 5] += 1
    torch.save(state, tmp_path / "lit.pth")
    with pytest.raises(ValueError, match=r"lit\.pth: 'transformer\.h\.3\.attn\.adapter_wte\.weight' differs from "
                                         r"'global_value_embedding\.weight'"):
        read_aligner(tmp_path / "lit.pth", args)


@pytest.mark.parametrize("shape", [(), (1,), (1, 1, 1)])
def test_a_single_gating_value_is_spread_over_the_heads(tmp_path, shape):
    """As the authors' loader does for their older files: reshape(1, 1, 1, 1).repeat(1, H, 1, 1)."""
    args = ModelArgs(dim=32, n_layers=4, n_heads=4, vocab_size=50, multiple_of=16)
    state = authors_aligner_state(args)
    state["transformer.h.2.attn.gating_factor"] = torch.full(shape, 0.375).bfloat16()
    torch.save(state, tmp_path / "lit.pth")
    aligner = read_aligner(tmp_path / "lit.pth", args)
    assert aligner.gates[0].tolist() == [0.375, 0.375, 0.375, 0.375]
    assert torch.equal(aligner.gates[1], state["transformer.h.3.attn.gating_factor"].float().flatten())


@pytest.mark.parametrize("key, value, message", [
    ("transformer.h.2.attn.gating_factor", torch.zeros(1, 2, 1, 1),
     r"'transformer\.h\.2\.attn\.gating_factor' has shape \(1, 2, 1, 1\); expected \(1, 4, 1, 1\)"),
    ("transformer.h.2.attn.gating_factor", torch.zeros(4), r"has shape \(4,\); expected \(1, 4, 1, 1\) or a single"),
    ("transformer.h.2.attn.c_proj.weight", torch.zeros(2), r"unexpected key 'transformer\.h\.2\.attn\.c_proj\.weight'"),
    ("global_value_embedding.weight", torch.zeros(1, 16), r"'global_value_embedding\.weight' has shape \(1, 16\)"),
    ("transformer.h.3.attn.gating_factor", None, r"gates for layers \[2\] do not cover layers 2\.\.3"),
])
def test_a_bad_authors_file_is_named_in_one_line(tmp_path, key, value, message):
    args = ModelArgs(dim=32, n_layers=4, n_heads=4, vocab_size=50, multiple_of=16)
    state = authors_aligner_state(args)
    if value is None:
        del state[key]
    else:
        state[key] = value
    torch.save(state, tmp_path / "lit.pth")
    with pytest.raises(ValueError, match=message) as info:
        read_aligner(tmp_path / "lit.pth", args)
    assert str(info.value).startswith(str(tmp_path / "lit.pth")) and "\n" not in str(info.value)


def ours(args, **change) -> dict:
    """This project's Aligner file, as a dict, with some entries replaced."""
    aligner = Aligner(args, n_tokens=1)
    state = {"n_tokens": 1, "start_layer": 2, "base": aligner.base, "prefix": aligner.prefix.detach(),
             "gates": aligner.gates.detach()}
    return {**state, **change}


@pytest.mark.parametrize("build, read, message", [
    (lambda args: ours(args, base={"dim": 32}), "read",
     r"'base' must hold \['dim', 'n_layers', 'n_heads', 'n_kv_heads'\]"),
    (lambda args: ours(args, prefix=torch.zeros(2, 32)), "read",
     r"prefix has shape \(2, 32\), its settings imply \(1, 32\)"),
    (lambda args: {"global_value_embedding.weight": torch.zeros(1, 32)}, "read",
     r"no 'transformer\.h\.N\.attn\.gating_factor'"),
    (lambda args: {**authors_aligner_state(args), "transformer.h.2.attn.gating_factor": torch.zeros(())},
     "read without args", r"holds one value for all heads, so the file does not say how many heads"),
    (lambda args: ours(args, layer_specific=1), "read", r"'layer_specific' must be true or false, not 1"),
    (lambda args: {k: v for k, v in lit_llama_adapter_state(args).items() if k != "transformer.h.3.attn.adapter_wte.weight"},
     "read", r"adapter_wte for layers \[2\] but gating_factor for layers \[2, 3\]"),
    (lambda args: {**lit_llama_adapter_state(args), "transformer.h.3.attn.adapter_wte.weight": torch.zeros(3, 32)},
     "read", r"the layers' adapter_wte shapes \[\(2, 32\), \(3, 32\)\] are not one"),
], ids=["base lacks keys", "prefix of another shape", "authors' without gates",
        "one gate for all heads, without the model", "layer_specific not a bool", "an Adapter layer without its prefix",
        "Adapter prefixes of two shapes"])
def test_an_unusable_aligner_file_is_named(tmp_path, build, read, message):
    args = ModelArgs(dim=32, n_layers=4, n_heads=4, vocab_size=50)
    torch.save(build(args), tmp_path / "a.pt")
    reader = {"read": lambda: read_aligner(tmp_path / "a.pt", args),
              "read without args": lambda: read_aligner(tmp_path / "a.pt", None)}[read]
    with pytest.raises(ValueError, match=message) as info:
        reader()
    assert str(info.value).startswith(str(tmp_path / "a.pt")) and "\n" not in str(info.value)


def test_an_empty_bank_is_named():
    with pytest.raises(ValueError, match="an AlignerBank needs at least one Aligner"):
        AlignerBank([None, None])


def test_a_file_that_is_not_a_torch_file_is_named(tmp_path):
    (tmp_path / "log.pth").write_text('{"question": "an MMLU log, not an Aligner"}\n')
    args = ModelArgs(dim=32, n_layers=4, n_heads=4, vocab_size=50)
    with pytest.raises(FileError, match=r"log\.pth: not a readable Aligner file"):
        read_aligner(tmp_path / "log.pth", args)
    with pytest.raises(FileError, match=r"missing\.pt: no Aligner file here"):
        read_aligner(tmp_path / "missing.pt", args)


def test_bank_rows_equal_single_aligners():
    """Rows of one batch, each with its own Aligner or none, match separate runs."""
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=16)
    model = Transformer(args).eval()
    aligners = [Aligner(args, n_tokens=2, start_layer=1) for _ in range(2)]
    with torch.no_grad():
        for a in aligners:
            a.gates.normal_()
    bank = AlignerBank([aligners[0], None, aligners[1]])
    tokens = torch.randint(0, 50, (3, 6))
    with torch.no_grad():
        together = model(tokens, aligner=bank.select([0, 1, 2]))
        alone = [model(tokens[:1], aligners[0]), model(tokens[1:2]), model(tokens[2:], aligners[1])]
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-5, rtol=1e-5)
    assert bank.nbytes() == 3 * (2 * 32 + 2 * 4) * 4


# --- LLaMA-Adapter V1, the paper's baseline ----------------------------------------------

def test_an_adapter_whose_layers_share_one_prefix_is_the_aligner():
    """The one difference between the two is where the prefix comes from: tied, they are the same model."""
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=16)
    model = Transformer(args).eval()
    aligner = Aligner(args, n_tokens=3, start_layer=1)
    adapter = Aligner(args, n_tokens=3, start_layer=1, layer_specific=True)
    with torch.no_grad():
        aligner.gates.normal_()
        adapter.gates.copy_(aligner.gates)
        adapter.prefix.copy_(aligner.prefix.expand(3, 3, 32))
        tokens = torch.randint(0, 50, (2, 6))
        assert torch.equal(model(tokens, adapter), model(tokens, aligner))
        adapter.prefix[2].normal_()  # the last layer's own prefix: only that layer changes
        assert not torch.allclose(model(tokens, adapter), model(tokens, aligner), atol=1e-4)


def test_each_adapter_layer_trains_its_own_prefix():
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=4, n_heads=4, vocab_size=50, multiple_of=16)
    model = Transformer(args).requires_grad_(False)
    adapter = Aligner(args, n_tokens=2, start_layer=2, layer_specific=True)
    with torch.no_grad():
        adapter.gates.normal_()
        adapter.gates[1].zero_()  # layer 3's term is closed: its prefix gets no gradient
    model(torch.randint(0, 50, (2, 6)), aligner=adapter).logsumexp(-1).mean().backward()
    assert adapter.prefix.shape == (2, 2, 32)
    assert torch.count_nonzero(adapter.prefix.grad[0]) > 0 and torch.count_nonzero(adapter.prefix.grad[1]) == 0
    assert all(p.grad is None for p in model.parameters())


def test_an_adapter_file_round_trips_with_its_kind(tmp_path):
    args = ModelArgs(dim=32, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=16)
    adapter = Aligner(args, n_tokens=3, start_layer=1, layer_specific=True)
    adapter.save(tmp_path / "a.pt")
    for loaded in (Aligner.load(tmp_path / "a.pt", args), read_aligner(tmp_path / "a.pt")):
        assert loaded.layer_specific and (loaded.n_tokens, loaded.start_layer) == (3, 1)
        assert torch.equal(loaded.prefix, adapter.prefix) and loaded.prefix.shape == (3, 3, 32)
    assert "LLaMA-Adapter: 3 tokens in each of the 3 layers from layer 1, 300 parameters" == adapter.describe()
    state = torch.load(tmp_path / "a.pt", weights_only=True)
    del state["layer_specific"]  # a file written before the Adapter existed is an Aligner
    torch.save({**state, "prefix": state["prefix"][0]}, tmp_path / "old.pt")
    assert not read_aligner(tmp_path / "old.pt").layer_specific


def test_lit_llamas_adapter_file_is_read_bit_for_bit(tmp_path):
    """lit-llama's finetune/adapter.py keeps, per adapted layer, transformer.h.{i}.attn.adapter_wte.weight
    (N, dim) and gating_factor (1, H, 1, 1); bf16 widens to float32 exactly. Without the model's
    arguments the shape is read from the tensors."""
    args = ModelArgs(dim=32, n_layers=5, n_heads=4, vocab_size=50, multiple_of=16)
    state = lit_llama_adapter_state(args, n_tokens=3, start_layer=2)
    torch.save(state, tmp_path / "lit-llama-adapter-finetuned.pth")
    for adapter in (read_aligner(tmp_path / "lit-llama-adapter-finetuned.pth", args),
                    read_aligner(tmp_path / "lit-llama-adapter-finetuned.pth")):
        assert adapter.layer_specific and (adapter.n_tokens, adapter.start_layer) == (3, 2)
        assert adapter.base == {"dim": 32, "n_layers": 5, "n_heads": 4, "n_kv_heads": 4}
        for i in range(2, 5):
            assert torch.equal(adapter.prefix[i - 2], state[f"transformer.h.{i}.attn.adapter_wte.weight"].float())
            assert torch.equal(adapter.gates[i - 2], state[f"transformer.h.{i}.attn.gating_factor"].float().flatten())


def test_bank_rows_of_adapters_equal_single_adapters():
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=16)
    model = Transformer(args).eval()
    adapters = [Aligner(args, n_tokens=2, start_layer=1, layer_specific=True) for _ in range(2)]
    with torch.no_grad():
        for a in adapters:
            a.gates.normal_()
    bank = AlignerBank([adapters[0], None, adapters[1]])
    tokens = torch.randint(0, 50, (3, 6))
    with torch.no_grad():
        together = model(tokens, aligner=bank.select([0, 1, 2]))
        alone = [model(tokens[:1], adapters[0]), model(tokens[1:2]), model(tokens[2:], adapters[1])]
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-5, rtol=1e-5)


def test_every_adapter_file_is_loaded_once(tmp_path, monkeypatch):
    """read_adapter and check_adapter_file tell a file's kind from what they loaded: one torch.load a call,
    for each kind and layout --aligner takes."""
    args = ModelArgs(dim=32, n_layers=4, n_heads=4, vocab_size=50, multiple_of=16)
    Aligner(args, n_tokens=2).save(tmp_path / "aligner.pt")
    LoRA(args, rank=2).save(tmp_path / "lora.pt")
    PromptTuning(args, n_tokens=2).save(tmp_path / "prompt.pt")
    torch.save(authors_aligner_state(args, n_tokens=2), tmp_path / "authors.pth")
    torch.save(lit_llama_adapter_state(args), tmp_path / "adapter.pth")
    loads = []
    real = formats.load_pt
    monkeypatch.setattr(formats, "load_pt", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    for name, kind in [("aligner.pt", Aligner), ("lora.pt", LoRA), ("prompt.pt", PromptTuning),
                       ("authors.pth", Aligner), ("adapter.pth", Aligner)]:
        for call in (lambda path: read_adapter(path, args), formats.check_adapter_file):
            loads.clear()
            call(tmp_path / name)
            assert loads == [tmp_path / name], (name, loads)
        assert isinstance(read_adapter(tmp_path / name, args), kind)

