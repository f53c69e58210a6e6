"""LoRA, the paper's other baseline (lora.py): its forward against lit-llama's equations, B = 0 as
the base bit for bit, merging, the readers of lit-llama's files and PEFT folders, and training,
resuming, generating and evaluating through the scripts, on tiny models."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

import analyze
import evaluate
import generate as generate_script
import train_dpo
import train_sft
from aligner import Aligner, AlignerBank
from conftest import make_checkpoint, read_jsonl, write_fox_task
from support.data import encode_prompt, format_prompt
from generate import generate
from hf_layout import to_half_split, write_hf, write_safetensors
from llama import KVCache, ModelArgs, Transformer, lora_projection
from support.formats import load, read_aligner, read_params
from lora import LoRA, merge
from test_errors import check_failure, run_script
from test_generate import needs_compile


@pytest.fixture(scope="module")
def mha_ckpt(tmp_path_factory):
    """A tiny checkpoint with one key/value head per query head, as lit-llama's fused qkv has."""
    folder = tmp_path_factory.mktemp("mha") / "tiny"
    make_checkpoint(folder, n_kv_heads=4)
    return folder


def trained_lora(args, rank=2, seed=0) -> LoRA:
    """A LoRA whose B is not zero, so that it changes the model."""
    torch.manual_seed(seed)
    lora = LoRA(args, rank=rank, alpha=4)
    with torch.no_grad():
        lora.b_q.normal_(std=0.3)
        lora.b_v.normal_(std=0.3)
    return lora.eval()


def lit_llama_state(lora: LoRA) -> dict:
    """The same LoRA as the authors' finetune/lora.py saves it (lora_state_dict of lit_llama/lora.py):
    per layer the fused c_attn's lora_A (2r, dim), A_q over A_v, and lora_B (2 dim, r), B_q over B_v."""
    return {**{f"transformer.h.{i}.attn.c_attn.lora_A": torch.cat([lora.a_q[i], lora.a_v[i]]).detach().bfloat16()
               for i in range(lora.a_q.shape[0])},
            **{f"transformer.h.{i}.attn.c_attn.lora_B": torch.cat([lora.b_q[i], lora.b_v[i]]).detach().bfloat16()
               for i in range(lora.a_q.shape[0])}}


def lit_llama_qkv(x, w_qkv, lora_a, lora_b, scaling):
    """lit_llama/lora.py's MergedLinear.forward with enable_lora=[True, False, True], written out:
    the fused projection, then a grouped 1x1 convolution (groups = 2) of A's output, zero-padded
    into the q and v thirds of the output (zero_pad), scaled."""
    result = F.linear(x, w_qkv)  # (B, T, 3 dim)
    after_a = F.linear(x, lora_a)  # (B, T, 2r)
    after_b = F.conv1d(after_a.transpose(-2, -1), lora_b.unsqueeze(-1), groups=2).transpose(-2, -1)  # (B, T, 2 dim)
    dim = w_qkv.shape[0] // 3
    lora_ind = torch.tensor([True, False, True]).repeat_interleave(dim)  # (3 dim,)
    padded = after_b.new_zeros(*after_b.shape[:-1], 3 * dim)
    padded[..., lora_ind] = after_b
    return result + padded * scaling


def lit_llama_merged_weight(w_qkv, lora_a, lora_b, scaling):
    """lit_llama/lora.py's MergedLinear.train(False): W += zero_pad(conv1d(A, B, groups=2) * scaling)."""
    delta = F.conv1d(lora_a.unsqueeze(0), lora_b.unsqueeze(-1), groups=2).squeeze(0)  # (2 dim, dim)
    dim = w_qkv.shape[1]
    return w_qkv + torch.cat([delta[:dim], torch.zeros(dim, dim), delta[dim:]]) * scaling


# -----------------------------------------------------------------------------
# the forward

def test_forward_matches_lit_llamas_fused_qkv_equations(mha_ckpt, one_thread):
    model, _ = load(mha_ckpt)
    lora = trained_lora(model.args)
    state = {k: v.float() for k, v in lit_llama_state(lora).items()}
    x = torch.randn(2, 5, model.args.dim)
    dim = model.args.dim
    ours = read_lora_from(state, model.args, alpha=lora.alpha)
    for i, layer in enumerate(model.layers):
        att = layer.attention
        w_qkv = torch.cat([att.wq.weight, att.wk.weight, att.wv.weight])  # scripts/convert_checkpoint.py's c_attn
        a, b = state[f"transformer.h.{i}.attn.c_attn.lora_A"], state[f"transformer.h.{i}.attn.c_attn.lora_B"]
        q, k, v = lit_llama_qkv(x, w_qkv, a, b, lora.scale).split(dim, dim=-1)
        torch.testing.assert_close(lora_projection(x, att.wq, ours.a_q[i], ours.b_q[i], ours.scale), q)
        torch.testing.assert_close(lora_projection(x, att.wv, ours.a_v[i], ours.b_v[i], ours.scale), v)
        assert torch.equal(att.wk(x), k)  # the middle block, k, is not adapted

    # the whole model: ours unmerged against lit-llama's merge of the fused weight, split back
    merged = copy.deepcopy(model)
    for i, layer in enumerate(merged.layers):
        att = layer.attention
        w_qkv = torch.cat([att.wq.weight, att.wk.weight, att.wv.weight])
        w = lit_llama_merged_weight(w_qkv, state[f"transformer.h.{i}.attn.c_attn.lora_A"],
                                    state[f"transformer.h.{i}.attn.c_attn.lora_B"], lora.scale)
        att.wq.weight.copy_(w[:dim]), att.wk.weight.copy_(w[dim:2 * dim]), att.wv.weight.copy_(w[2 * dim:])
    tokens = torch.randint(0, model.args.vocab_size, (2, 9))
    with torch.no_grad():
        logits = model(tokens, aligner=ours)
        torch.testing.assert_close(logits, merged(tokens), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(logits, model(tokens), atol=1e-2)  # the LoRA changes the model


def read_lora_from(state, args, alpha):
    """lit-llama's state through formats.read_aligner, as the scripts read it, with the test's alpha (the file records none)."""
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        path = f"{folder}/lit-lora.pth"
        torch.save(state, path)
        lora = read_aligner(path, args)
    lora.alpha = alpha
    return lora


def test_zero_b_gives_the_base_model_bit_for_bit(tiny_ckpt, one_thread):
    """A fresh LoRA (B = 0), training mode and dropout included, leaves every logit exactly as the
    base's, beside the Aligner's gate-zero property; with B nonzero it does not."""
    model, _ = load(tiny_ckpt)
    tokens = torch.randint(0, model.args.vocab_size, (3, 11))
    lora = LoRA(model.args, rank=4, dropout=0.5).train()
    assert torch.count_nonzero(lora.a_q) > 0 and torch.count_nonzero(lora.b_q) == 0
    with torch.no_grad():
        base = model(tokens)
        assert torch.equal(model(tokens, aligner=lora), base)
        assert torch.equal(model(tokens, aligner=lora.eval()), base)
        assert torch.equal(model(tokens, aligner=Aligner(model.args, n_tokens=3)), base)  # gate zero, likewise
        assert not torch.equal(model(tokens, aligner=trained_lora(model.args)), base)


def test_init_is_lit_llamas(tiny_ckpt):
    """A as nn.Linear's own init, kaiming_uniform_(a=sqrt(5)): uniform within 1/sqrt(dim); B zero."""
    args = ModelArgs(**read_params(tiny_ckpt))
    lora = LoRA(args, rank=8)
    bound = 1 / math.sqrt(args.dim)
    assert lora.a_q.abs().max() <= bound and lora.a_q.abs().max() > 0.8 * bound
    assert torch.equal(lora.b_v, torch.zeros_like(lora.b_v))
    assert [name for name, p in lora.named_parameters() if p.requires_grad] == ["a_q", "b_q", "a_v", "b_v"]


def test_dropout_acts_only_while_training(tiny_ckpt, one_thread):
    model, _ = load(tiny_ckpt)
    lora = trained_lora(model.args)
    lora.dropout = 0.5
    tokens = torch.randint(0, model.args.vocab_size, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(tokens, aligner=lora.eval()), model(tokens, aligner=lora))
        assert not torch.equal(model(tokens, aligner=lora.train()), model(tokens, aligner=lora.eval()))


def test_the_kv_cache_holds_the_updated_values(tiny_ckpt, one_thread):
    """Prefill then one token at a time through the cache gives the logits of the whole sequence."""
    model, _ = load(tiny_ckpt)
    lora = trained_lora(model.args)
    tokens = torch.randint(0, model.args.vocab_size, (2, 10))
    with torch.no_grad():
        whole = model(tokens, aligner=lora)
        cache = KVCache(model.args, 2, 10)
        steps = [model(tokens[:, :6], aligner=lora, cache=cache)]
        steps += [model(tokens[:, t:t + 1], aligner=lora, cache=cache) for t in range(6, 10)]
    torch.testing.assert_close(torch.cat(steps, 1), whole, atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# merging and counting

def test_merged_equals_unmerged(tiny_ckpt, one_thread):
    model, _ = load(tiny_ckpt)
    lora = trained_lora(model.args)
    tokens = torch.randint(0, model.args.vocab_size, (2, 9))
    merged = merge(copy.deepcopy(model), lora)
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens), model(tokens, aligner=lora), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(merged(tokens), model(tokens), atol=1e-2)
    assert torch.equal(model.layers[0].attention.wk.weight, merged.layers[0].attention.wk.weight)


def test_parameter_counts_of_table_1():
    """n_layers x r x (dim + out_q + dim + out_v): 32 x 8 x 4 x 4096 = 4,194,304 on LLaMA-2-7B."""
    args = ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000)
    with torch.device("meta"):
        assert LoRA(args, rank=8).num_params() == 4_194_304
        assert LoRA(args, rank=4).num_params() == 2_097_152
        assert "4,194,304 parameters" in LoRA(args, rank=8).describe()


def test_analyze_params_lists_lora_at_both_ranks(capsys):
    assert analyze.main(["params"]) in (None, 0)
    out = capsys.readouterr().out
    assert "LoRA, r = 8 on wq, wv" in out and "4,194,304" in out
    assert "LoRA, r = 4 on wq, wv" in out and "2,097,152" in out


def test_analyze_gates_refuses_a_lora(tiny_ckpt, tmp_path, capsys):
    args = ModelArgs(**read_params(tiny_ckpt))
    LoRA(args).save(tmp_path / "lora.pt")
    code, _, err = run_script(analyze, ["gates", tmp_path / "lora.pt"], capsys)
    check_failure(code, err, "analyze", [tmp_path / "lora.pt", "LoRA"], expected_code=1)


# -----------------------------------------------------------------------------
# files: ours, lit-llama's, PEFT's

def test_our_file_round_trips_and_refuses_another_base(tiny_ckpt, mha_ckpt, tmp_path):
    args = ModelArgs(**read_params(tiny_ckpt))
    lora = trained_lora(args, rank=3)
    lora.save(tmp_path / "lora.pt")
    state = torch.load(tmp_path / "lora.pt", weights_only=True)
    assert (state["kind"], state["rank"], state["alpha"], state["targets"]) == ("LoRA", 3, 4, ["wq", "wv"])
    assert state["base"] == {"dim": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2}
    again = read_aligner(tmp_path / "lora.pt", args)
    assert all(torch.equal(getattr(again, k), getattr(lora, k)) for k in ("a_q", "b_q", "a_v", "b_v"))
    other = ModelArgs(**read_params(mha_ckpt))
    with pytest.raises(ValueError, match=r"lora\.pt: 'base' is .*'n_kv_heads': 2"):
        read_aligner(tmp_path / "lora.pt", other)


def test_lit_llama_file_reads_as_the_same_lora(mha_ckpt, tmp_path):
    args = ModelArgs(**read_params(mha_ckpt))
    lora = trained_lora(args, rank=2)
    torch.save(lit_llama_state(lora), tmp_path / "lit.pth")
    ours = read_aligner(tmp_path / "lit.pth", args)
    assert (ours.rank, ours.alpha) == (2, 16)  # alpha: the authors' finetune/lora.py
    for k in ("a_q", "b_q", "a_v", "b_v"):
        assert torch.equal(getattr(ours, k), getattr(lora, k).detach().bfloat16().float())
    torch.save({"model": lit_llama_state(lora)}, tmp_path / "wrapped.pth")  # as fabric.save may wrap it
    assert torch.equal(read_aligner(tmp_path / "wrapped.pth", args).b_v, ours.b_v)


def peft_folder(folder, lora: LoRA, n_heads: int, fmt="safetensors", config=None, edit=None):
    """A PEFT adapter folder holding `lora` as PEFT saves one over a Hugging Face LLaMA: q_proj's lora_B
    rows in transformers' rotary order (to_half_split, as the conversion permutes q_proj itself)."""
    folder.mkdir(parents=True, exist_ok=True)
    key = "base_model.model.model.layers.{}.self_attn.{}.lora_{}.weight"
    tensors = {}
    for i in range(lora.a_q.shape[0]):
        tensors[key.format(i, "q_proj", "A")] = lora.a_q[i].detach().clone()
        tensors[key.format(i, "q_proj", "B")] = to_half_split(lora.b_q[i].detach(), n_heads).contiguous()
        tensors[key.format(i, "v_proj", "A")] = lora.a_v[i].detach().clone()
        tensors[key.format(i, "v_proj", "B")] = lora.b_v[i].detach().clone()
    if edit is not None:
        edit(tensors)
    settings = {"peft_type": "LORA", "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": 0.05,
                "target_modules": ["q_proj", "v_proj"], "bias": "none", "use_dora": False, "use_rslora": False,
                "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
                "fan_in_fan_out": False, "task_type": "CAUSAL_LM", **(config or {})}
    (folder / "adapter_config.json").write_text(json.dumps(settings))
    if fmt == "safetensors":
        write_safetensors(folder / "adapter_model.safetensors", tensors)
    else:
        torch.save(tensors, folder / "adapter_model.bin")
    return folder


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_peft_folder_over_a_hugging_face_model_gives_our_logits(tiny_ckpt, tmp_path, fmt, one_thread):
    """The tiny model as a Hugging Face folder with a PEFT adapter of a LoRA: the same logits as the
    Meta checkpoint with that LoRA in our layout. q_proj's lora_B is un-permuted on reading; read
    as it is stored, it would not give them."""
    model, _ = load(tiny_ckpt)
    hf = write_hf(model.state_dict(), model.args, tmp_path / "hf", tokenizer=tiny_ckpt.parent / "tokenizer.model")
    hf_model, _ = load(hf)
    lora = trained_lora(model.args, rank=3)
    folder = peft_folder(tmp_path / "peft", lora, model.args.n_heads, fmt)
    theirs = read_aligner(folder, hf_model.args)
    assert torch.equal(theirs.b_q, lora.b_q) and not torch.equal(
        torch.stack([to_half_split(b, 4) for b in lora.b_q.detach()]), lora.b_q)
    tokens = torch.randint(0, model.args.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(hf_model(tokens, aligner=theirs), model(tokens, aligner=lora))


def write_lit(path, args, edit):
    state = lit_llama_state(trained_lora(args))
    edit(state)
    torch.save(state, path)
    return path


def test_bad_lora_files_are_refused_in_one_line(tiny_ckpt, mha_ckpt, tmp_path, capsys):
    """Through generate.py's main: the file and the key named on one line, exit 1, before the model loads."""
    args = ModelArgs(**read_params(mha_ckpt))
    lora = trained_lora(args, rank=2)
    lit_key = "transformer.h.1.attn.c_attn.lora_A"
    peft_key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    cases = [
        (write_lit(tmp_path / "rank.pth", args, lambda s: s.update({lit_key: torch.zeros(6, 64)})),
         [lit_key, "(6, 64)"]),
        (write_lit(tmp_path / "missing.pth", args, lambda s: s.pop(lit_key)), [lit_key, "missing"]),
        (write_lit(tmp_path / "k.pth", args, lambda s: s.update({"transformer.h.0.attn.c_attn.lora_C": s[lit_key]})),
         ["lora_C", "unexpected"]),
        (peft_folder(tmp_path / "p-rank", lora, 4, edit=lambda t: t.update({peft_key: torch.zeros(64, 5)})),
         [peft_key, "rank 5"]),
        (peft_folder(tmp_path / "p-missing", lora, 4, edit=lambda t: t.pop(peft_key)), [peft_key, "missing"]),
        (peft_folder(tmp_path / "p-k", lora, 4, config={"target_modules": ["q_proj", "k_proj"]}),
         ["adapter_config.json", "k_proj"]),
        (peft_folder(tmp_path / "p-mlp", lora, 4, config={"target_modules": ["q_proj", "gate_proj"]}),
         ["adapter_config.json", "gate_proj"]),
        (peft_folder(tmp_path / "p-dora", lora, 4, config={"use_dora": True}), ["adapter_config.json", "use_dora"]),
        (peft_folder(tmp_path / "p-rs", lora, 4, config={"use_rslora": True}), ["adapter_config.json", "use_rslora"]),
        (peft_folder(tmp_path / "p-bias", lora, 4, config={"bias": "all"}), ["adapter_config.json", "bias"]),
        (peft_folder(tmp_path / "p-layers", lora, 4, config={"layers_to_transform": [0]}),
         ["adapter_config.json", "layers_to_transform"]),
        (peft_folder(tmp_path / "p-pattern", lora, 4, config={"rank_pattern": {"q_proj": 4}}),
         ["adapter_config.json", "rank_pattern"]),
        (peft_folder(tmp_path / "p-new", lora, 4, config={"alora_invocation_tokens": [5]}),
         ["adapter_config.json", "alora_invocation_tokens"]),
        (peft_folder(tmp_path / "p-pissa", lora, 4, config={"init_lora_weights": "pissa"}),
         ["adapter_config.json", "init_lora_weights"]),
        (peft_folder(tmp_path / "p-extra", lora, 4, config={"target_modules": ["q_proj"]}),
         ["v_proj", "target_modules"]),
    ]
    for path, culprits in cases:
        code, _, err = run_script(generate_script, ["--ckpt", mha_ckpt, "--aligner", path, "--prompt", "Hi."], capsys)
        check_failure(code, err, "generate", [path, *culprits], expected_code=1)
    # a base of another shape: found when the model's shape is known
    other = tmp_path / "other"
    LoRA(ModelArgs(dim=32, n_layers=4, n_heads=4, vocab_size=384)).save(other)
    code, _, err = run_script(generate_script, ["--ckpt", tiny_ckpt, "--aligner", other, "--prompt", "Hi."], capsys)
    check_failure(code, err, "generate", [other, "'base'"], expected_code=1)
    peft = peft_folder(tmp_path / "p-good", trained_lora(ModelArgs(**read_params(tiny_ckpt))), 4)
    code, _, err = run_script(generate_script, ["--ckpt", mha_ckpt, "--aligner", peft, "--prompt", "Hi."], capsys)
    check_failure(code, err, "generate", ["adapter_model.safetensors", "v_proj.lora_B"], expected_code=1)
    code, _, err = run_script(generate_script, ["--ckpt", mha_ckpt, "--aligner", tmp_path / "p-good",
                                                "--aligner", "base", "--merge-lora", "--prompt", "Hi."], capsys)
    check_failure(code, err, "generate", ["--merge-lora", "exactly one --aligner"], expected_code=1)


def test_a_lora_cannot_share_a_bank_with_aligners(tiny_ckpt):
    args = ModelArgs(**read_params(tiny_ckpt))
    with pytest.raises(ValueError, match="a LoRA cannot share a batch"):
        AlignerBank([Aligner(args, n_tokens=1), LoRA(args)])


# -----------------------------------------------------------------------------
# the scripts

@pytest.fixture(scope="module")
def task(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora")
    write_fox_task(folder / "task.json", 10)
    return folder / "task.json"


def sft_args(ckpt, task, out, *extra):
    return ["--ckpt", str(ckpt), "--data", str(task), "--out", str(out), "--lora", "--lora-rank", "2",
            "--val", "2", "--batch-size", "4", "--micro-batch-size", "2", "--epochs", "2", "--max-seq-len", "96",
            "--lr", "1e-2", *extra]


def lora_tensors(path):
    state = torch.load(path, weights_only=True)
    return [state[k] for k in ("a_q", "b_q", "a_v", "b_v")]


def test_train_sft_trains_a_lora_and_resumes_bit_for_bit(tiny_ckpt, task, tmp_path, capsys):
    train_sft.main(sft_args(tiny_ckpt, task, tmp_path / "full"))
    assert "LoRA: rank 2, alpha 16, on wq and wv of all 4 layers, 1,792 parameters" in capsys.readouterr().out
    args = ModelArgs(**read_params(tiny_ckpt))
    trained = read_aligner(tmp_path / "full" / "best.pt", args)
    assert isinstance(trained, LoRA) and torch.count_nonzero(trained.b_q) > 0  # it trained
    settings = json.loads((tmp_path / "full" / "settings.json").read_text())
    assert (settings["lora"], settings["lora_rank"], settings["lora_alpha"], settings["lora_dropout"]) == \
        (True, 2, 16.0, 0.05)

    out = tmp_path / "stopped"
    train_sft.main(sft_args(tiny_ckpt, task, out, "--max-steps", "3"))  # stops inside epoch 2
    assert not (out / "epoch-2.pt").exists()
    train_sft.main(sft_args(tiny_ckpt, task, out, "--resume"))
    for name in ("epoch-2.pt", "best.pt"):
        for a, b in zip(lora_tensors(out / name), lora_tensors(tmp_path / "full" / name)):
            assert torch.equal(a, b), name

    # the file it wrote, through generate.py (applied and merged) and evaluate.py
    prompts = ["--prompt", "Name a bird.", "--prompt", "What is fox 3?"]
    for extra, name in (([], "applied"), (["--merge-lora"], "merged")):
        generate_script.main(["--ckpt", str(tiny_ckpt), "--aligner", str(tmp_path / "full" / "best.pt"), *prompts,
                              "--max-new-tokens", "6", "--out", str(tmp_path / f"{name}.jsonl"), *extra])
    applied, merged = (read_jsonl(tmp_path / f"{n}.jsonl") for n in ("applied", "merged"))
    assert [r["output"] for r in applied] == [r["output"] for r in merged]
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"instruction": q, "output": "A bird."}) + "\n"
                          for q in ("What is a robin?", "Name a bird.")))
    evaluate.main(["qa", "--ckpt", str(tiny_ckpt), "--data", str(qa), "--aligner", str(tmp_path / "full" / "best.pt"),
                   "--aligner", "base", "--max-new-tokens", "6", "--max-seq-len", "256",
                   "--out", str(tmp_path / "eval")])
    scored = read_jsonl(tmp_path / "eval" / "qa.jsonl")
    assert {r["aligner"] for r in scored} == {str(tmp_path / "full" / "best.pt"), "base"}


def test_lora_defaults_are_appendix_cs_unless_given(tiny_ckpt, task, tmp_path):
    """--lora with --lr, --warmup-epochs and --weight-decay left out: Appendix C's 3e-4 and 0.1 epoch, and
    0.01; a flag given wins; without --lora the Aligner's defaults stand."""
    def settings(out, *flags):
        argv = [a for a in sft_args(tiny_ckpt, task, tmp_path / out, "--max-steps", "1") if a not in ("--lr", "1e-2")]
        train_sft.main([a for a in argv if a != "--lora" or "--lora" in flags] + [f for f in flags if f != "--lora"])
        s = json.loads((tmp_path / out / "settings.json").read_text())
        return s["lr"], s["warmup_epochs"], s["weight_decay"]

    assert settings("a", "--lora") == (3e-4, 0.1, 0.01)
    assert settings("b", "--lora", "--weight-decay", "0", "--lr", "1e-3") == (1e-3, 0.1, 0.0)
    assert settings("c") == (9e-3, 1.0, 0.02)


def test_prefix_shape_flags_are_refused_with_lora(tiny_ckpt, task, tmp_path, capsys):
    """--n-tokens and --start-layer shape an Aligner; given with --lora (in any spelling argparse takes)
    they are refused in one line, before anything loads, rather than silently ignored."""
    for flags, culprit in ((["--n-tokens", "3"], "--n-tokens"), (["--start-layer=1"], "--start-layer"),
                           (["--n-tok", "3"], "--n-tokens")):
        argv = sft_args(tiny_ckpt, task, tmp_path / "out", "--max-steps", "1") + flags
        code, _, err = run_script(train_sft, argv, capsys)
        check_failure(code, err, "train_sft", [culprit], expected_code=2)
        assert not (tmp_path / "out").exists()
    code, _, err = run_script(train_sft, sft_args(tiny_ckpt, task, tmp_path / "ok", "--max-steps", "1"), capsys)
    assert code == 0, err


def test_generate_answers_a_lora_beside_aligners_as_it_answers_alone(tiny_ckpt, tmp_path):
    args = ModelArgs(**read_params(tiny_ckpt))
    trained_lora(args).save(tmp_path / "lora.pt")
    aligner = Aligner(args, n_tokens=2)
    with torch.no_grad():
        aligner.gates.normal_()
    aligner.save(tmp_path / "aligner.pt")
    prompts = ["--prompt", "Name a bird.", "--prompt", "What is a robin?"]
    common = ["--ckpt", str(tiny_ckpt), *prompts, "--max-new-tokens", "6"]
    generate_script.main([*common, "--aligner", str(tmp_path / "lora.pt"), "--aligner", "base",
                          "--aligner", str(tmp_path / "aligner.pt"), "--out", str(tmp_path / "together.jsonl")])
    together = read_jsonl(tmp_path / "together.jsonl")
    for name in ("lora", "aligner", "base"):
        generate_script.main([*common, "--aligner", "base" if name == "base" else str(tmp_path / f"{name}.pt"),
                              "--out", str(tmp_path / f"{name}-alone.jsonl")])
        alone = [r["output"] for r in read_jsonl(tmp_path / f"{name}-alone.jsonl")]
        assert [r["output"] for r in together if r["aligner"] == name] == alone
    by = {name: [r["output"] for r in together if r["aligner"] == name] for name in ("lora", "base")}
    assert by["lora"] != by["base"]


def test_train_dpo_trains_a_lora_from_an_sft_lora(tiny_ckpt, tmp_path):
    rows = [{"prompt": f"What is fox {i}?", "chosen": "A robin is a bird.", "rejected": f"Fox {i} is red."}
            for i in range(6)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--ckpt", str(tiny_ckpt), "--data", str(tmp_path / "pairs.jsonl"), "--val", "2", "--batch-size", "2",
              "--epochs", "1", "--lr", "1e-2", "--max-seq-len", "96"]
    args = ModelArgs(**read_params(tiny_ckpt))
    start = trained_lora(args, rank=4)
    start.save(tmp_path / "start.pt")
    train_dpo.main([*common, "--init-aligner", str(tmp_path / "start.pt"), "--out", str(tmp_path / "dpo")])
    trained = read_aligner(tmp_path / "dpo" / "epoch-1.pt", args)
    assert isinstance(trained, LoRA) and trained.rank == 4 and not torch.equal(trained.b_q, start.b_q)
    settings = json.loads((tmp_path / "dpo" / "settings.json").read_text())
    assert (settings["lora"], settings["lora_rank"], settings["lora_alpha"]) == (True, 4, 4.0)
    with pytest.raises(ValueError, match=r"--lora-rank 8 contradicts the initial LoRA .*start\.pt"):
        train_dpo.main([*common, "--init-aligner", str(tmp_path / "start.pt"), "--lora-rank", "8",
                        "--out", str(tmp_path / "refused")])
    # a fresh LoRA, whose reference is the base itself; stopped and resumed, bit for bit
    train_dpo.main([*common, "--lora", "--lora-rank", "2", "--out", str(tmp_path / "full")])
    train_dpo.main([*common, "--lora", "--lora-rank", "2", "--out", str(tmp_path / "part"), "--max-steps", "1"])
    train_dpo.main([*common, "--lora", "--lora-rank", "2", "--out", str(tmp_path / "part"), "--resume"])
    for a, b in zip(lora_tensors(tmp_path / "part" / "best.pt"), lora_tensors(tmp_path / "full" / "best.pt")):
        assert torch.equal(a, b)


# -----------------------------------------------------------------------------
# against PEFT itself, where it is installed

def test_peft_lora_gives_the_same_logits_here_as_in_peft(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import hf
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=32, max_seq_len=64)
    ours = Transformer(args).requires_grad_(False).eval()
    theirs = get_peft_model(hf.load_hf(ours.state_dict(), args),
                            LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    theirs.save_pretrained(tmp_path / "peft")
    lora = read_aligner(tmp_path / "peft", args)
    tokens = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens, aligner=lora), theirs(input_ids=tokens).logits, atol=2e-5, rtol=1e-4)
        assert not torch.allclose(ours(tokens), theirs(input_ids=tokens).logits, atol=1e-3)


@needs_compile
def test_compiled_decoding_with_a_lora_gives_the_eager_tokens(tiny_ckpt):
    model, tokenizer = load(tiny_ckpt)
    prompts = [encode_prompt(tokenizer, format_prompt(p, "", "alpaca")) for p in ("Name a bird.", "What is fox 3?")]
    lora = trained_lora(model.args)
    eager = generate(model, tokenizer, prompts, lora, max_new_tokens=8)
    assert generate(model, tokenizer, prompts, lora, max_new_tokens=8, compile=True) == eager
    assert eager != generate(model, tokenizer, prompts, max_new_tokens=8)  # the LoRA changes the answers


def test_answer_files_name_each_lora_by_its_file_or_folder(tiny_ckpt, tmp_path):
    """One judge answer file per adapter, whatever its kind: a LoRA file by its stem, a PEFT folder by
    its whole name (dots and all), the base as 'base'."""
    args = ModelArgs(**read_params(tiny_ckpt))
    lora = trained_lora(args)
    lora.save(tmp_path / "lora.pt")
    folder = peft_folder(tmp_path / "adapter-v1.5", trained_lora(args, seed=1), args.n_heads)
    generate_script.main(["--ckpt", str(tiny_ckpt), "--aligner", str(tmp_path / "lora.pt"), "--aligner", str(folder),
                          "--aligner", "base", "--prompt", "Name a bird.", "--max-new-tokens", "4",
                          "--answers-dir", str(tmp_path / "answers")])
    assert sorted(p.name for p in (tmp_path / "answers").iterdir()) == \
        ["adapter-v1.5.jsonl", "base.jsonl", "lora.jsonl"]
    answers = {p.stem: read_jsonl(p)[0]["choices"][0]["turns"][0] for p in (tmp_path / "answers").iterdir()}
    assert answers["lora"] != answers["base"]


def test_an_aligner_run_records_no_lora_settings(tiny_ckpt, task, tmp_path):
    """settings.json of an Aligner run holds what it held before LoRA existed, so such runs still resume."""
    train_sft.main(["--ckpt", str(tiny_ckpt), "--data", str(task), "--out", str(tmp_path / "run"), "--val", "2",
                    "--batch-size", "4", "--epochs", "1", "--max-seq-len", "96", "--max-steps", "1"])
    settings = json.loads((tmp_path / "run" / "settings.json").read_text())
    assert not [k for k in settings if k.startswith("lora")] and settings["n_tokens"] == 10
