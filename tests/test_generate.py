"""Generation: the KV cache against full forwards, sampling, batches of mixed lengths
and mixed Aligners, stopping, and the command line."""

import copy
import json
import shutil
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

from support import cli
import generate as generate_script
import llama
from aligner import Aligner, AlignerBank
from conftest import TINY
from support.data import format_prompt
from generate import cut_at_stop, decode_one_token, generate, prefill, rows_of, sample
from llama import KVCache, ModelArgs, Transformer, prefix_attention
from support.formats import load

# float32 rounding, after a few layers of logits up to about 6 in size: the batched,
# cached and fused paths sum in different orders
FLOAT32 = dict(atol=5e-5, rtol=1e-4)
PROMPTS = ["The quick brown fox", "Hi", "A robin is a bird. A salmon is a fish. The capital", "Question: What"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def tiny(tiny_ckpt):
    """(model, tokenizer) of the tiny checkpoint, float32 on CPU, at most 8 rows a batch."""
    return load(tiny_ckpt, max_seq_len=256, max_batch_size=8)


def random_model(n_kv_heads=2, seed=0):
    """A tiny Transformer whose outputs depend visibly on its input (weights of std 0.2)."""
    torch.manual_seed(seed)
    args = ModelArgs(**{**TINY, "n_kv_heads": n_kv_heads}, vocab_size=384, max_seq_len=64)
    model = Transformer(args)
    for p in model.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.2)
    return model.requires_grad_(False).eval()


def trained_aligner(args, n_tokens=1, seed=0):
    """An Aligner with non-zero gates, as after training (a fresh one changes nothing)."""
    torch.manual_seed(seed)
    aligner = Aligner(args, n_tokens=n_tokens)
    with torch.no_grad():
        aligner.gates.normal_(std=1.0)
    return aligner


def encode(tokenizer, texts):
    return [tokenizer.encode(t, bos=True) for t in texts]


def greedy_ids(model, prompt, n, aligner=None):
    """n greedy token ids after one prompt, by prefill and decode_one_token alone (no EOS handling)."""
    cache = KVCache(model.args, 1, len(prompt) + n)
    logits = prefill(model, torch.tensor([prompt]), aligner, cache)
    ids = []
    for _ in range(n):
        token = sample(logits)
        ids.append(token.item())
        logits = decode_one_token(model, token[:, None], aligner, cache)
    return ids


def cached_logits(model, tokens, aligner, split, pad=None):
    """Logits of every position of tokens (B, T): the first `split` by prefill, then one token at a time."""
    cache = KVCache(model.args, tokens.shape[0], tokens.shape[1], pad=pad)
    out = [model(tokens[:, :split], aligner, cache)]
    for t in range(split, tokens.shape[1]):
        out.append(decode_one_token(model, tokens[:, t:t + 1], aligner, cache)[:, None])
    return torch.cat(out, dim=1)  # (B, T, V)


# -----------------------------------------------------------------------------
# the cache

@pytest.mark.parametrize("n_kv_heads", [2, 4], ids=["grouped-query", "multi-head"])
@pytest.mark.parametrize("n_tokens", [0, 1, 3], ids=["base", "N=1", "N=3"])
@torch.no_grad()
def test_cached_decoding_gives_the_logits_of_a_full_forward(n_kv_heads, n_tokens):
    model = random_model(n_kv_heads)
    aligner = trained_aligner(model.args, n_tokens) if n_tokens else None
    tokens = torch.randint(0, 384, (3, 14), generator=torch.Generator().manual_seed(1))
    full = model(tokens, aligner)
    torch.testing.assert_close(cached_logits(model, tokens, aligner, split=5), full, **FLOAT32)
    if aligner is not None:  # the Aligner changes the logits, so the comparison above could fail
        assert not torch.allclose(model(tokens), full, atol=1e-3)


def test_prefix_keys_and_values_are_computed_once_per_generation(tiny, monkeypatch):
    model, tokenizer = tiny
    calls = []
    real = llama.prefix_keys_values
    monkeypatch.setattr(llama, "prefix_keys_values", lambda *args: calls.append(1) or real(*args))
    aligner = trained_aligner(model.args)
    generate(model, tokenizer, encode(tokenizer, PROMPTS[:2]), aligner, max_new_tokens=12)
    assert len(calls) == model.args.n_layers - aligner.start_layer  # once per adapted layer, not per step


@torch.no_grad()
def test_one_token_shortcut_equals_the_general_prefix_attention(monkeypatch):
    """With N = 1 the model takes its shortcut, beta_l * V_p at every position. The same model whose
    prefix attention is Eq. 7 written out in full, a softmax over the one prefix key, gives the
    same logits, for whole sequences and for a cache filled a token at a time."""
    model = random_model()
    one = trained_aligner(model.args, n_tokens=1)
    tokens = torch.randint(0, 384, (2, 9), generator=torch.Generator().manual_seed(5))
    shortcut, cached = model(tokens, one), cached_logits(model, tokens, one, 4)

    def written_out(q, k_p, v_p, gate):
        weights = torch.softmax(q @ k_p.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)  # (B, H, T, 1)
        return gate * (weights @ v_p)

    monkeypatch.setattr(llama, "prefix_attention", written_out)
    general = model(tokens, one)
    torch.testing.assert_close(shortcut, general, **FLOAT32)
    torch.testing.assert_close(cached, general, **FLOAT32)
    assert not torch.allclose(general, model(tokens), atol=1e-3)  # the Aligner matters: the test can fail


@torch.no_grad()
def test_one_token_aligner_equals_the_same_token_twice():
    """The model's N = 1 shortcut against its general path: a prefix of one token written twice
    attends to two equal keys, half each, so it must give the same logits."""
    model = random_model()
    one = trained_aligner(model.args, n_tokens=1)
    twice = Aligner(model.args, n_tokens=2)
    twice.load_state_dict({"prefix": one.prefix.repeat(2, 1), "gates": one.gates})
    tokens = torch.randint(0, 384, (2, 9), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model(tokens, one), model(tokens, twice), **FLOAT32)
    torch.testing.assert_close(cached_logits(model, tokens, one, 4), cached_logits(model, tokens, twice, 4),
                               **FLOAT32)


# -----------------------------------------------------------------------------
# batches: left padding, and one Aligner per row

@pytest.mark.parametrize("with_aligner", [False, True], ids=["base", "aligner"])
def test_prompts_of_different_lengths_decode_as_each_alone(tiny, with_aligner):
    model, tokenizer = tiny
    aligner = trained_aligner(model.args, n_tokens=2) if with_aligner else None
    prompts = encode(tokenizer, PROMPTS)
    assert len({len(p) for p in prompts}) == len(prompts)
    together = generate(model, tokenizer, prompts, aligner, max_new_tokens=16)
    alone = [generate(model, tokenizer, [p], aligner, max_new_tokens=16)[0] for p in prompts]
    assert together == alone
    assert all(together)


@torch.no_grad()
def test_left_padded_rows_have_the_logits_of_each_row_alone():
    model = random_model()
    aligner = trained_aligner(model.args, n_tokens=2)
    gen = torch.Generator().manual_seed(3)
    rows = [torch.randint(0, 384, (n,), generator=gen) for n in (9, 4, 6)]
    tokens = torch.stack([torch.cat([torch.ones(9 - len(r), dtype=torch.long), r]) for r in rows])  # (3, 9)
    pad = torch.tensor([9 - len(r) for r in rows])
    padded = cached_logits(model, tokens, aligner, split=7, pad=pad)
    for b, row in enumerate(rows):
        torch.testing.assert_close(padded[b, 9 - len(row):], model(row[None], aligner)[0], **FLOAT32)


@pytest.mark.parametrize("n_tokens", [1, 3], ids=["N=1", "N=3"])
def test_a_batch_of_mixed_aligners_equals_the_single_runs(tiny, n_tokens):
    """Rows carrying different Aligners (and the base model) in one batched forward give,
    row by row, the greedy tokens and the logits of separate single-Aligner runs."""
    model, tokenizer = tiny
    aligners = [trained_aligner(model.args, n_tokens, seed=s) for s in (1, 2)] + [None]
    picks = [0, 2, 1, 0, 1]
    rows = AlignerBank(aligners).select(picks)
    prompts = encode(tokenizer, [PROMPTS[i % len(PROMPTS)] for i in range(len(picks))])
    mixed = generate(model, tokenizer, prompts, rows, max_new_tokens=16)
    single = [generate(model, tokenizer, [p], aligners[k], max_new_tokens=16)[0] for p, k in zip(prompts, picks)]
    assert mixed == single
    assert len(set(mixed[:3])) == 3  # the Aligners make a difference, so the comparison could fail

    # the logits, teacher-forced along the same continuation
    continuation = torch.randint(0, 384, (len(picks), 6), generator=torch.Generator().manual_seed(4))
    tokens = torch.cat([torch.tensor([p[:3] for p in prompts]), continuation], 1)  # (B, 9)
    with torch.no_grad():
        batched = cached_logits(model, tokens, rows, split=3)
        for b, k in enumerate(picks):
            alone = cached_logits(model, tokens[b:b + 1], aligners[k], split=3)
            torch.testing.assert_close(batched[b:b + 1], alone, **FLOAT32)


def test_more_prompts_than_a_batch_holds(tiny):
    model, tokenizer = tiny
    aligner = trained_aligner(model.args)
    prompts = encode(tokenizer, PROMPTS * 3)  # 12 prompts, batches of at most 8
    out = generate(model, tokenizer, prompts, AlignerBank([aligner, None]).select([i % 2 for i in range(12)]),
                   max_new_tokens=6)
    alone = [generate(model, tokenizer, [p], a, max_new_tokens=6)[0] for p, a in zip(prompts, [aligner, None] * 2)]
    assert out == alone * 3


def test_wrong_calls_are_named(tiny):
    model, tokenizer = tiny
    aligner = trained_aligner(model.args)
    prompts = encode(tokenizer, PROMPTS[:2])
    with pytest.raises(TypeError, match=r"pass bank\.select\(rows\)"):
        generate(model, tokenizer, prompts, AlignerBank([aligner, None]))
    with pytest.raises(ValueError, match="the AlignerRows hold 3 rows for 2 prompts"):
        generate(model, tokenizer, prompts, AlignerBank([aligner, None]).select([0, 1, 0]))
    with pytest.raises(ValueError, match="prompt 1 is empty; it needs at least the BOS token"):
        generate(model, tokenizer, [prompts[0], []])
    assert generate(model, tokenizer, prompts, aligner, max_new_tokens=0) == ["", ""]


# -----------------------------------------------------------------------------
# the attention kernel's inputs, and the compiled decode step

def test_eager_decoding_hands_the_kernel_no_mask_without_padding(tiny, monkeypatch):
    """Prompts of one length need no mask: the prefill is plain causal attention from
    position 0 and each new token sees every key. Only left padding brings a mask."""
    model, tokenizer = tiny
    calls = []  # (query length, mask given, is_causal) of every attention call
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kwargs):
        calls.append((q.shape[2], attn_mask is not None, is_causal))
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    prompt = encode(tokenizer, PROMPTS[:1])[0]
    out = generate(model, tokenizer, [prompt, prompt], trained_aligner(model.args), max_new_tokens=6)
    n_layers, n_steps = model.args.n_layers, len(calls) // model.args.n_layers - 1
    assert n_steps >= 1 and out[0] == out[1]
    assert calls == [(len(prompt), False, True)] * n_layers + [(1, False, False)] * n_layers * n_steps

    calls.clear()
    generate(model, tokenizer, encode(tokenizer, PROMPTS[:2]), max_new_tokens=3)  # left-padded
    assert calls and all(masked for _, masked, _ in calls)


def compile_unavailable():
    """Why torch.compile cannot run on this machine's CPU, or None: Inductor needs a C++ compiler."""
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return "torch.compile on the CPU needs a C++ compiler (g++ or clang++), and there is none here"
    return None


needs_compile = pytest.mark.skipif(compile_unavailable() is not None, reason=str(compile_unavailable()))


@needs_compile
def test_compiled_decoding_gives_the_eager_greedy_tokens(tiny):
    """Left-padded prompts of four lengths, with one Aligner for every row and with one
    Aligner per row from a bank (the base model among them): the same tokens either way."""
    model, tokenizer = tiny
    prompts = encode(tokenizer, PROMPTS)
    one = trained_aligner(model.args, n_tokens=2)
    per_row = AlignerBank([one, trained_aligner(model.args, n_tokens=2, seed=1), None]).select([0, 2, 1, 0])
    for aligner in (one, per_row):
        eager = generate(model, tokenizer, prompts, aligner, max_new_tokens=12)
        assert generate(model, tokenizer, prompts, aligner, max_new_tokens=12, compile=True) == eager
        assert all(eager)
    assert len(set(eager[:3])) == 3  # the rows' Aligners differ, so the comparison could fail


@needs_compile
def test_new_prompt_lengths_in_a_cache_bucket_compile_nothing_new(tiny):
    """Generations of other prompt lengths (within one cache bucket, one batch size) reuse
    the pooled cache and the compiled graph: no recompilation, no new graph."""
    from torch._dynamo.utils import counters

    model, tokenizer = tiny
    aligner = trained_aligner(model.args, n_tokens=2)
    batches = [encode(tokenizer, texts) for texts in
               (PROMPTS, [p + " fox" for p in PROMPTS[1:] + PROMPTS[:1]], [PROMPTS[2]] * 4)]
    assert len({tuple(map(len, prompts)) for prompts in batches}) == 3  # the last batch is not padded
    generate(model, tokenizer, batches[0], aligner, max_new_tokens=8, compile=True)
    graphs, caches = counters["stats"]["unique_graphs"], list(generate_script.STATIC_CACHES.values())
    assert graphs >= 1
    with torch.compiler.set_stance("fail_on_recompile"):
        for prompts in batches[1:]:
            out = generate(model, tokenizer, prompts, aligner, max_new_tokens=8, compile=True)
            assert out == generate(model, tokenizer, prompts, aligner, max_new_tokens=8)
    assert counters["stats"]["unique_graphs"] == graphs
    assert list(generate_script.STATIC_CACHES.values()) == caches


# -----------------------------------------------------------------------------
# stopping

def test_greedy_follows_the_prefill_and_decode_steps(tiny):
    model, tokenizer = tiny
    prompt = encode(tokenizer, PROMPTS[:1])
    ids = greedy_ids(model, prompt[0], 20)
    if tokenizer.eos_id in ids:
        ids = ids[:ids.index(tokenizer.eos_id)]
    assert generate(model, tokenizer, prompt, max_new_tokens=20) == [tokenizer.decode(ids)]


def test_each_row_stops_at_its_own_eos(tiny):
    """EOS is taken to be a token that one row generates early: that row ends just before it,
    EOS excluded, while the other rows go on as they would alone."""
    model, tokenizer = tiny
    prompts = encode(tokenizer, PROMPTS)
    ids = [greedy_ids(model, p, 16) for p in prompts]
    eos = ids[0][5]
    stopped = copy.copy(tokenizer)
    stopped.eos_id = eos
    expected = [tokenizer.decode(row[:row.index(eos)] if eos in row else row) for row in ids]
    assert generate(model, stopped, prompts, max_new_tokens=16) == expected
    assert len(expected[0]) < len(tokenizer.decode(ids[0]))


def test_each_row_stops_before_its_first_stop_string(tiny):
    model, tokenizer = tiny
    prompts = encode(tokenizer, PROMPTS)
    full = generate(model, tokenizer, prompts, max_new_tokens=24)
    # a two-letter stop string from the middle of the first row's answer
    at = next(i for i in range(4, len(full[0]) - 1) if full[0][i:i + 2].isascii() and full[0][i:i + 2].isalnum())
    stop = [full[0][at:at + 2], "\x00never"]
    expected = [cut_at_stop(text, stop)[0] for text in full]
    assert generate(model, tokenizer, prompts, max_new_tokens=24, stop=stop) == expected
    assert len(expected[0]) < len(full[0])


def test_streamed_pieces_join_into_the_returned_text(tiny):
    """on_token never sends what may still turn into a stop string."""
    model, tokenizer = tiny
    prompts = encode(tokenizer, PROMPTS)
    full = generate(model, tokenizer, prompts, max_new_tokens=24)
    stop = [full[1][6:9]]
    pieces = {}
    out = generate(model, tokenizer, prompts, max_new_tokens=24, stop=stop,
                   on_token=lambda row, text: pieces.setdefault(row, []).append(text))
    assert out == [cut_at_stop(text, stop)[0] for text in full]
    assert ["".join(pieces.get(row, [])) for row in range(len(prompts))] == out
    assert len(pieces[0]) > 1  # streamed, not sent at the end in one piece


def test_generation_stops_at_the_end_of_the_context(tiny):
    model, tokenizer = tiny
    long_prompt = [tokenizer.bos_id] + [100] * 250
    out = generate(model, tokenizer, [long_prompt], max_new_tokens=20)  # 5 tokens fit in max_seq_len 256
    assert len(out) == 1
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, tokenizer, [[tokenizer.bos_id] * 256], max_new_tokens=4)


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=needs_compile)], ids=["eager", "compiled"])
def test_reading_ahead_as_on_a_gpu_gives_the_same_text(tiny, monkeypatch, compile):
    """On a GPU the next step is queued before a step's tokens are read back; forced here on
    the CPU, it must not change what rows return: early EOS, stop strings, streaming, sampling."""
    model, tokenizer = tiny
    prompts = encode(tokenizer, PROMPTS)
    aligner = trained_aligner(model.args, n_tokens=2)
    ids = greedy_ids(model, prompts[0], 16, rows_of(aligner, slice(None), "cpu"))
    eos = ids[4]
    stopped = copy.copy(tokenizer)
    stopped.eos_id = eos  # the first row stops at its fifth token
    runs = [dict(max_new_tokens=16), dict(max_new_tokens=16, stop=["e", "\x00never"]),
            dict(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=3)]

    def outputs():
        pieces = []
        texts = [generate(model, stopped, prompts, aligner, compile=compile, **kw) for kw in runs]
        generate(model, stopped, prompts, aligner, compile=compile, max_new_tokens=16,
                 on_token=lambda row, text: pieces.append((row, text)))
        return texts, pieces

    expected = outputs()
    monkeypatch.setattr(generate_script, "READ_AHEAD", {"cpu"})
    assert outputs() == expected
    texts, pieces = expected
    assert texts[0][0] == tokenizer.decode(ids[:ids.index(eos)])  # the first row stopped early
    assert texts[1] != texts[0] and len(pieces) > len(prompts)  # stop strings cut rows; pieces streamed


# -----------------------------------------------------------------------------
# sampling

def greedy_by_full_forwards(model, tokenizer, prompt, n, aligner):
    """n greedy tokens the slow way: the whole sequence through the model at every step, no
    cache, no padding, the argmax of the last position; stopped before EOS."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(torch.tensor([ids]), aligner=aligner)[0, -1].argmax())
            if token == tokenizer.eos_id:
                break
            ids.append(token)
            out.append(token)
    return tokenizer.decode(out)


def test_greedy_is_the_argmax_of_full_forwards(tiny):
    """Greedy decoding of left-padded prompts of four lengths, through the cache, gives each
    prompt's argmax continuation computed alone with full forwards; so does sampling with top-k 1
    at any temperature."""
    model, tokenizer = tiny
    prompts = encode(tokenizer, PROMPTS)
    aligner = trained_aligner(model.args)
    expected = [greedy_by_full_forwards(model, tokenizer, p, 16, aligner) for p in prompts]
    assert generate(model, tokenizer, prompts, aligner, max_new_tokens=16) == expected
    assert generate(model, tokenizer, prompts, aligner, max_new_tokens=16, temperature=2.0, top_k=1, seed=0) == expected
    assert len(set(expected)) == len(expected) and all(expected)


def test_a_seed_makes_sampling_reproducible(tiny):
    model, tokenizer = tiny
    prompts = encode(tokenizer, PROMPTS)
    runs = [generate(model, tokenizer, prompts, max_new_tokens=16, temperature=1.0, top_p=0.95, seed=s)
            for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


@settings(max_examples=60, deadline=None)
@given(logits=st.lists(st.floats(-6, 6), min_size=2, max_size=40), top_p=st.floats(0.01, 0.99),
       temperature=st.sampled_from([0.5, 1.0, 2.0]), seed=st.integers(0, 2**16))
def test_top_p_never_samples_outside_the_nucleus(logits, top_p, temperature, seed):
    """The nucleus: the tokens whose more probable tokens together hold less than top_p.
    Probabilities within float32's rounding of each other count as ties, which either order may break."""
    logits = torch.tensor(logits)
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    more_probable_mass = (probs[None, :] * (probs[None, :] > probs[:, None] + 1e-6)).sum(-1)  # (V,)
    nucleus = more_probable_mass < top_p + 1e-5
    drawn = sample(logits.expand(500, -1), temperature, top_p=top_p,
                   generator=torch.Generator().manual_seed(seed))
    assert nucleus[drawn].all()


@pytest.mark.parametrize("p, kept", [(0.4, [True, False, False]), (0.7, [True, True, False]),
                                     (0.9, [True, True, True])])
def test_top_p_keeps_the_token_that_reaches_p(p, kept):
    """Probabilities 0.5, 0.3, 0.2: the nucleus for p is the most probable tokens up to and
    including the one whose probability brings the sum to p or past it."""
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    assert torch.isfinite(generate_script.top_p_filter(logits, p))[0].tolist() == kept


@pytest.mark.parametrize("p, kept", [(0.75, [True, True, False]), (0.0, [True, False, False])])
def test_top_p_stops_where_the_sum_reaches_p_exactly(p, kept):
    """Probabilities 0.5, 0.25, 0.25 (exact in float32): the first two already hold 0.75, so p = 0.75
    keeps two; and the most probable token is kept even at p = 0."""
    logits = torch.tensor([[0.5, 0.25, 0.25]]).log()
    assert torch.isfinite(generate_script.top_p_filter(logits, p))[0].tolist() == kept


@settings(max_examples=30, deadline=None)
@given(logits=st.lists(st.floats(-6, 6), min_size=2, max_size=40), top_k=st.integers(1, 8),
       seed=st.integers(0, 2**16))
def test_top_k_samples_only_the_k_most_probable(logits, top_k, seed):
    logits = torch.tensor(logits)
    kth = logits.sort(descending=True).values[min(top_k, len(logits)) - 1]
    drawn = sample(logits.expand(500, -1), 1.0, top_k=top_k, generator=torch.Generator().manual_seed(seed))
    assert (logits[drawn] >= kth).all()


def test_temperature_divides_the_logits():
    """Two tokens whose logits differ by 1, sampled at temperature 0.5: the second is drawn with
    probability sigmoid(1 / 0.5) = 0.881 (at temperature 2 it would be sigmoid(0.5) = 0.622)."""
    drawn = sample(torch.tensor([[0.0, 1.0]]).expand(20_000, -1), temperature=0.5,
                   generator=torch.Generator().manual_seed(0))
    assert drawn.float().mean().item() == pytest.approx(0.8808, abs=0.01)


@pytest.mark.parametrize("temperature, top_p, expected", [
    (0.5, 0.6, [1.0, 0.0, 0.0]),
    (2.0, 0.75, [0.41545, 0.32181, 0.26274]),
], ids=["sharpened", "flattened"])
def test_the_temperature_comes_before_top_p(temperature, top_p, expected):
    """Probabilities 0.5, 0.3, 0.2. At temperature 0.5 they become 0.658, 0.237, 0.105 (each
    squared, renormalised), and the nucleus for p = 0.6 is the first token alone; top-p on the
    raw probabilities would keep two (0.5 < 0.6) and give 0.735, 0.265, 0. At temperature 2
    they become 0.415, 0.322, 0.263 (square roots), whose first two hold 0.737 < 0.75, so all
    three stay; top-p first would drop the third (0.5 + 0.3 >= 0.75) and give 0.564, 0.436, 0."""
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    probs = generate_script.sampling_distribution(logits, temperature, top_p)
    assert probs[0].tolist() == pytest.approx(expected, abs=1e-4)
    drawn = sample(logits.expand(400, -1), temperature, top_p, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(drawn, minlength=3) / 400
    if expected[0] == 1.0:
        assert counts.tolist() == [1.0, 0.0, 0.0]  # one token can be drawn, whatever the seed
    else:
        assert counts[2] > 0.15  # top-p before the temperature could never draw it


def test_cut_at_stop_cuts_before_the_earliest_stop_string():
    assert cut_at_stop("one two three two", ["three", "two"]) == ("one ", True)
    assert cut_at_stop("one two", ["", "four"]) == ("one two", False)


class Letters:
    """A tokenizer whose ids are characters, for a row's text step by step."""
    eos_id = 0

    @staticmethod
    def decode(ids):
        return "".join(map(chr, ids))


def test_streaming_holds_back_what_may_still_become_a_stop_string():
    """Stop string "ab": after "xa" only "x" is final; once "b" comes the row ends at "x", and
    nothing of the stop string was ever sent."""
    row, pieces = generate_script.Row(0), []
    for ch in "xab":
        row.add(ord(ch), Letters, ["ab"], lambda index, text: pieces.append(text), last=False)
        if ch == "a":
            assert pieces == ["x"] and row.text is None
    assert row.text == "x" and pieces == ["x"]
    row = generate_script.Row(1)
    for ch in "xay":
        row.add(ord(ch), Letters, ["ab"], lambda index, text: pieces.append(text), last=ch == "y")
    assert row.text == "xay" and pieces == ["x", "x", "ay"]


def test_a_prompts_file_is_json_by_its_suffix_and_lines_otherwise(tmp_path):
    for name in ("prompts.txt", "prompts", "prompts.md"):
        (tmp_path / name).write_text('Name a bird.\n\n{"instruction": "kept as text"}\n')
        assert [(q.instruction, q.input, q.question_id) for q in generate_script.read_questions(tmp_path / name)] == [
            ("Name a bird.", "", 1), ('{"instruction": "kept as text"}', "", 2)]
    (tmp_path / "p.jsonl").write_text('{"instruction": "Add.", "input": "2 and 3"}\n{"instruction": "Hi."}\n')
    assert [(q.instruction, q.input) for q in generate_script.read_questions(tmp_path / "p.jsonl")] == [
        ("Add.", "2 and 3"), ("Hi.", "")]
    (tmp_path / "p.json").write_text('[{"instruction": "Add.", "input": "2 and 3"}, {"instruction": "Hi."}]')
    assert [(q.instruction, q.input) for q in generate_script.read_questions(tmp_path / "p.json")] == [
        ("Add.", "2 and 3"), ("Hi.", "")]


def test_aligner_names_are_stems_unless_two_share_one():
    assert generate_script.aligner_names(["runs/a/best.pt", "runs/b/best.pt", "runs/dpo.pt", "base"]) == [
        "a-best", "b-best", "dpo", "base"]
    assert generate_script.aligner_names(["/x/a/best.pt", "/y/a/best.pt", "/x/b/best.pt"]) == [
        "x-a-best", "y-a-best", "b-best"]
    assert generate_script.aligner_names(["/x/a.pt", "/x/a.pt"]) == ["x-a", "x-a"]  # --answers-dir refuses these


@pytest.mark.parametrize("length, positions", [(1, 256), (256, 256), (257, 512), (700, 768), (900, 800)])
def test_a_compiled_cache_holds_the_next_multiple_of_256_within_the_context(length, positions):
    args = ModelArgs(dim=8, n_layers=1, n_heads=2, vocab_size=16, max_seq_len=800)
    assert generate_script.static_cache(args, 1, length, "cpu", torch.float32).max_len == positions


# -----------------------------------------------------------------------------
# the bank's size

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_bank_holds_5056_values_per_one_token_aligner_for_llama_2_7b(dtype):
    args = ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000)
    bank = AlignerBank([Aligner(args, n_tokens=1) for _ in range(3)]).to(dtype=dtype)
    assert bank.nbytes() == 3 * 5056 * dtype.itemsize


# -----------------------------------------------------------------------------
# the command line

def test_command_line_answers_side_by_side(tiny, tiny_ckpt, tmp_path, capsys):
    model, tokenizer = tiny
    aligner = trained_aligner(model.args, n_tokens=2)
    aligner.save(tmp_path / "sft.pt")
    instructions = ["Name a bird.", "What is two plus three?"]
    generate_script.main(["--ckpt", str(tiny_ckpt), "--aligner", str(tmp_path / "sft.pt"), "--aligner", "base",
                          "--prompt", instructions[0], "--prompt", instructions[1], "--max-new-tokens", "8",
                          "--out", str(tmp_path / "out" / "answers.jsonl")])
    records = [json.loads(line) for line in (tmp_path / "out" / "answers.jsonl").read_text().splitlines()]
    assert [(r["instruction"], r["aligner"]) for r in records] == [
        (i, name) for i in instructions for name in ("sft", "base")]
    assert records[0]["prompt"] == records[1]["prompt"] == (  # the exact text given to the model
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName a bird.\n\n### Response:")
    prompts = encode(tokenizer, [format_prompt(i) for i in instructions])
    for name, a in (("sft", aligner), ("base", None)):
        expected = generate(model, tokenizer, prompts, a, max_new_tokens=8)
        assert [r["output"] for r in records if r["aligner"] == name] == expected
    printed = capsys.readouterr().out
    assert printed.count("--- sft ---") == 2 and printed.count("--- base ---") == 2
    assert all(r["output"] in printed for r in records)


def test_command_line_reads_a_jsonl_prompts_file(tiny, tiny_ckpt, tmp_path, capsys):
    model, tokenizer = tiny
    lines = [{"instruction": "Name a bird.", "input": ""}, {"instruction": "Add these.", "input": "2 and 3"}]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    generate_script.main(["--ckpt", str(tiny_ckpt), "--prompts-file", str(tmp_path / "prompts.jsonl"),
                          "--template", "none", "--max-new-tokens", "6", "--out", str(tmp_path / "a.jsonl")])
    records = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    expected = generate(model, tokenizer, encode(tokenizer, ["Name a bird.", "Add these.\n\n2 and 3"]),
                        max_new_tokens=6)
    assert [r["output"] for r in records] == expected
    assert [r["aligner"] for r in records] == ["base", "base"]
    assert [r["prompt"] for r in records] == ["Name a bird.", "Add these.\n\n2 and 3"]


def test_command_line_needs_a_prompt_with_a_checkpoint(tiny_ckpt, capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.run(generate_script.main, ["--ckpt", str(tiny_ckpt)])
    assert stopped.value.code == 2 and "give --prompt or --prompts-file" in capsys.readouterr().err


def test_command_line_names_the_line_of_a_bad_prompts_file(tiny_ckpt, tmp_path):
    (tmp_path / "prompts.jsonl").write_text('{"instruction": "ok"}\n{"text": "no instruction"}\n')
    with pytest.raises(ValueError, match="prompts.jsonl, line 2"):
        generate_script.main(["--ckpt", str(tiny_ckpt), "--prompts-file", str(tmp_path / "prompts.jsonl")])


def test_without_the_demo_it_says_how_to_build_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(generate_script, "DEMO_CKPT", tmp_path / "demo" / "llama-demo")
    with pytest.raises(FileNotFoundError, match="support.build_demo"):
        generate_script.main([])


def test_command_line_streams_one_prompt_to_a_terminal(tiny, tiny_ckpt, monkeypatch, capsys):
    model, tokenizer = tiny
    pieces = []
    real = generate_script.generate

    def spy(*args, on_token=None, **kwargs):
        return real(*args, on_token=lambda row, text: pieces.append(text) or on_token(row, text), **kwargs)

    monkeypatch.setattr(generate_script, "generate", spy)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    generate_script.main(["--ckpt", str(tiny_ckpt), "--prompt", "Name a bird.", "--max-new-tokens", "12"])
    expected = generate(model, tokenizer, encode(tokenizer, [format_prompt("Name a bird.")]), max_new_tokens=12)[0]
    assert capsys.readouterr().out == expected + "\n"
    assert len(pieces) > 1 and "".join(pieces) == expected


def test_command_line_compile_reaches_generate(tiny_ckpt, monkeypatch, capsys):
    """--compile is passed on to generate (what it does is tested above)."""
    seen = []
    monkeypatch.setattr(generate_script, "generate",
                        lambda model, tok, prompts, aligner, **kw: seen.append(kw["compile"]) or ["" for _ in prompts])
    for flags in ([], ["--compile"]):
        generate_script.main(["--ckpt", str(tiny_ckpt), "--prompt", "Name a bird.", *flags])
    assert seen == [False, True]
