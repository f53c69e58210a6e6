"""train_dpo.py: Eq. 10 and its log-probabilities, the PKU-SafeRLHF reader, and the CLI on a tiny model."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from support import data, formats
import llama
import train_dpo
from aligner import Aligner


def pku_row(prompt, safe0, safe1, safer, better):
    return {"prompt": prompt, "response_0": f"{prompt} zero", "response_1": f"{prompt} one",
            "is_response_0_safe": safe0, "is_response_1_safe": safe1,
            "safer_response_id": safer, "better_response_id": better}


ROWS = [pku_row("a", True, False, 0, 1),   # safer 0 (safe); better 1 (unsafe)
        pku_row("b", False, True, 1, 1),   # both pick 1 (safe)
        pku_row("c", False, False, 0, 1),  # neither response is safe
        pku_row("d", True, True, 1, 0)]    # both safe; safer 1, better 0


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny(tiny_ckpt):
    model, tokenizer = formats.load(tiny_ckpt, max_seq_len=128)
    torch.manual_seed(0)
    aligner = Aligner(model.args, n_tokens=1)
    with torch.no_grad():
        aligner.gates.normal_(0, 0.3)  # a trained-looking Aligner: not the base model
    prompts = [data.format_prompt("Name a bird."), data.format_prompt("What is two plus three?")]
    pairs = [train_dpo.Pair(data.encode_example(tokenizer, p, "A robin is a bird.", 128),
                            data.encode_example(tokenizer, p, "five.", 128)) for p in prompts]
    return model, aligner, pairs


def test_pairs_cut_in_either_response_are_counted(tiny_ckpt, tmp_path, capsys):
    rows = [{"prompt": "Answer:", "chosen": "A robin.", "rejected": "A robin." + " fox" * 40},
            {"prompt": "Answer:", "chosen": "A robin." + " fox" * 40, "rejected": "A robin."},
            {"prompt": "Answer:", "chosen": "A robin.", "rejected": "A fish."}] * 2
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    train_dpo.main(["--ckpt", str(tiny_ckpt), "--data", str(tmp_path / "pairs.jsonl"), "--out", str(tmp_path / "run"),
                    "--max-seq-len", "24", "--val", "0", "--batch-size", "6", "--epochs", "1"])
    printed = capsys.readouterr().out
    assert "6 pairs; 0 dropped because the chosen response is unsafe; 4 cut to --max-seq-len 24" in printed


def test_safety_filter_and_pair_choice(tmp_path):
    path = write_jsonl(tmp_path / "pku.jsonl", ROWS)
    safer, dropped = data.read_preferences(path, pair="safer")
    assert dropped == 1  # row c: its safer response is unsafe too
    assert [(c, r) for _, c, r in safer] == [("a zero", "a one"), ("b one", "b zero"), ("d one", "d zero")]
    assert safer[0].prompt == data.format_prompt("a")
    better, dropped = data.read_preferences(path, pair="better")
    assert dropped == 2  # rows a and c: the better response is unsafe
    assert [(c, r) for _, c, r in better] == [("b one", "b zero"), ("d zero", "d one")]
    kept, dropped = data.read_preferences(path, pair="better", keep_unsafe=True)
    assert dropped == 0 and [c for _, c, _ in kept] == ["a one", "b one", "c one", "d zero"]


def test_malformed_pku_row_names_its_line(tmp_path):
    rows = [ROWS[0], {**ROWS[1], "safer_response_id": 2}]
    with pytest.raises(data.DataError, match=r"bad.jsonl, line 2: 'safer_response_id' must be 0 or 1"):
        data.read_preferences(write_jsonl(tmp_path / "bad.jsonl", rows))
    with pytest.raises(data.DataError, match=r"line 1: missing key 'rejected'"):
        data.read_preferences(write_jsonl(tmp_path / "bad2.jsonl", [{"prompt": "x", "chosen": "y"}]))


@pytest.mark.parametrize("key, value, message", [
    ("is_response_0_safe", "true", "'is_response_0_safe' must be true or false, not 'true'"),
    ("is_response_1_safe", None, "'is_response_1_safe' must be true or false, not None"),
    ("better_response_id", True, "'better_response_id' must be 0 or 1, not True"),
    ("safer_response_id", 1.5, "'safer_response_id' must be 0 or 1, not 1.5")])
def test_pku_flags_and_ids_of_the_wrong_type_are_named(tmp_path, key, value, message):
    path = write_jsonl(tmp_path / "pku.jsonl", [ROWS[0], {**ROWS[3], key: value}])
    with pytest.raises(data.DataError, match=rf"pku\.jsonl, line 2: {message}"):
        data.read_preferences(path)


def test_preference_files_without_usable_pairs_are_named(tmp_path):
    with pytest.raises(data.DataError, match=r"line 1: expected keys prompt, chosen, rejected, or PKU-SafeRLHF's"):
        data.read_preferences(write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "response": "b"}]))
    unsafe = write_jsonl(tmp_path / "unsafe.jsonl", [ROWS[2], ROWS[2]])  # neither response safe
    with pytest.raises(data.DataError, match=r"unsafe\.jsonl: no usable preference pairs \(2 dropped as unsafe\)"):
        data.read_preferences(unsafe)
    with pytest.raises(ValueError, match="pair must be 'safer' or 'better', not 'worse'"):
        data.read_preferences(unsafe, pair="worse")


def test_response_logps_sums_response_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    targets = torch.tensor([[data.IGNORE, data.IGNORE, 3, 4, data.IGNORE], [data.IGNORE, 1, 2, 0, 6]])
    logp = torch.log_softmax(logits, -1)
    expected = torch.stack([logp[0, 2, 3] + logp[0, 3, 4], logp[1, 1, 1] + logp[1, 2, 2] + logp[1, 3, 0] + logp[1, 4, 6]])
    torch.testing.assert_close(train_dpo.response_logps(logits, targets), expected)


def test_step_zero_loss_is_log2_with_zero_rewards(tiny):
    model, aligner, pairs = tiny
    reference = copy.deepcopy(aligner).requires_grad_(False)
    policy = train_dpo.pair_logps(model, aligner, pairs)
    with torch.no_grad():
        ref = train_dpo.pair_logps(model, reference, pairs)
    losses, chosen, rejected = train_dpo.dpo_loss(*policy, *ref, beta=0.1)
    assert torch.equal(losses, torch.full_like(losses, math.log(2)))
    assert torch.equal(chosen, torch.zeros_like(chosen)) and torch.equal(rejected, torch.zeros_like(rejected))


def test_variants_of_the_loss():
    h_parts = [torch.tensor([1.0]), torch.tensor([-2.0]), torch.tensor([0.5]), torch.tensor([-0.5])]
    h = (1.0 - 0.5) - (-2.0 + 0.5)  # 2.0
    plain = train_dpo.dpo_loss(*h_parts, beta=0.1)[0]
    torch.testing.assert_close(plain, -F.logsigmoid(torch.tensor([0.1 * h])))
    smoothed = train_dpo.dpo_loss(*h_parts, beta=0.1, label_smoothing=0.2)[0]
    torch.testing.assert_close(smoothed, -0.8 * F.logsigmoid(torch.tensor([0.2])) - 0.2 * F.logsigmoid(torch.tensor([-0.2])))
    ipo = train_dpo.dpo_loss(*h_parts, beta=0.1, ipo=True)[0]
    torch.testing.assert_close(ipo, torch.tensor([(h - 5.0) ** 2]))


def test_one_step_raises_the_margin(tiny):
    model, init, pairs = tiny
    aligner = copy.deepcopy(init)
    reference = copy.deepcopy(init).requires_grad_(False)
    with torch.no_grad():
        ref = train_dpo.pair_logps(model, reference, pairs[:1])
    optimizer = torch.optim.AdamW(aligner.parameters(), lr=1e-2, weight_decay=0.0)
    losses, chosen, rejected = train_dpo.dpo_loss(*train_dpo.pair_logps(model, aligner, pairs[:1]), *ref)
    assert (chosen - rejected).item() == 0.0
    losses.sum().backward()
    optimizer.step()
    with torch.no_grad():
        _, chosen, rejected = train_dpo.dpo_loss(*train_dpo.pair_logps(model, aligner, pairs[:1]), *ref)
    assert (chosen - rejected).item() > 0


def test_the_shared_base_after_a_policy_step_is_still_the_base_on_disk(tiny, tiny_ckpt):
    """Policy and reference share one base in memory. After the policy's Aligner has taken an
    optimizer step through it, the reference (the initial Aligner, or none) still scores every pair
    as a base loaded afresh from the checkpoint does, while the policy's scores have moved."""
    model, init, pairs = tiny
    policy, reference = copy.deepcopy(init), copy.deepcopy(init).requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    with torch.no_grad():
        before = train_dpo.pair_logps(model, reference, pairs)
    losses, _, _ = train_dpo.dpo_loss(*train_dpo.pair_logps(model, policy, pairs), *before)
    losses.sum().backward()
    optimizer.step()
    fresh, _ = formats.load(tiny_ckpt, max_seq_len=128)
    with torch.no_grad():
        for ref in (reference, None):  # --reference init, --reference base
            for a, b in zip(train_dpo.pair_logps(model, ref, pairs), train_dpo.pair_logps(fresh, ref, pairs)):
                assert torch.equal(a, b)
        moved = train_dpo.pair_logps(model, policy, pairs)
    assert not torch.allclose(moved[0], before[0], atol=1e-4)


def test_cli_end_to_end(tiny_ckpt, tmp_path, capsys):
    rows = [pku_row(f"Question: What is fox {i}?", True, i not in (1, 3), i % 2, 0) for i in range(12)]
    path = write_jsonl(tmp_path / "pku.jsonl", rows)
    model_args = llama.ModelArgs(**formats.read_params(tiny_ckpt))
    torch.manual_seed(1)
    sft = Aligner(model_args, n_tokens=1)
    with torch.no_grad():
        sft.gates.normal_(0, 0.3)
    sft.save(tmp_path / "sft.pt")
    common = ["--ckpt", str(tiny_ckpt), "--data", str(path), "--init-aligner", str(tmp_path / "sft.pt"),
              "--val", "2", "--batch-size", "4", "--micro-batch-size", "2", "--epochs", "2", "--lr", "1e-2"]
    train_dpo.main([*common, "--out", str(tmp_path / "run")])
    assert "10 pairs; 2 dropped because the chosen response is unsafe" in capsys.readouterr().out
    train_dpo.main([*common, "--out", str(tmp_path / "pre"), "--precompute-ref"])

    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and records[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-7)
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 4  # 8 training pairs in batches of 4, 2 epochs
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin"} <= set(steps[0])
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)
    trained = Aligner.load(tmp_path / "run" / "epoch-2.pt", model_args)
    assert not torch.equal(trained.gates, sft.gates)
    precomputed = Aligner.load(tmp_path / "pre" / "epoch-2.pt", model_args)
    torch.testing.assert_close(precomputed.gates, trained.gates, rtol=1e-4, atol=1e-5)


# -----------------------------------------------------------------------------
# the logged loss and rewards, worked out by hand

PAIRS = [{"prompt": "Question: Name a bird. Answer:", "chosen": "A robin.", "rejected": "A salmon is a fish."},
         {"prompt": "Question: What is two plus three?", "chosen": "five.", "rejected": "The lazy dog."},
         {"prompt": "The capital of France is", "chosen": "Paris.", "rejected": "a fox."},
         {"prompt": "Answer:", "chosen": "The quick brown fox.", "rejected": "A robin is a bird."}]


def hand_logps(model, tok, aligner, prompt, response, k=None) -> float:
    """log pi(response | prompt): the response's tokens and EOS (its first k of them, if k is
    given), each scored after BOS, the prompt (tokenized alone) and the response tokens before it;
    the prompt's own tokens are not counted."""
    prompt_ids = tok.encode(prompt, bos=True)
    tokens = prompt_ids + tok.encode(response, bos=False) + [tok.eos_id]
    end = len(tokens) if k is None else min(len(tokens), len(prompt_ids) + k)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([tokens]), aligner=aligner)[0].double(), -1)
    return sum(logp[t - 1, tokens[t]].item() for t in range(len(prompt_ids), end))


def dpo_run(tiny_ckpt, folder, *flags):
    """train_dpo.py on PAIRS from a two-token Aligner with drawn gates, one batch of all four pairs;
    returns (the initial Aligner, the model, the tokenizer, the step records of metrics.jsonl)."""
    write_jsonl(folder / "pairs.jsonl", PAIRS)
    model, tok = formats.load(tiny_ckpt)
    torch.manual_seed(3)
    init = Aligner(model.args, n_tokens=2)
    with torch.no_grad():
        init.gates.normal_(0, 0.5)
    init.save(folder / "init.pt")
    train_dpo.main(["--ckpt", str(tiny_ckpt), "--data", str(folder / "pairs.jsonl"), "--out", str(folder / "run"),
                    "--init-aligner", str(folder / "init.pt"), "--val", "0", "--batch-size", "4", "--lr", "1e-2",
                    *flags])
    records = [json.loads(l) for l in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    return init, model, tok, [r for r in records if "loss" in r]


def mean(values):
    return sum(values) / len(values)


@pytest.mark.parametrize("flags, loss", [
    ([], lambda h, beta: -math.log(1 / (1 + math.exp(-beta * h)))),
    (["--label-smoothing", "0.2"], lambda h, beta: -0.8 * math.log(1 / (1 + math.exp(-beta * h)))
                                                   - 0.2 * math.log(1 / (1 + math.exp(beta * h)))),
    (["--loss", "ipo"], lambda h, beta: (h - 1 / (2 * beta)) ** 2),
], ids=["dpo", "conservative", "ipo"])
def test_first_step_against_the_base_reference_by_hand(tiny_ckpt, tmp_path, flags, loss):
    """--reference base: at step 1 the policy is the initial Aligner. Its rewards are
    beta * (log pi - log base) of each response, the loss is Eq. 10 (or its variant) of
    h = (log pi_w - log base_w) - (log pi_l - log base_l), each the mean over the batch."""
    beta = 0.5
    init, model, tok, (step, *_) = dpo_run(tiny_ckpt, tmp_path, "--reference", "base", "--beta", str(beta),
                                           "--epochs", "1", *flags)
    ratio = {side: [hand_logps(model, tok, init, p["prompt"], p[side])
                    - hand_logps(model, tok, None, p["prompt"], p[side]) for p in PAIRS]
             for side in ("chosen", "rejected")}
    chosen, rejected = [beta * r for r in ratio["chosen"]], [beta * r for r in ratio["rejected"]]
    assert step["rewards/chosen"] == pytest.approx(mean(chosen), rel=1e-4, abs=1e-6)
    assert step["rewards/rejected"] == pytest.approx(mean(rejected), rel=1e-4, abs=1e-6)
    assert step["rewards/margin"] == pytest.approx(mean([c - r for c, r in zip(chosen, rejected)]), rel=1e-4, abs=1e-6)
    assert step["rewards/accuracy"] == mean([c > r for c, r in zip(chosen, rejected)])
    h = [c - r for c, r in zip(ratio["chosen"], ratio["rejected"])]
    assert step["loss"] == pytest.approx(mean([loss(x, beta) for x in h]), rel=1e-4)
    assert len({round(x, 3) for x in chosen}) == 4 and min(map(abs, h)) > 1e-2  # the sums can tell variants apart


def test_rewards_measure_the_policy_against_the_initial_aligner(tiny_ckpt, tmp_path):
    """--reference init: at step 1 policy and reference are one Aligner, so every reward is zero,
    no pair counts as won, and the loss is log 2. At step 2 the policy is epoch 1's Aligner and the
    reference is still the initial one: rewards beta * (log pi_epoch1 - log pi_init)."""
    init, model, tok, (first, second) = dpo_run(tiny_ckpt, tmp_path, "--beta", "0.5", "--epochs", "2")
    assert (first["rewards/chosen"], first["rewards/rejected"], first["rewards/accuracy"]) == (0, 0, 0)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-7)
    epoch_1 = Aligner.load(tmp_path / "run" / "epoch-1.pt", model.args)
    for side in ("chosen", "rejected"):
        rewards = [0.5 * (hand_logps(model, tok, epoch_1, p["prompt"], p[side])
                          - hand_logps(model, tok, init, p["prompt"], p[side])) for p in PAIRS]
        assert second[f"rewards/{side}"] == pytest.approx(mean(rewards), rel=1e-3, abs=1e-6)
        assert abs(second[f"rewards/{side}"]) > 1e-3


@pytest.mark.parametrize("reference", ["base", "file"])
def test_precompute_ref_scores_the_reference_not_the_policy(tiny_ckpt, tmp_path, reference):
    """--precompute-ref scores the reference once, before training: with --reference base or a
    reference file, which differ from the policy's initial Aligner, the first step's loss and
    rewards are those of the run that scores the reference at every step. (With --reference init
    the two are one Aligner at the start, and scoring the policy instead could not be told apart.)"""
    flags = ["--reference", "base", "--beta", "0.5", "--epochs", "1"]
    if reference == "file":
        model_args = llama.ModelArgs(**formats.read_params(tiny_ckpt))
        torch.manual_seed(7)
        other = Aligner(model_args, n_tokens=1)
        with torch.no_grad():
            other.gates.normal_(0, 0.5)
        other.save(tmp_path / "reference.pt")
        flags[1] = str(tmp_path / "reference.pt")
    (tmp_path / "each").mkdir()
    (tmp_path / "once").mkdir()
    *_, (each,) = dpo_run(tiny_ckpt, tmp_path / "each", *flags)
    *_, (once,) = dpo_run(tiny_ckpt, tmp_path / "once", *flags, "--precompute-ref")
    assert abs(each["rewards/chosen"]) > 1e-3 and abs(each["rewards/rejected"]) > 1e-3  # the reference is not the policy
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"):
        assert once[key] == pytest.approx(each[key], rel=1e-5, abs=1e-6), key


# -----------------------------------------------------------------------------
# --max-response-len: each response scored on its first K tokens

def test_first_response_tokens_cuts_the_response_not_the_prompt():
    example = data.Example(tokens=[1, 50, 51, 52, 60, 61, 62, 2], loss_start=4, truncated=False)  # BOS, 3 + 4
    assert train_dpo.first_response_tokens(example, 1) == data.Example([1, 50, 51, 52, 60], 4, False)
    assert train_dpo.first_response_tokens(example, 3) == data.Example([1, 50, 51, 52, 60, 61, 62], 4, False)
    for k in (4, 5, 100):  # the whole response, EOS included, or more: no cut
        assert train_dpo.first_response_tokens(example, k) == example


def test_max_response_len_scores_the_first_k_tokens_by_hand(tiny_ckpt, tmp_path, capsys):
    """With --reference base, the first step's rewards are beta * (log pi - log base) of each
    response's first K tokens (EOS counted), scored after the whole prompt; the run records K."""
    beta, k = 0.5, 2
    init, model, tok, (step, *_) = dpo_run(tiny_ckpt, tmp_path, "--reference", "base", "--beta", str(beta),
                                           "--epochs", "1", "--max-response-len", str(k))
    assert "; each response scored on its first 2 tokens" in capsys.readouterr().out
    for side in ("chosen", "rejected"):
        rewards = [beta * (hand_logps(model, tok, init, p["prompt"], p[side], k)
                           - hand_logps(model, tok, None, p["prompt"], p[side], k)) for p in PAIRS]
        whole = [beta * (hand_logps(model, tok, init, p["prompt"], p[side])
                         - hand_logps(model, tok, None, p["prompt"], p[side])) for p in PAIRS]
        assert step[f"rewards/{side}"] == pytest.approx(mean(rewards), rel=1e-4, abs=1e-6)
        assert abs(mean(rewards) - mean(whole)) > 1e-3  # the cut is seen
    assert json.loads((tmp_path / "run" / "settings.json").read_text())["max_response_len"] == k


def test_max_response_len_beyond_the_longest_response_is_no_cut(tiny_ckpt, tmp_path):
    (tmp_path / "whole").mkdir()
    (tmp_path / "long").mkdir()
    flags = ["--reference", "base", "--beta", "0.5", "--epochs", "2"]
    *_, whole = dpo_run(tiny_ckpt, tmp_path / "whole", *flags)
    *_, long = dpo_run(tiny_ckpt, tmp_path / "long", *flags, "--max-response-len", "64")  # the longest: 13 with EOS
    assert len(whole) == len(long) == 2
    for a, b in zip(whole, long):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"):
            assert a[key] == b[key], key
