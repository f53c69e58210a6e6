"""The model against a second implementation written from the papers' equations alone.

reference_logits below shares no code with llama.py: RoPE by cosines and sines
on adjacent pairs, attention one head at a time with its softmax spelled out,
grouped-query heads by index, and Eq. 4-7 of the Aligner paper term by term
(with a prefix per layer, LLaMA-Adapter V1 as lit-llama computes it).
If llama.py put RoPE on the prefix keys, masked the prefix, shared one softmax
between sequence and prefix, squashed the gate, or gave layers below
start_layer the prefix, the two would disagree.
"""

import math

import torch
from hypothesis import given, settings, strategies as st

from aligner import Aligner
from conftest import make_checkpoint
from llama import KVCache, ModelArgs, Transformer
from support.formats import load


def rms_norm(x, weight, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def rope(x, positions, theta):
    """x (T, hd) at positions (T,): each adjacent pair (x[2j], x[2j+1]) turned by angle m * theta^(-2j/hd)."""
    hd = x.shape[-1]
    j = torch.arange(hd // 2, dtype=torch.float64)
    angle = positions[:, None].double() * theta ** (-2 * j / hd)  # (T, hd/2)
    cos, sin = torch.cos(angle), torch.sin(angle)
    even, odd = x[:, 0::2], x[:, 1::2]
    out = torch.empty_like(x)
    out[:, 0::2] = even * cos - odd * sin
    out[:, 1::2] = even * sin + odd * cos
    return out


def reference_logits(state: dict, args: ModelArgs, tokens: torch.Tensor, prefix=None, gates=None,
                     start_layer=0, layer_prefixes=None) -> torch.Tensor:
    """LLaMA with an Aligner, for one sequence (T,), in float64: logits (T, V). With layer_prefixes
    (one (N, dim) tensor per adapted layer) instead of prefix, LLaMA-Adapter V1 as lit-llama's
    lit_llama/adapter.py computes it: each layer's own adapter_wte through its c_attn's key and
    value rows, an unmasked attention of the sequence's (roped) queries over it, times gating_factor."""
    w = {k: v.double() for k, v in state.items()}
    T, hd, H, H_kv = len(tokens), args.head_dim, args.n_heads, args.n_kv_heads
    positions = torch.arange(T)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    x = w["tok_embeddings.weight"][tokens]  # (T, dim)
    for l in range(args.n_layers):
        p = f"layers.{l}."
        h = rms_norm(x, w[p + "attention_norm.weight"], args.norm_eps)
        q = h @ w[p + "attention.wq.weight"].T  # (T, H * hd)
        k = h @ w[p + "attention.wk.weight"].T  # (T, H_kv * hd)
        v = h @ w[p + "attention.wv.weight"].T
        adapted = (prefix is not None or layer_prefixes is not None) and l >= start_layer
        if adapted:  # Eq. 5: the prefix through this layer's own frozen W_k, W_v; no RoPE, no norm
            own = prefix if layer_prefixes is None else layer_prefixes[l - start_layer]
            k_p = own.double() @ w[p + "attention.wk.weight"].T  # (N, H_kv * hd)
            v_p = own.double() @ w[p + "attention.wv.weight"].T
        heads = []
        for head in range(H):
            g = head // (H // H_kv)  # the key/value head this query head reads
            qh = rope(q[:, head * hd:(head + 1) * hd], positions, args.rope_theta)
            kh = rope(k[:, g * hd:(g + 1) * hd], positions, args.rope_theta)
            vh = v[:, g * hd:(g + 1) * hd]
            scores = (qh @ kh.T / math.sqrt(hd)).masked_fill(~causal, float("-inf"))
            out = torch.softmax(scores, -1) @ vh  # Eq. 4
            if adapted:  # Eq. 6-7: a separate softmax over the N prefix keys, unmasked, gated raw
                scores_p = qh @ k_p[:, g * hd:(g + 1) * hd].T / math.sqrt(hd)  # (T, N)
                out = out + gates[l - start_layer, head].double() * (
                    torch.softmax(scores_p, -1) @ v_p[:, g * hd:(g + 1) * hd])
            heads.append(out)
        x = x + torch.cat(heads, -1) @ w[p + "attention.wo.weight"].T
        h = rms_norm(x, w[p + "ffn_norm.weight"], args.norm_eps)
        gate = h @ w[p + "feed_forward.w1.weight"].T
        x = x + (gate * torch.sigmoid(gate) * (h @ w[p + "feed_forward.w3.weight"].T)) @ w[p + "feed_forward.w2.weight"].T
    return rms_norm(x, w["norm.weight"], args.norm_eps) @ w["output.weight"].T


@st.composite
def models(draw):
    n_kv_heads = draw(st.sampled_from([1, 2]))
    n_heads = n_kv_heads * draw(st.sampled_from([1, 2]))
    n_layers = draw(st.integers(1, 3))
    args = ModelArgs(dim=n_heads * 8, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=30,
                     multiple_of=8, rope_theta=draw(st.sampled_from([10000.0, 500.0])), max_seq_len=16)
    return args, draw(st.integers(1, 4)), draw(st.integers(0, n_layers - 1))


@settings(max_examples=25, deadline=None)
@given(config=models(), seqlen=st.integers(1, 7), seed=st.integers(0, 2**16))
def test_the_model_computes_eq_5_to_7_as_written(config, seqlen, seed):
    """Logits of the base and of an Aligner with random gates, N from 1 to 4, every start layer,
    grouped-query heads: whole sequences and a cache filled a token at a time."""
    args, n_tokens, start_layer = config
    torch.manual_seed(seed)
    model = Transformer(args).eval()
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.3)
    aligner = Aligner(args, n_tokens=n_tokens, start_layer=start_layer)
    with torch.no_grad():
        aligner.gates.normal_()
    tokens = torch.randint(0, args.vocab_size, (2, seqlen))
    state = model.state_dict()
    with torch.no_grad():
        for b in range(2):
            base = reference_logits(state, args, tokens[b])
            torch.testing.assert_close(model(tokens[b:b + 1])[0].double(), base, atol=1e-4, rtol=1e-4)
            expected = reference_logits(state, args, tokens[b], aligner.prefix, aligner.gates, start_layer)
            torch.testing.assert_close(model(tokens[b:b + 1], aligner)[0].double(), expected, atol=1e-4, rtol=1e-4)
            cache = KVCache(args, 1, seqlen)
            stepped = torch.cat([model(tokens[b:b + 1, t:t + 1], aligner, cache)[0] for t in range(seqlen)])
            torch.testing.assert_close(stepped.double(), expected, atol=1e-4, rtol=1e-4)


def test_a_loaded_checkpoint_turns_by_its_own_rope_theta(tmp_path):
    """params.json's rope_theta (500000, as LLaMA-3 ships) reaches the model that load builds."""
    make_checkpoint(tmp_path / "tiny", rope_theta=500000.0)
    model, _ = load(tmp_path / "tiny", max_seq_len=16)
    tokens = torch.randint(0, model.args.vocab_size, (12,), generator=torch.Generator().manual_seed(0))
    state = model.state_dict()
    with torch.no_grad():
        logits = model(tokens[None])[0].double()
    torch.testing.assert_close(logits, reference_logits(state, model.args, tokens), atol=1e-4, rtol=1e-4)
    assert model.args.rope_theta == 500000.0
    default = ModelArgs(**{**vars(model.args), "rope_theta": 10000.0})
    assert not torch.allclose(logits, reference_logits(state, default, tokens), atol=1e-3)


@settings(max_examples=15, deadline=None)
@given(config=models(), seqlen=st.integers(1, 7), seed=st.integers(0, 2**16))
def test_llama_adapter_computes_a_prefix_per_layer_as_lit_llama_does(config, seqlen, seed):
    """LLaMA-Adapter V1 (layer_specific): each adapted layer attends to its own prefix; whole
    sequences and a cache filled a token at a time."""
    args, n_tokens, start_layer = config
    torch.manual_seed(seed)
    model = Transformer(args).eval()
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.3)
    adapter = Aligner(args, n_tokens=n_tokens, start_layer=start_layer, layer_specific=True)
    with torch.no_grad():
        adapter.gates.normal_()
    tokens = torch.randint(0, args.vocab_size, (seqlen,))
    state = model.state_dict()
    with torch.no_grad():
        expected = reference_logits(state, args, tokens, gates=adapter.gates, start_layer=start_layer,
                                    layer_prefixes=list(adapter.prefix))
        torch.testing.assert_close(model(tokens[None], adapter)[0].double(), expected, atol=1e-4, rtol=1e-4)
        cache = KVCache(args, 1, seqlen)
        stepped = torch.cat([model(tokens[None, t:t + 1], adapter, cache)[0] for t in range(seqlen)])
        torch.testing.assert_close(stepped.double(), expected, atol=1e-4, rtol=1e-4)
        if args.n_layers - start_layer > 1:  # a shared prefix in its place gives another model: the test can fail
            shared = reference_logits(state, args, tokens, adapter.prefix[0], adapter.gates, start_layer)
            assert not torch.allclose(shared, expected, atol=1e-3)
