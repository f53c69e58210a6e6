"""Hugging Face LLaMA folders read in Meta's names and layout: every format gives back Meta's
weights, row slices included; damaged files and configs this model cannot represent are refused
in one line that names the file and the key."""

import json
from pathlib import Path

import pytest
import torch

from support.formats import hf
from conftest import TINY, make_checkpoint
from support.files import FileError
from support.formats.hf import HFCheckpoint, is_hf_folder, rotary_rows
from aligner import Aligner
from hf_layout import to_half_split, to_hf_state, write_hf, write_safetensors
from llama import ModelArgs, Transformer
from support import formats


@pytest.fixture(scope="module")
def meta(tmp_path_factory):
    """(the tiny random model, its tokenizer's path); n_kv_heads 2 of 4 heads."""
    folder = tmp_path_factory.mktemp("meta") / "tiny"
    return make_checkpoint(folder), folder.parent / "tokenizer.model"


def refusal(build) -> str:
    with pytest.raises(FileError) as info:
        build()
    message = str(info.value)
    assert "\n" not in message
    return message


# --- the rotary permutation ---------------------------------------------------

def test_rotary_rows_written_out():
    """Within a head of 8 features transformers stores x0 x2 x4 x6 x1 x3 x5 x7: Meta's row 1 is its row 4."""
    assert rotary_rows(1, 8).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert rotary_rows(2, 4).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.mark.parametrize("n_heads", [1, 2, 4])
def test_rotary_rows_undo_the_conversion(n_heads):
    w = torch.randn(n_heads * 16, 24)
    converted = to_half_split(w, n_heads)
    assert not torch.equal(converted, w)
    assert torch.equal(converted[rotary_rows(n_heads, 16)], w)


# --- config.json ----------------------------------------------------------------

LLAMA_2_7B = {  # config.json of the hub's Llama-2-7b-hf, less its token ids
    "architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 11008, "max_position_embeddings": 4096, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float16",
    "transformers_version": "4.31.0.dev0", "use_cache": True, "vocab_size": 32000}


def test_config_maps_to_metas_names(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_2_7B))
    assert hf.read_config(tmp_path / "config.json") == {
        "dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 32, "vocab_size": 32000,
        "norm_eps": 1e-05, "rope_theta": 10000.0, "hidden_dim": 11008}


def test_config_defaults_and_transformers_5s_rope_parameters(tmp_path):
    """Absent: key/value heads = heads, rope_theta 10000, rms_norm_eps LlamaConfig's 1e-6.
    transformers 5 writes rope_theta inside rope_parameters with rope_type "default"."""
    path = tmp_path / "config.json"
    config = {k: v for k, v in LLAMA_2_7B.items() if k not in ("num_key_value_heads", "rms_norm_eps", "rope_scaling")}
    path.write_text(json.dumps(config))
    params = hf.read_config(path)
    assert (params["n_kv_heads"], params["rope_theta"], params["norm_eps"]) == (32, 10000.0, 1e-6)
    path.write_text(json.dumps(config | {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
                                         "num_key_value_heads": 8, "intermediate_size": 14336}))
    params = hf.read_config(path)
    assert (params["n_kv_heads"], params["rope_theta"], params["hidden_dim"]) == (8, 500000.0, 14336)


REFUSED = {
    "rope_scaling": {"rope_scaling": {"type": "linear", "factor": 2.0}},
    "rope_parameters": {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}},
    "attention_bias": {"attention_bias": True},
    "mlp_bias": {"mlp_bias": True},
    "tie_word_embeddings": {"tie_word_embeddings": True},
    "hidden_act": {"hidden_act": "gelu"},
    "model_type": {"model_type": "mistral"},
    "head_dim": {"head_dim": 256},
    "hidden_size": {"hidden_size": "4096"},
    "num_hidden_layers": {"num_hidden_layers": 32.0},
    "num_attention_heads": {"num_attention_heads": True},
    "num_key_value_heads": {"num_key_value_heads": 12},
    "rms_norm_eps": {"rms_norm_eps": "1e-5"},
    "vocab_size": {"vocab_size": None},
    "rope_theta": {"rope_theta": 10000.0, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
}


@pytest.mark.parametrize("key", REFUSED)
def test_config_this_model_cannot_represent_is_refused(tmp_path, key):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA_2_7B | REFUSED[key]))
    message = refusal(lambda: hf.read_config(path))
    assert str(path) in message and key in message


def test_config_without_a_needed_key_is_refused(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({k: v for k, v in LLAMA_2_7B.items() if k != "intermediate_size"}))
    message = refusal(lambda: hf.read_config(path))
    assert str(path) in message and "intermediate_size" in message


# --- every format gives back Meta's weights -------------------------------------

LAYOUTS = {  # name: (format, number of files, dtype stored)
    "safetensors": ("safetensors", 1, None),
    "safetensors-2-files": ("safetensors", 2, None),
    "safetensors-bf16": ("safetensors", 1, torch.bfloat16),
    "safetensors-f16": ("safetensors", 1, torch.float16),
    "bin": ("bin", 1, None),
    "bin-3-files": ("bin", 3, None),
}
ROWS = [slice(0, 1), slice(3, 21), slice(5, 6), slice(16, 48), slice(-7, None), slice(None, None, 3), slice(4, 4)]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_weight_and_row_slice_is_metas(meta, tmp_path, layout):
    """Keys in Meta's names and order; each weight, and each row slice (wq and wk across their
    heads included), equal to Meta's state dict in the dtype stored."""
    model, tokenizer = meta
    fmt, n_files, dtype = LAYOUTS[layout]
    folder = write_hf(model.state_dict(), model.args, tmp_path / "hf", fmt, n_files, dtype=dtype,
                      tokenizer=tokenizer)
    ckpt = HFCheckpoint(folder)
    state = {k: v.to(dtype or v.dtype) for k, v in model.state_dict().items()}
    assert ckpt.keys() == list(state)
    assert ckpt.params == {"dim": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 384,
                           "norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_dim": 192}
    assert ckpt.tokenizer_path == folder / "tokenizer.model"
    for key, expected in state.items():
        got = ckpt.get(key)
        assert got.dtype == expected.dtype and torch.equal(got, expected), key
        for rows in ROWS:
            assert torch.equal(ckpt.get(key, rows=rows), expected[rows]), (key, rows)


def test_every_norm_is_read_from_its_own_key(meta, tmp_path):
    """input_layernorm is Meta's attention_norm, post_attention_layernorm its ffn_norm, model.norm
    its final norm: with every norm weight drawn apart, each comes back from its own key."""
    model, _ = meta
    state = model.state_dict()
    generator = torch.Generator().manual_seed(0)
    for key in state:
        if key.endswith("norm.weight"):
            state[key] = torch.rand(state[key].shape, generator=generator)
    ckpt = HFCheckpoint(write_hf(state, model.args, tmp_path / "hf"))
    for key, expected in state.items():
        assert torch.equal(ckpt.get(key), expected), key


def test_a_transformer_built_from_params_holds_the_weights(meta, tmp_path):
    """params build the same shapes as the Meta model (the feed-forward width exactly), and its logits."""
    model, _ = meta
    ckpt = HFCheckpoint(write_hf(model.state_dict(), model.args, tmp_path / "hf"))
    ours = Transformer(ModelArgs(**ckpt.params, max_seq_len=64))
    ours.load_state_dict({k: ckpt.get(k) for k in ckpt.keys()}, strict=True)
    tokens = torch.randint(0, 384, (2, 16))
    with torch.no_grad():
        assert torch.equal(ours(tokens), model(tokens))


@pytest.mark.parametrize("layout", ["safetensors", "safetensors-2-files", "bin", "bin-3-files"])
def test_load_reads_either_layout_and_an_aligner_fits_both(meta, tmp_path, layout):
    """formats.load on the same random weights written in Meta's layout and in Hugging Face's: the same
    logits, with and without an Aligner (prefix keys and values carry no RoPE, so nothing to permute),
    and the same greedy tokens from a cached decode."""
    model, tokenizer = meta
    fmt, n_files, _ = LAYOUTS[layout]
    hf = write_hf(model.state_dict(), model.args, tmp_path / "hf", fmt, n_files, tokenizer=tokenizer)
    meta_folder = tmp_path / "meta"
    formats.save(model, meta_folder)
    (tmp_path / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    ours_hf, _ = formats.load(hf, max_seq_len=64)
    ours_meta, _ = formats.load(meta_folder, max_seq_len=64)
    torch.manual_seed(0)
    aligner = Aligner(ours_meta.args, n_tokens=3, start_layer=1)
    with torch.no_grad():
        aligner.gates.normal_()
        tokens = torch.randint(0, 384, (2, 12))
        for a in (None, aligner):
            torch.testing.assert_close(ours_hf(tokens, a), ours_meta(tokens, a), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(ours_hf(tokens, aligner), ours_hf(tokens), atol=1e-3)
    from generate import generate
    ids = [[1, 5, 9, 30], [1, 7]]
    assert generate(ours_hf, formats.Tokenizer(tokenizer), ids, aligner, max_new_tokens=8) == \
        generate(ours_meta, formats.Tokenizer(tokenizer), ids, aligner, max_new_tokens=8)


def test_data_not_aligned_to_its_dtype_reads_the_same(meta, tmp_path):
    """The format does not promise alignment: a header without padding puts f32 data at odd offsets."""
    model, _ = meta
    folder = write_hf(model.state_dict(), model.args, tmp_path / "hf", align=False)
    header_length = int.from_bytes((folder / "model.safetensors").read_bytes()[:8], "little")
    assert (8 + header_length) % 4
    ckpt = HFCheckpoint(folder)
    for key, expected in model.state_dict().items():
        assert torch.equal(ckpt.get(key), expected), key
        assert torch.equal(ckpt.get(key, rows=slice(2, 9)), expected[2:9]), key


def test_stored_rotary_tables_are_skipped(meta, tmp_path):
    """Older transformers saved each layer's rotary_emb.inv_freq; it is no weight of Meta's model."""
    model, _ = meta
    extra = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.rand(8) for i in range(TINY["n_layers"])}
    ckpt = HFCheckpoint(write_hf(model.state_dict(), model.args, tmp_path / "hf", extra=extra))
    assert ckpt.keys() == list(model.state_dict())


def test_old_bin_format_is_read_whole_with_a_warning(meta, tmp_path):
    model, _ = meta
    folder = write_hf(model.state_dict(), model.args, tmp_path / "hf", "bin", 2)
    for path in folder.glob("pytorch_model-*.bin"):
        torch.save(torch.load(path, weights_only=True), path, _use_new_zipfile_serialization=False)
    ckpt = HFCheckpoint(folder)
    with pytest.warns(UserWarning, match="non-zip"):
        for key, expected in model.state_dict().items():
            assert torch.equal(ckpt.get(key), expected), key


def test_is_hf_folder(meta, tiny_ckpt, tmp_path):
    model, _ = meta
    assert is_hf_folder(write_hf(model.state_dict(), model.args, tmp_path / "hf"))
    assert not is_hf_folder(tiny_ckpt)


def test_missing_tokenizer_is_named(meta, tmp_path):
    model, _ = meta
    ckpt = HFCheckpoint(write_hf(model.state_dict(), model.args, tmp_path / "hf"))
    message = refusal(lambda: ckpt.tokenizer_path)
    assert str(tmp_path / "hf" / "tokenizer.model") in message


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024


def test_reading_rows_maps_only_those_rows(tmp_path):
    """Opening a 128 MiB file and reading a few rows leaves the rest on disk; touching a whole
    64 MiB weight brings it in (so the probe can see reads)."""
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc to read the resident set size")
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=2**18, multiple_of=32)
    with torch.device("meta"):
        shapes = {k: p.shape for k, p in Transformer(args).state_dict().items()}
    state = {k: torch.randn(shape) for k, shape in shapes.items() if shape[0] != 2**18}
    state |= {"tok_embeddings.weight": torch.full((2**18, 64), 0.5), "output.weight": torch.full((2**18, 64), 0.25)}
    folder = write_hf(state, args, tmp_path / "hf")
    del state
    torch.ones(8).index_select(0, torch.tensor([1, 0])).sum()  # the kernels' first use, outside the measure

    before = rss_mib()
    ckpt = HFCheckpoint(folder)
    rows = ckpt.get("tok_embeddings.weight", rows=slice(100_000, 100_010))
    assert rows.sum().item() == 0.5 * 640
    ckpt.get("layers.0.attention.wq.weight", rows=slice(3, 40)).sum()
    after_rows = rss_mib()
    assert after_rows - before < 16
    whole = ckpt.get("output.weight")
    assert whole.sum().item() == 0.25 * 2**18 * 64
    assert rss_mib() - after_rows > 48


# --- damaged files: one line that names the file --------------------------------

def cut(path: Path, size: int):
    path.write_bytes(path.read_bytes()[:size])


def rewrite_header(path: Path, edit):
    """Rewrite a safetensors file's header through edit(header), keeping its data."""
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + length])
    edit(header)
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + length:])


Q0 = "model.layers.0.self_attn.q_proj.weight"
K0 = "model.layers.0.self_attn.k_proj.weight"

DAMAGE = {  # name: (what it does to the folder's model.safetensors, a phrase the message holds)
    "truncated data": (lambda p: cut(p, p.stat().st_size - 100), "truncated"),
    "shorter than the header length": (lambda p: cut(p, 5), "truncated"),
    "header beyond the file": (lambda p: cut(p, 200), "runs past the end"),
    "header not JSON": (lambda p: p.write_bytes((12).to_bytes(8, "little") + b"{not json!!}" + b"\0" * 64),
                        "not valid JSON"),
    "offsets not the shape's size": (
        lambda p: rewrite_header(p, lambda h: h[Q0].update(data_offsets=[h[Q0]["data_offsets"][0],
                                                                         h[Q0]["data_offsets"][1] - 4])), Q0),
    "offsets beyond the data": (
        lambda p: rewrite_header(p, lambda h: h[Q0].update(data_offsets=[10**9, 10**9 + 16384])), Q0),
    "offsets overlapping": (lambda p: rewrite_header(p, lambda h: h[K0].update(
        data_offsets=[h[Q0]["data_offsets"][0], h[Q0]["data_offsets"][0] + 8192])), "overlap"),
    "unknown dtype": (lambda p: rewrite_header(p, lambda h: h[Q0].update(dtype="Q7")), "Q7"),
    "wrong shape": (lambda p: rewrite_header(p, lambda h: h[Q0].update(shape=[32, 128])), Q0),
    "header a list": (lambda p: p.write_bytes((3).to_bytes(8, "little") + b"[1]" + b"\0" * 64),
                      "its header is not a JSON object"),
    "entry without dtype": (lambda p: rewrite_header(p, lambda h: h[Q0].pop("dtype")),
                            "lacks dtype, shape or data_offsets"),
    "negative size": (lambda p: rewrite_header(p, lambda h: h[Q0].update(shape=[32, -1])), "not a list of sizes"),
    "one offset": (lambda p: rewrite_header(p, lambda h: h[Q0].update(data_offsets=[0])), "not [begin, end]"),
}


def test_a_weight_in_two_files_or_in_another_file_than_the_index_says_is_refused(meta, tmp_path):
    model, _ = meta
    folder = write_hf(model.state_dict(), model.args, tmp_path / "hf", "safetensors", 2)
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    hf = to_hf_state(model.state_dict(), model.args.n_heads, model.args.n_kv_heads)
    names = list(hf)  # the first file holds names[0::2], the second names[1::2]
    write_safetensors(folder / second, {n: hf[n] for n in names[1::2] + names[:1]})
    assert f"{second}: {names[0]} is also in {first}" in refusal(lambda: HFCheckpoint(folder))
    write_safetensors(folder / second, {n: hf[n] for n in names[1::2]})
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"][names[0]] = second
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert f"places {names[0]} in {second}, but {first} holds it" in refusal(lambda: HFCheckpoint(folder))


def test_heads_of_odd_width_are_refused(tmp_path):
    """RoPE turns pairs of features: a head of 3 features (hidden_size 96 over 32 heads) cannot be read."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA_2_7B | {"hidden_size": 96}))
    message = refusal(lambda: hf.read_config(path))
    assert str(path) in message and "3 features cannot be rotated in pairs" in message


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_safetensors_is_refused_in_one_line(meta, tmp_path, damage):
    model, _ = meta
    folder = write_hf(model.state_dict(), model.args, tmp_path / "hf")
    path = folder / "model.safetensors"
    do, phrase = DAMAGE[damage]
    do(path)
    message = refusal(lambda: HFCheckpoint(folder))
    assert str(path) in message and phrase in message


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_a_missing_weight_names_the_key_and_the_folder(meta, tmp_path, fmt):
    model, _ = meta
    state = model.state_dict()
    del state["layers.2.feed_forward.w3.weight"]
    folder = write_hf(state, model.args, tmp_path / "hf", fmt, 2)
    message = refusal(lambda: HFCheckpoint(folder))
    assert str(folder) in message and "model.layers.2.mlp.up_proj.weight" in message


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_an_unknown_weight_names_the_file_and_the_key(meta, tmp_path, fmt):
    model, _ = meta
    extra = {"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}
    folder = write_hf(model.state_dict(), model.args, tmp_path / "hf", fmt, extra=extra)
    message = refusal(lambda: HFCheckpoint(folder))
    assert str(next(folder.glob(f"*.{fmt}"))) in message and "model.layers.0.self_attn.q_proj.bias" in message


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_an_index_naming_a_missing_file_is_refused(meta, tmp_path, fmt):
    model, _ = meta
    folder = write_hf(model.state_dict(), model.args, tmp_path / "hf", fmt, 2)
    lost = sorted(folder.glob(f"*-00002-of-00002.{fmt}"))[0]
    lost.unlink()
    message = refusal(lambda: HFCheckpoint(folder))
    assert "index.json" in message and lost.name in message


def test_a_config_that_is_no_object_or_an_index_without_a_map_is_refused(meta, tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    assert "config.json: not a JSON object" in refusal(lambda: hf.read_config(tmp_path / "config.json"))
    model, _ = meta
    folder = write_hf(model.state_dict(), model.args, tmp_path / "hf", "safetensors", 2)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    assert "no weight_map of weight names to file names" in refusal(lambda: HFCheckpoint(folder))


@pytest.mark.parametrize("content, phrase", [([torch.zeros(2)], "holds a list, not a dict of weights"),
                                             ({"lm_head.weight": 1.5}, "lm_head.weight is a float, not a tensor")])
def test_a_bin_file_of_other_things_is_refused(meta, tmp_path, content, phrase):
    model, _ = meta
    folder = write_hf(model.state_dict(), model.args, tmp_path / "hf", "bin")
    torch.save(content, folder / "pytorch_model.bin")
    assert f"pytorch_model.bin: {phrase}" in refusal(lambda: HFCheckpoint(folder))


def test_truncated_bin_is_refused_in_one_line(meta, tmp_path):
    model, _ = meta
    folder = write_hf(model.state_dict(), model.args, tmp_path / "hf", "bin")
    path = folder / "pytorch_model.bin"
    cut(path, path.stat().st_size // 2)
    assert str(path) in refusal(lambda: HFCheckpoint(folder))


def test_a_folder_without_weights_is_refused(meta, tmp_path):
    model, _ = meta
    folder = write_hf(model.state_dict(), model.args, tmp_path / "hf")
    (folder / "model.safetensors").unlink()
    assert str(folder) in refusal(lambda: HFCheckpoint(folder))


# --- against the real thing, where installed ------------------------------------

def test_reader_agrees_with_the_safetensors_package(tmp_path):
    """Every dtype this reader knows, in files the package writes; and the tests' own writer
    writes files the package reads."""
    st = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    tensors = {"f64": torch.randn(3, 5, dtype=torch.float64), "f32": torch.randn(7),
               "f16": torch.randn(2, 3, 4).half(), "bf16": torch.randn(9, 2).bfloat16(),
               "i64": torch.randint(-10**12, 10**12, (4,)), "i32": torch.randint(-99, 99, (3, 3), dtype=torch.int32),
               "i16": torch.randint(-99, 99, (5,), dtype=torch.int16),
               "i8": torch.randint(-99, 99, (6,), dtype=torch.int8),
               "u8": torch.randint(0, 255, (6,), dtype=torch.uint8), "bool": torch.rand(5) > 0.5}
    st.save_file(tensors, tmp_path / "theirs.safetensors")
    stored = hf.read_safetensors_header(tmp_path / "theirs.safetensors")
    assert set(stored) == set(tensors)
    for name, t in tensors.items():
        got = hf.map_rows(stored[name], 0, t.shape[0])
        assert got.dtype == t.dtype and torch.equal(got, t), name
    ours = {k: v for k, v in tensors.items() if v.is_floating_point() and k != "f64"}
    write_safetensors(tmp_path / "ours.safetensors", ours, align=False)
    for name, t in st.load_file(tmp_path / "ours.safetensors").items():
        assert torch.equal(t, ours[name]), name


SAVES = {"safetensors": dict(), "bin": dict(safe_serialization=False),
         "safetensors-shards": dict(max_shard_size="100KB"),
         "bin-shards": dict(safe_serialization=False, max_shard_size="100KB")}


@pytest.mark.parametrize("save", SAVES)
def test_transformers_save_pretrained_gives_the_same_logits(tmp_path, save):
    """LlamaForCausalLM's own files (grouped-query heads, an FFN width no multiple_of rounds to,
    rope_theta 500000) in our Transformer give transformers' logits. transformers 5 writes
    safetensors even when asked for .bin."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=200, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False)
    theirs = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in theirs.parameters():  # larger than the default init, and norms not all ones
            p.copy_(torch.randn_like(p) * 0.2 if p.dim() > 1 else 1 + 0.1 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path, **SAVES[save])

    ckpt = HFCheckpoint(tmp_path)
    assert ckpt.params["rope_theta"] == 500000.0 and ckpt.params["hidden_dim"] == 200
    ours = Transformer(ModelArgs(**ckpt.params, max_seq_len=64))
    ours.load_state_dict({k: ckpt.get(k) for k in ckpt.keys()}, strict=True)
    assert not torch.equal(ours.layers[0].attention.wk.weight, theirs.model.layers[0].self_attn.k_proj.weight)
    tokens = torch.randint(0, 96, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(input_ids=tokens).logits, atol=1e-4, rtol=1e-4)
