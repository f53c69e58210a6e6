"""The base model: Meta's shapes and checkpoint layout, the attention's pieces, the tokenizer."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from support import files, formats
import llama
from conftest import make_checkpoint
from llama import KVCache, ModelArgs, Transformer, prefix_attention, repeat_kv, sequence_attention

# params.json as Meta ships it for each size (vocab_size -1: from the tokenizer)
META_PARAMS = {
    "llama-7b": ({"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-06,
                  "vocab_size": -1}, 11008, 6_738_415_616),
    "llama-65b": ({"dim": 8192, "multiple_of": 256, "n_heads": 64, "n_layers": 80, "norm_eps": 1e-05,
                   "vocab_size": -1}, 22016, 65_285_660_672),
    "llama-2-7b": ({"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05,
                    "vocab_size": -1}, 11008, 6_738_415_616),
    "llama-2-13b": ({"dim": 5120, "multiple_of": 256, "n_heads": 40, "n_layers": 40, "norm_eps": 1e-05,
                     "vocab_size": -1}, 13824, 13_015_864_320),
    "llama-2-70b": ({"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64,
                     "n_kv_heads": 8, "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1}, 28672, 68_976_648_192),
}


@pytest.mark.parametrize("name", META_PARAMS)
def test_meta_params_build_the_published_shapes(name):
    params, ffn_hidden, n_params = META_PARAMS[name]
    args = ModelArgs(**params)
    args.vocab_size = 32000
    with torch.device("meta"):
        model = Transformer(args)
    assert model.layers[0].feed_forward.w1.weight.shape == (ffn_hidden, args.dim)
    assert model.layers[0].attention.wk.weight.shape == (args.n_kv_heads * args.head_dim, args.dim)
    assert sum(p.numel() for p in model.parameters()) == n_params


def test_module_names_are_metas_checkpoint_keys():
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=10)
    keys = set(Transformer(args).state_dict())
    assert keys == {"tok_embeddings.weight", "norm.weight", "output.weight"} | {
        f"layers.0.{k}.weight" for k in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                                         "feed_forward.w1", "feed_forward.w2", "feed_forward.w3",
                                         "attention_norm", "ffn_norm")}


def hand_written_attention(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False):
    """scaled_dot_product_attention's signature, computed by llama.sequence_attention."""
    assert not (is_causal and attn_mask is not None)
    assert enable_gqa == (q.shape[1] != k.shape[1])
    n_rep = q.shape[1] // k.shape[1]
    return sequence_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attn_mask, is_causal)


@settings(max_examples=15, deadline=None)
@given(n_kv_heads=st.sampled_from([1, 2, 4]), seqlen=st.integers(2, 12), split=st.integers(1, 11),
       pad=st.lists(st.integers(0, 5), min_size=2, max_size=2), seed=st.integers(0, 2**16))
def test_fused_attention_equals_the_hand_written_one(n_kv_heads, seqlen, split, pad, seed):
    """Every way forward calls the fused kernel (whole sequences, a cache continued in chunks,
    left-padded rows) gives what sequence_attention gives."""
    torch.manual_seed(seed)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=50, multiple_of=16)
    model = Transformer(args).eval()
    tokens = torch.randint(0, 50, (2, seqlen))
    split = min(split, seqlen - 1)

    def run():
        whole = model(tokens)
        cache = KVCache(args, 2, seqlen)
        chunked = torch.cat([model(tokens[:, :split], cache=cache), model(tokens[:, split:], cache=cache)], 1)
        cache = KVCache(args, 2, seqlen, pad=torch.tensor(pad))
        padded = torch.cat([model(tokens[:, :split], cache=cache), model(tokens[:, split:], cache=cache)], 1)
        return whole, chunked, padded

    with torch.no_grad():
        fused = run()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(llama.F, "scaled_dot_product_attention", hand_written_attention)
            by_hand = run()
    for a, b in zip(fused, by_hand):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@settings(max_examples=20, deadline=None)
@given(n_tokens=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_prefix_softmax_is_separate_and_unmasked(n_tokens, seed):
    """prefix_attention is softmax over the N prefix keys alone, for every query position."""
    torch.manual_seed(seed)
    q = torch.randn(2, 3, 5, 8)
    k_p, v_p = torch.randn(1, 3, n_tokens, 8), torch.randn(1, 3, n_tokens, 8)
    gate = torch.randn(1, 3, 1, 1)
    out = prefix_attention(q, k_p, v_p, gate)
    for t in range(5):
        weights = torch.softmax(q[:, :, t:t + 1] @ k_p.transpose(-2, -1) / 8 ** 0.5, dim=-1)  # (B, H, 1, N)
        torch.testing.assert_close(out[:, :, t:t + 1], gate * (weights @ v_p), atol=1e-5, rtol=1e-5)


def test_rms_norm_divides_by_the_root_mean_square_plus_eps():
    """x / sqrt(mean(x^2) + eps) * weight, with the model's eps: for inputs of size 1e-3 the mean
    square (1e-6) is smaller than eps (1e-5), so eps decides most of the result."""
    x = torch.full((1, 4), 1e-3)
    x[0, 1] = -2e-3
    norm = llama.RMSNorm(4, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 0.5, 1.0]))
    mean_square = (1 + 4 + 1 + 1) * 1e-6 / 4
    expected = x / (mean_square + 1e-5) ** 0.5 * norm.weight
    torch.testing.assert_close(norm(x), expected.detach(), rtol=1e-5, atol=0)


def test_rope_rotates_adjacent_pairs_by_position():
    """Pair (x0, x1) at position m turns by angle m * theta^0: Meta's layout, no permutation."""
    x = torch.zeros(1, 3, 1, 4)
    x[..., 0] = 1.0  # the first pair is (1, 0)
    out = llama.apply_rotary_emb(x, llama.precompute_freqs_cis(4, 3))
    angles = torch.arange(3).float()
    torch.testing.assert_close(out[0, :, 0, 0], torch.cos(angles))
    torch.testing.assert_close(out[0, :, 0, 1], torch.sin(angles))


# --- Meta's checkpoint format ------------------------------------------------

@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_checkpoint_round_trip(tmp_path, n_shards):
    """Written as Meta ships it, whole or as 2 model-parallel shards (with Meta's extra
    rope.freqs key), the model loads back to identical logits."""
    model = make_checkpoint(tmp_path / "tiny", n_shards=n_shards).eval()
    for i in range(n_shards):
        path = tmp_path / "tiny" / f"consolidated.{i:02d}.pth"
        shard = torch.load(path, weights_only=True)
        shard["rope.freqs"] = torch.zeros(8)
        torch.save(shard, path)
    loaded, tokenizer = formats.load(tmp_path / "tiny")
    tokens = torch.tensor([tokenizer.encode("The quick brown fox jumps over the lazy dog.")])
    assert torch.equal(loaded(tokens), model(tokens))
    assert all(not p.requires_grad for p in loaded.parameters())


# Meta's model-parallel layout, written out (fairscale's ParallelEmbedding and RowParallelLinear
# split the input dimension, ColumnParallelLinear the output one; norms are whole in every shard)
META_SPLIT = {"tok_embeddings.weight": 1, "norm.weight": None, "output.weight": 0,
              "attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0,
              "attention.wo.weight": 1, "feed_forward.w1.weight": 0, "feed_forward.w2.weight": 1,
              "feed_forward.w3.weight": 0, "attention_norm.weight": None, "ffn_norm.weight": None}


def meta_split(key):
    return META_SPLIT[key.split(".", 2)[-1] if key.startswith("layers.") else key]


def test_shards_split_as_meta_splits_them(tmp_path):
    """Every kind of weight, in shard 1 of 2, is the half Meta's layout puts there."""
    model = make_checkpoint(tmp_path / "tiny", n_shards=2)
    shard = torch.load(tmp_path / "tiny" / "consolidated.01.pth", weights_only=True)
    full = model.state_dict()
    assert set(shard) == set(full)
    for key, tensor in full.items():
        dim = meta_split(key)
        assert torch.equal(shard[key], tensor if dim is None else tensor.chunk(2, dim)[1]), key


@pytest.mark.parametrize("n_shards", [1, 2, 4])
def test_a_slice_of_rows_reads_what_the_whole_weight_holds(tmp_path, n_shards):
    """MetaCheckpoint.get(key, rows) equals the merged weight's rows, whichever shards hold them."""
    model = make_checkpoint(tmp_path / "tiny", n_shards=n_shards)
    ckpt = formats.meta.MetaCheckpoint(tmp_path / "tiny")
    for key, tensor in model.state_dict().items():
        assert torch.equal(ckpt.get(key), tensor) and ckpt.shape(key) == tuple(tensor.shape), key
        n = tensor.shape[0]
        for rows in (slice(0, 1), slice(n // 3, n - 1), slice(n // 2 - 1, n // 2 + 1), slice(n - 2, n)):
            assert torch.equal(ckpt.get(key, rows), tensor[rows]), (key, rows)


def test_a_vocab_size_of_minus_one_is_the_tokenizers(tmp_path):
    """Meta's params.json says vocab_size -1: the model takes the tokenizer's 384 pieces."""
    model = make_checkpoint(tmp_path / "tiny").eval()
    path = tmp_path / "tiny" / "params.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "vocab_size": -1}))
    loaded, tokenizer = formats.load(tmp_path / "tiny")
    assert loaded.args.vocab_size == tokenizer.n_words == 384
    tokens = torch.tensor([tokenizer.encode("A robin is a bird.")])
    assert torch.equal(loaded(tokens), model(tokens))
    with pytest.raises(ValueError, match="vocab_size must be set"):
        Transformer(ModelArgs(dim=8, n_layers=1, n_heads=2))


def test_positions_past_the_context_or_the_cache_are_named():
    args = ModelArgs(dim=8, n_layers=1, n_heads=2, vocab_size=16, max_seq_len=8)
    model = Transformer(args)
    with pytest.raises(ValueError, match="a cache of 9 positions exceeds max_seq_len 8"):
        KVCache(args, 1, 9)
    with pytest.raises(ValueError, match="9 positions exceed max_seq_len 8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    cache = KVCache(args, 1, 4)
    model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="the KV cache holds 4 positions; 5 were asked for"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=cache)


def test_a_missing_tokenizer_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.model in .*tiny or in"):
        formats.find_tokenizer(tmp_path / "tiny")
    with pytest.raises(FileNotFoundError, match=r"absent\.model: no tokenizer model here"):
        formats.Tokenizer(tmp_path / "absent.model")


def test_tokenizer_is_found_in_the_folder_or_beside_it(tmp_path):
    make_checkpoint(tmp_path / "tiny")
    assert formats.find_tokenizer(tmp_path / "tiny") == tmp_path / "tokenizer.model"
    (tmp_path / "tokenizer.model").rename(tmp_path / "tiny" / "tokenizer.model")
    assert formats.find_tokenizer(tmp_path / "tiny") == tmp_path / "tiny" / "tokenizer.model"


def test_real_llama_tokenizer(shared_data):
    tokenizer = formats.Tokenizer(shared_data / "llama-tokenizer" / "tokenizer.model")
    assert tokenizer.encode("The quick brown fox") == [1, 450, 4996, 17354, 1701, 29916]
    assert (tokenizer.n_words, tokenizer.bos_id, tokenizer.eos_id) == (32000, 1, 2)


# --- bad input: one line that names the problem ------------------------------

def one_line_error(exc_type, fn, *args):
    with pytest.raises(exc_type) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_params_json(tmp_path):
    make_checkpoint(tmp_path / "tiny")
    (tmp_path / "tiny" / "params.json").unlink()
    assert "params.json" in one_line_error(FileNotFoundError, formats.load, tmp_path / "tiny")


def test_unknown_params_key(tmp_path):
    make_checkpoint(tmp_path / "tiny")
    path = tmp_path / "tiny" / "params.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "use_scaled_rope": True}))
    assert "use_scaled_rope" in one_line_error(ValueError, formats.load, tmp_path / "tiny")


def test_shard_count_that_does_not_split(tmp_path):
    model = make_checkpoint(tmp_path / "tiny")
    message = one_line_error(ValueError, formats.save, model, tmp_path / "three", 3)
    assert "does not split into 3 shards" in message
    make_checkpoint(tmp_path / "two", n_shards=2)
    (tmp_path / "two" / "consolidated.01.pth").rename(tmp_path / "two" / "consolidated.02.pth")
    assert "numbered" in one_line_error(ValueError, formats.load, tmp_path / "two")
    (tmp_path / "two" / "consolidated.02.pth").unlink()  # one shard of two: half of each split weight
    message = one_line_error(ValueError, formats.load, tmp_path / "two")
    assert "tok_embeddings.weight" in message and "1 shard" in message


def test_wrong_key(tmp_path):
    make_checkpoint(tmp_path / "tiny")
    path = tmp_path / "tiny" / "consolidated.00.pth"
    shard = torch.load(path, weights_only=True)
    shard["layers.0.attention.wq.wieght"] = shard.pop("layers.0.attention.wq.weight")
    torch.save(shard, path)
    message = one_line_error(ValueError, formats.load, tmp_path / "tiny")
    assert "consolidated.00.pth" in message and "layers.0.attention.wq.wieght" in message


@pytest.mark.parametrize("change, where", [("drop", "missing key"), ("add", "unexpected key")])
def test_shards_that_hold_different_keys_are_refused(tmp_path, change, where):
    make_checkpoint(tmp_path / "tiny", n_shards=2)
    path = tmp_path / "tiny" / "consolidated.01.pth"
    shard = torch.load(path, weights_only=True)
    if change == "drop":
        del shard["layers.2.attention.wv.weight"]
        key = "layers.2.attention.wv.weight"
    else:
        shard["layers.2.attention.wz.weight"] = torch.zeros(4)
        key = "layers.2.attention.wz.weight"
    torch.save(shard, path)
    message = one_line_error(ValueError, formats.load, tmp_path / "tiny")
    assert "consolidated.01.pth" in message and f"{where} '{key}'" in message


def test_a_weight_missing_from_every_shard_is_named(tmp_path):
    make_checkpoint(tmp_path / "tiny", n_shards=2)
    for i in range(2):
        path = tmp_path / "tiny" / f"consolidated.{i:02d}.pth"
        shard = torch.load(path, weights_only=True)
        del shard["layers.1.feed_forward.w3.weight"]
        torch.save(shard, path)
    message = one_line_error(ValueError, formats.load, tmp_path / "tiny")
    assert "missing key 'layers.1.feed_forward.w3.weight'" in message and str(tmp_path / "tiny") in message


def test_atomic_save_keeps_the_old_file_when_a_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    files.atomic_save({"x": torch.ones(3)}, path)

    def broken_save(obj, f):
        f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        files.atomic_save({"x": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_written_files_get_the_permissions_the_umask_allows(tmp_path):
    """A file written atomically is readable as any file the user writes: 0666 less the umask, not
    the private 0600 of the temporary file it starts as."""
    old = os.umask(0o022)
    try:
        files.atomic_text(tmp_path / "settings.json", "{}\n")
        files.atomic_save({"x": torch.ones(1)}, tmp_path / "best.pt")
    finally:
        os.umask(old)
    assert [(tmp_path / n).stat().st_mode & 0o777 for n in ("settings.json", "best.pt")] == [0o644, 0o644]


def test_an_empty_torch_file_is_named_as_empty(tmp_path):
    (tmp_path / "state.pt").write_bytes(b"")
    with pytest.raises(files.FileError, match=r"state\.pt: the file is empty \(expected: training state\)"):
        files.load_pt(tmp_path / "state.pt", "training state")


def test_a_torch_file_holding_other_objects_is_refused(tmp_path):
    """Files are read with weights_only: a pickled object other than tensors and plain data (here a
    Path) is never rebuilt, and the file is named."""
    torch.save({"prefix": torch.ones(1), "note": Path("x")}, tmp_path / "odd.pt")
    with pytest.raises(files.FileError, match=r"odd\.pt: not a readable Aligner file: it holds something other"):
        files.load_pt(tmp_path / "odd.pt", "Aligner file")


@pytest.mark.parametrize("value, problem", [
    ([0.5], "prefix is a list, not a tensor"), (torch.tensor([1.0, math.nan]), "prefix holds NaN"),
    (torch.tensor([-math.inf]), "prefix holds an infinite value"),
    (torch.tensor([2e10]), "prefix holds 2e+10, beyond 1e+10: it has exploded"), (torch.tensor([1e9]), None),
    (torch.tensor([3]), None)])
def test_bad_value_names_the_first_unusable_tensor(value, problem):
    assert files.bad_value({"gates": torch.zeros(2), "prefix": value}) == problem
