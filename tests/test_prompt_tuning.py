"""Prompt Tuning, the baseline at the input only: its forward against the base model run by hand on
[soft tokens; token embeddings], through the KV cache and left-padded batches, its file, and the
scripts that train it (train_sft.py --prompt-tuning) and read it (generate.py, evaluate.py --aligner)."""

import json

import pytest
import torch

import evaluate
import generate as generate_script
import train_sft
from aligner import Aligner, AlignerBank
from support.formats import read_adapter, read_params
from conftest import TINY, read_jsonl, write_fox_task
from generate import generate
from llama import KVCache, ModelArgs, Transformer
from prompt_tuning import PromptTuning
from test_errors import check_failure, run_script
from test_generate import needs_compile


@pytest.fixture(scope="module")
def model(one_thread):
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**TINY, vocab_size=384, max_seq_len=64))
    for p in model.parameters():  # larger than the default init, so that outputs depend visibly on the input
        torch.nn.init.normal_(p, std=0.2) if p.dim() > 1 else None
    return model.requires_grad_(False).eval()


def trained_looking(args, n_tokens, seed=1) -> PromptTuning:
    """A Prompt Tuning whose soft tokens are not any token's embedding, so they change the output."""
    prompt = PromptTuning(args, n_tokens)
    with torch.no_grad():
        prompt.soft_tokens.copy_(torch.randn(n_tokens, args.dim, generator=torch.Generator().manual_seed(seed)))
    return prompt


def by_hand(model, embeddings: torch.Tensor) -> torch.Tensor:
    """The base model on a sequence of embeddings (B, S, dim) from position 0, written out: RoPE
    positions 0..S-1, causal attention, every layer, the final norm and the output head."""
    span = model.span(embeddings.shape[1], embeddings.device, None, None)
    h = embeddings
    for layer in model.layers:
        h = layer(h, span)
    return model.output(model.norm(h)).float()  # (B, S, V)


def test_soft_tokens_are_the_first_positions_of_the_base_models_sequence(model):
    prompt = trained_looking(model.args, 3)
    tokens = torch.randint(0, 384, (2, 7), generator=torch.Generator().manual_seed(0))
    embeddings = torch.cat([prompt.soft_tokens.expand(2, 3, -1), model.tok_embeddings(tokens)], dim=1)  # (2, 10, dim)
    expected = by_hand(model, embeddings)[:, 3:]  # the logits of the soft positions dropped
    got = model(tokens, aligner=prompt)
    assert got.shape == (2, 7, 384)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, model(tokens), atol=1e-3)  # the soft tokens change the output
    # without Prompt Tuning the forward is the same hand computation, bit for bit
    assert torch.equal(model(tokens), by_hand(model, model.tok_embeddings(tokens)))


def test_gradients_reach_the_soft_tokens_and_nothing_else(model):
    prompt = trained_looking(model.args, 2)
    tokens = torch.randint(0, 384, (2, 5), generator=torch.Generator().manual_seed(1))
    model(tokens, aligner=prompt).logsumexp(-1).sum().backward()
    assert prompt.soft_tokens.grad is not None and prompt.soft_tokens.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_logits_through_the_cache_equal_logits_without(model):
    prompt = trained_looking(model.args, 4)
    tokens = torch.randint(0, 384, (2, 9), generator=torch.Generator().manual_seed(2))
    whole = model(tokens, aligner=prompt)  # (2, 9, V)
    cache = KVCache(model.args, 2, 4 + 9)
    pieces = [model(tokens[:, :5], aligner=prompt, cache=cache)]  # the prefill places the soft tokens
    assert cache.length == 4 + 5
    pieces += [model(tokens[:, t:t + 1], aligner=prompt, cache=cache) for t in range(5, 9)]  # they are not placed again
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=1e-4, atol=1e-4)


def test_left_padded_rows_equal_the_same_rows_alone(model):
    """Row b's soft tokens come right after its padding: each row's logits after its prompt, and its
    greedy completion, are those of the row alone."""
    prompt = trained_looking(model.args, 3)
    g = torch.Generator().manual_seed(3)
    prompts = [[1] + torch.randint(3, 384, (n,), generator=g).tolist() for n in (6, 2, 4)]
    longest = max(len(p) for p in prompts)
    tokens = torch.tensor([[1] * (longest - len(p)) + p for p in prompts])  # (3, 7), left-padded
    pad = torch.tensor([longest - len(p) for p in prompts])
    cache = KVCache(model.args, 3, 3 + longest, pad=pad)
    together = model(tokens, aligner=prompt, cache=cache)[:, -1]  # (3, V)
    for b, p in enumerate(prompts):
        alone = model(torch.tensor([p]), aligner=prompt)[0, -1]
        torch.testing.assert_close(together[b], alone, rtol=1e-4, atol=1e-4)

    texts = generate(model, Tok(), prompts, prompt, max_new_tokens=6)
    assert texts == [generate(model, Tok(), [p], prompt, max_new_tokens=6)[0] for p in prompts]
    assert texts != generate(model, Tok(), prompts, None, max_new_tokens=6)


@needs_compile
def test_compiled_decoding_gives_the_eager_greedy_tokens(model):
    """The compiled step reads the soft tokens from the cache the eager prefill filled, N slots on."""
    prompt = trained_looking(model.args, 3)
    g = torch.Generator().manual_seed(4)
    prompts = [[1] + torch.randint(3, 384, (n,), generator=g).tolist() for n in (5, 2)]
    eager = generate(model, Tok(), prompts, prompt, max_new_tokens=8)
    assert generate(model, Tok(), prompts, prompt, max_new_tokens=8, compile=True) == eager


class Tok:
    """Just enough of a tokenizer for generate(): ids as text."""
    bos_id, eos_id = 1, 2

    def decode(self, ids):
        return " ".join(map(str, ids))


def test_parameter_count_is_n_times_dim(model):
    assert PromptTuning(model.args, 10).num_params() == 10 * 64
    with torch.device("meta"):  # LLaMA-2-7B's shape: one token is 4,096 values
        llama2 = ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000)
        assert PromptTuning(llama2, 1).num_params() == 4096
    assert PromptTuning(model.args, 1).describe() == "Prompt Tuning: 1 soft token at the input, 64 parameters"


def test_start_is_a_sample_of_the_vocabulary(model):
    torch.manual_seed(0)
    prompt = PromptTuning(model.args, 5, model.tok_embeddings.weight)
    table = model.tok_embeddings.weight
    assert all((table == row).all(dim=1).any() for row in prompt.soft_tokens)


def test_file_round_trip_and_refusals(model, tmp_path):
    prompt = trained_looking(model.args, 2)
    prompt.save(tmp_path / "pt.pt")
    again = read_adapter(tmp_path / "pt.pt", model.args)  # the --aligner entry point
    assert isinstance(again, PromptTuning) and torch.equal(again.soft_tokens, prompt.soft_tokens)
    state = torch.load(tmp_path / "pt.pt", weights_only=True)
    assert state["kind"] == "prompt-tuning" and state["n_tokens"] == 2 and state["base"]["dim"] == 64

    wider = ModelArgs(**{**TINY, "dim": 128}, vocab_size=384)
    with pytest.raises(ValueError, match=r"pt\.pt was made for a base with .*'dim': 64"):
        read_adapter(tmp_path / "pt.pt", wider)
    for change, message in [({"kind": "lora"}, r"'kind' is 'lora'"),
                            ({"n_tokens": True}, r"n_tokens is True, not an integer"),
                            ({"n_tokens": 3}, r"soft_tokens has shape \(2, 64\), its settings imply \(3, 64\)"),
                            ({"soft_tokens": torch.full((2, 64), float("nan"))}, r"soft_tokens.*NaN")]:
        torch.save({**state, **change}, tmp_path / "bad.pt")
        with pytest.raises(ValueError, match=message):
            PromptTuning.read(tmp_path / "bad.pt", model.args)
    torch.save({k: v for k, v in state.items() if k != "base"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"bad\.pt: not a Prompt Tuning file"):
        read_adapter(tmp_path / "bad.pt", model.args)


def test_a_bank_refuses_a_prompt_tuning_in_one_line(model):
    with pytest.raises(ValueError, match=r"^a Prompt Tuning cannot share a batch .*in a batch of its own$"):
        AlignerBank([Aligner(model.args, n_tokens=1), trained_looking(model.args, 1)])


def test_each_prompt_tuning_decodes_in_a_group_of_its_own(model):
    pt1, pt2, aligner = trained_looking(model.args, 1), trained_looking(model.args, 1), Aligner(model.args, n_tokens=1)
    assert generate_script.same_shape_groups([pt1, None, pt2, aligner]) == [[0], [2], [1, 3]]
    assert generate_script.same_shape_groups([None, pt1]) == [[0], [1]]


@pytest.fixture(scope="module")
def trained(tiny_ckpt, tmp_path_factory):
    """A Prompt Tuning trained by train_sft.main on a tiny task: (task file, run folder)."""
    folder = tmp_path_factory.mktemp("pt")
    write_fox_task(folder / "task.json", 8)
    train_sft.main(run_args(tiny_ckpt, folder / "task.json", folder / "run"))
    return folder / "task.json", folder / "run"


def run_args(ckpt, task, out, *extra):
    return ["--ckpt", str(ckpt), "--data", str(task), "--out", str(out), "--prompt-tuning", "--n-tokens", "3",
            "--val", "2", "--batch-size", "2", "--epochs", "2", "--max-seq-len", "128", *extra]


def test_train_sft_saves_a_file_generate_and_evaluate_read(trained, tiny_ckpt, tmp_path):
    _, run = trained
    args = ModelArgs(**read_params(tiny_ckpt))
    prompt = read_adapter(run / "best.pt", args)
    assert isinstance(prompt, PromptTuning) and prompt.n_tokens == 3
    table = torch.load(tiny_ckpt / "consolidated.00.pth", weights_only=True)["tok_embeddings.weight"]
    assert not any((table == row).all(dim=1).any() for row in prompt.soft_tokens)  # trained away from its start
    assert json.loads((run / "settings.json").read_text())["prompt_tuning"] is True

    aligner = Aligner(args, n_tokens=2)
    with torch.no_grad():
        aligner.gates.normal_()
    aligner.save(tmp_path / "aligner.pt")
    flags = ["--aligner", "base", "--aligner", str(run / "best.pt"), "--aligner", str(tmp_path / "aligner.pt")]
    prompts = ["--prompt", "Name a bird.", "--prompt", "What is the color of fox 3?"]
    generate_script.main(["--ckpt", str(tiny_ckpt), *flags, *prompts, "--max-new-tokens", "6",
                          "--out", str(tmp_path / "together.jsonl")])
    together = read_jsonl(tmp_path / "together.jsonl")
    generate_script.main(["--ckpt", str(tiny_ckpt), "--aligner", str(run / "best.pt"), *prompts,
                          "--max-new-tokens", "6", "--out", str(tmp_path / "alone.jsonl")])
    alone = read_jsonl(tmp_path / "alone.jsonl")
    name = alone[0]["aligner"]  # how generate.py names the file
    assert [r["output"] for r in together if r["aligner"] == name] == [r["output"] for r in alone]  # as alone

    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"instruction": f"Name the color of fox {i}.", "output": "red"}) + "\n"
                          for i in range(3)))
    evaluate.main(["qa", "--ckpt", str(tiny_ckpt), "--data", str(qa), *flags, "--max-new-tokens", "6",
                   "--max-seq-len", "256", "--out", str(tmp_path / "eval")])
    evaluate.main(["qa", "--ckpt", str(tiny_ckpt), "--data", str(qa), "--aligner", str(run / "best.pt"),
                   "--max-new-tokens", "6", "--max-seq-len", "256", "--out", str(tmp_path / "eval-alone")])
    scored = {folder: [r["output"] for r in read_jsonl(tmp_path / folder / "qa.jsonl")
                       if r["aligner"] == str(run / "best.pt")] for folder in ("eval", "eval-alone")}
    assert len(scored["eval"]) == 3 and scored["eval"] == scored["eval-alone"]


def test_resume_is_bit_identical(trained, tiny_ckpt, tmp_path):
    task, reference = trained
    out = tmp_path / "run"
    train_sft.main(run_args(tiny_ckpt, task, out, "--max-steps", "4"))  # stops inside epoch 2
    assert not (out / "epoch-2.pt").exists()
    train_sft.main(run_args(tiny_ckpt, task, out, "--resume"))
    for name in ("epoch-1.pt", "epoch-2.pt", "best.pt"):
        a = torch.load(out / name, weights_only=True)["soft_tokens"]
        assert torch.equal(a, torch.load(reference / name, weights_only=True)["soft_tokens"]), name


def test_train_sft_refuses_flags_that_do_not_fit(tiny_ckpt, trained, tmp_path, capsys):
    task, _ = trained
    for extra, culprit in [(["--llama-adapter"], "--llama-adapter"), (["--n-tokens", "128"], "--max-seq-len 128")]:
        code, _, err = run_script(train_sft, [*run_args(tiny_ckpt, task, tmp_path / "run"), *extra], capsys)
        check_failure(code, err, "train_sft", [culprit], expected_code=1)
        assert not (tmp_path / "run").exists()  # refused before anything was written
