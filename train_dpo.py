"""
Train an Aligner by Direct Preference Optimization: the paper's Experiment 2
(DPO on PKU-SafeRLHF, one token), which the authors' code starts from an SFT Aligner.

Aligner (Zhou, Wu, Zhu, Terzopoulos, arXiv 2312.05503), Section 4.2, Appendix C and Eq. 10:
    L = -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])
with log-probabilities summed over the response tokens. The policy is the
frozen base plus the trained Aligner; the reference is the same base (the same
weights in memory, never a second copy) with a frozen reference Aligner: by
default the initial one, or none (--reference base). `--llama-adapter` trains
the paper's baseline, LLaMA-Adapter V1, instead, and `--lora` its other
baseline, LoRA (lora.py); --init-aligner and --reference also take LoRA files.

Where each default comes from:
- the paper: N = 1 (Section 4.2, Figs. 3-4), a PKU pair kept only where its chosen
  response is itself safe (Appendix C);
- the authors' finetune/alignerDPO.py: the start from an SFT Aligner trained on
  the safe responses (previous_aligner_path, line 72, their released
  BeaverDatasetSafetyPartSFTOnly file; --init-aligner; the paper's Appendix B.2
  names only an SFT reference model), beta 0.1, lr 1e-4, AdamW's weight decay
  0.02, examples up to 1024 tokens, a batch of 64 (theirs counts sequences, so
  32 pairs a step; here --batch-size counts pairs);
- ours: one epoch (each pair once; theirs draws 80,000 pairs with replacement
  per "epoch" and ran 3: --epoch-size 80000 --epochs 3), a warmup of a tenth
  of it then cosine decay (theirs: --schedule constant with a warmup of 40,000
  optimizer steps, --warmup-epochs 16 at --epoch-size 80000 --batch-size 32),
  5% held out (theirs validates on PKU-SafeRLHF's test split).

Also offered, in the same loss function: conservative DPO (label smoothing,
Mitchell 2023, "A note on DPO with noisy preferences and relationship to IPO")
and IPO (Azar et al. 2023, arXiv 2310.12036), here on summed log-probabilities.
And --max-response-len K, which scores only the first K tokens of each response
(EOS counted), as TRL's DPOTrainer cuts completions to max_completion_length:
a departure from Eq. 10 and from the authors' code, whose get_logps sums over
the whole response (finetune/alignerDPO.py, lines 267-292). Ours to offer, for
pairs whose rejected response runs long and uncertain while the chosen one is
short and nearly certain after its first word: summed over whole responses,
DPO can take its margin by lowering the rejected tail alone.

Commands:
    python train_dpo.py                     # the built-in demo, from runs/pku-sft/best.pt if present
    python train_dpo.py --ckpt llama-2-7b --data pku_saferlhf_train.jsonl --init-aligner runs/pku-sft/best.pt
    torchrun --nproc_per_node 8 train_dpo.py --ckpt llama-2-7b --data pku.jsonl --init-aligner runs/pku-sft/best.pt

--data reads PKU-SafeRLHF's rows (prompt, response_0, response_1,
is_response_0_safe, is_response_1_safe, safer_response_id, better_response_id),
whose prompt goes through --template (Stanford Alpaca's by default; the
authors' preparation script wrote the beaver format), or {"prompt", "chosen",
"rejected"} lines whose prompt is used as it is. --init-aligner and
--reference take this project's Aligner files or the authors' released ones.
Aligner files land in --out (runs/dpo): best.pt, epoch-E.pt.
"""

import support.startup  # noqa: F401  first: Ctrl-C while torch loads ends in one line too (startup.py)

import copy
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from lora import LoRA, LoRAShape
from support import cli, data, distributed, trainer
from support.formats import check_aligner_file, check_context, read_aligner


# -----------------------------------------------------------------------------
# the objective, as pure functions

def response_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log pi(y|x) of Eq. 10: per row, the log-probabilities of the response tokens, summed.

    logits (B, T, V), float32; targets (B, T), data.IGNORE where no loss
    (the prompt and the padding). Returns (B,).
    """
    token_logps = -F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=data.IGNORE,
                                   reduction="none")  # (B, T), zero where ignored
    return token_logps.sum(-1)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.1,
             label_smoothing: float = 0.0, ipo: bool = False):
    """Eq. 10 per pair, with its two variants. All inputs (B,) summed log-probs; returns
    (losses, chosen_rewards, rejected_rewards), each (B,); a reward is beta * log(pi / ref).

    label_smoothing = eps > 0: conservative DPO, which assumes a fraction eps of
    the labels are flipped. ipo: the squared loss of IPO, which regresses the
    log-ratio difference to 1 / (2 beta) instead of pushing it to infinity.
    """
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)  # (B,)
    if ipo:
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def first_response_tokens(example: data.Example, k: int) -> data.Example:
    """The example with its response cut to its first k tokens (EOS counted as one); the prompt
    is kept whole, as TRL's DPOTrainer keeps it when it cuts completions to max_completion_length."""
    return example._replace(tokens=example.tokens[:example.loss_start + k])


class Pair(NamedTuple):
    """One preference pair, tokenized: the same prompt before each response."""
    chosen: data.Example
    rejected: data.Example


def pair_logps(model, aligner, pairs):
    """Summed response log-probs of chosen and rejected, both (B,), from one forward over 2B rows."""
    device = model.tok_embeddings.weight.device
    tokens, targets = data.collate([p.chosen for p in pairs] + [p.rejected for p in pairs])  # (2B, T-1) each
    logps = response_logps(model(tokens.to(device), aligner=aligner), targets.to(device))  # (2B,)
    return logps[:len(pairs)], logps[len(pairs):]


# A bare `python train_dpo.py` on the demo runs at these defaults, the authors' beta 0.1 and lr 1e-4: on
# the demo's earlier, 700-step world, DPO from its SFT Aligner on the safe responses, which already refused
# every dev harmful request, kept the most ordinary answers at them (docs/world-700.md). The demo table's
# DPO rows, from the Alpaca-style Aligner and LoRA, pass their own flags (run_demo.py), chosen on dev
# (docs/demo.md has every run); on that earlier world, summed over whole responses, the Aligner's DPO took
# its margin by lowering the rejected compliances rather than raising the refusal, which it raised only
# with --max-response-len.
DEMO_DEFAULTS = {}
# A bare `python train_dpo.py` on the demo starts where the authors' code starts Experiment 2's, from an
# SFT Aligner trained on the safe responses of the same rows (their finetune/alignerDPO.py,
# previous_aligner_path), where there is one; the demo's pipeline names its start with --init-aligner.
DEMO_INIT = "runs/pku-sft/best.pt"
DEMO_SFT = "python train_sft.py --data demo/data/pku_saferlhf.jsonl --n-tokens 1 --out runs/pku-sft"


def aligner_shape(args, init) -> tuple:
    """(N, start layer, layer-specific?) of the Aligner that trains: the initial Aligner file's
    (`init`, from formats.check_aligner_file), which --n-tokens, --start-layer and --llama-adapter may
    only repeat; with no file, the flags or the paper's DPO setting, one token from layer 2."""
    if init is None:
        return (1 if args.n_tokens is None else args.n_tokens, 2 if args.start_layer is None else args.start_layer,
                args.llama_adapter)
    for flag, given, held in (("--n-tokens", args.n_tokens, init.n_tokens),
                              ("--start-layer", args.start_layer, init.start_layer)):
        if given is not None and held is not None and given != held:
            raise ValueError(f"{flag} {given} contradicts the initial Aligner {args.init_aligner} (--init-aligner), "
                             f"which holds {held}; leave {flag} out to take the file's")
    if args.llama_adapter and not init.layer_specific:
        raise ValueError(f"--llama-adapter contradicts the initial Aligner {args.init_aligner} (--init-aligner), "
                         "which has one shared prefix, not a LLaMA-Adapter's prefix per layer")
    return init.n_tokens, init.start_layer, init.layer_specific


def lora_shape(args, init) -> tuple:
    """(LoRA?, rank, alpha) of what trains: an initial LoRA file's rank and alpha (`init`, a
    LoRAShape), which --lora-rank and --lora-alpha may only repeat; else the flags, or 8 and 16."""
    rank = 8 if args.lora_rank is None else args.lora_rank
    alpha = 16.0 if args.lora_alpha is None else args.lora_alpha
    if not isinstance(init, LoRAShape):
        if args.lora and init is not None:
            raise ValueError(f"--lora contradicts the initial Aligner {args.init_aligner} (--init-aligner), "
                             "which is no LoRA")
        return args.lora, rank, alpha
    if args.llama_adapter:
        raise ValueError(f"--llama-adapter contradicts the initial Aligner {args.init_aligner} (--init-aligner), "
                         "which is a LoRA")
    for flag, given, held in (("--lora-rank", args.lora_rank, init.rank),
                              ("--lora-alpha", args.lora_alpha, init.alpha)):
        if given is not None and given != held:
            raise ValueError(f"{flag} {given:g} contradicts the initial LoRA {args.init_aligner} (--init-aligner), "
                             f"which holds {held:g}; leave {flag} out to take the file's")
    return True, init.rank, float(init.alpha)


# -----------------------------------------------------------------------------
# flags: checked before anything loads

def make_parser():
    """The command line: the flags both training scripts take, with DPO's defaults, and DPO's own."""
    parser = trainer.make_parser("Train an Aligner on preference pairs (DPO, Eq. 10).", DEMO_DEFAULTS,
                                 "PKU-SafeRLHF rows or prompt/chosen/rejected, JSON Lines")
    parser.add_argument("--init-aligner", type=cli.path, default=None,
                        help="start from this (SFT) Aligner file, which also sets N and the start layer, or "
                             "LoRA file, which sets --lora and its rank and alpha; "
                             f"none: a fresh Aligner (for the demo: {DEMO_INIT} if present)")
    parser.add_argument("--reference", type=cli.path, default="init",
                        help="the frozen reference: 'init' (the initial Aligner), 'base' (no Aligner) "
                             "or an Aligner file")
    parser.add_argument("--precompute-ref", action="store_true",
                        help="compute the reference log-probs once before training, not at every step")
    parser.add_argument("--beta", type=cli.positive_float, default=0.1, help="beta of Eq. 10")
    parser.add_argument("--loss", choices=("dpo", "ipo"), default="dpo", help="Eq. 10 (dpo) or IPO's squared loss")
    parser.add_argument("--label-smoothing", type=cli.smoothing, default=0.0,
                        help="conservative DPO: the assumed fraction of flipped labels (0: plain DPO)")
    parser.add_argument("--max-response-len", type=cli.positive_int, default=None,
                        help="score only the first K tokens of each response (EOS counted) in Eq. 10, as TRL's "
                             "max_completion_length, so that a long rejected response weighs no more than a short "
                             "chosen one (none: the whole response)")
    parser.add_argument("--template", choices=list(data.TEMPLATES), default="alpaca",
                        help="the prompt format of PKU-SafeRLHF rows (data.TEMPLATES)")
    parser.add_argument("--pair", choices=("safer", "better"), default="safer",
                        help="for PKU-SafeRLHF rows: the id that names the chosen response")
    parser.add_argument("--keep-unsafe", action="store_true",
                        help="for PKU-SafeRLHF rows: keep pairs whose chosen response is itself unsafe")
    trainer.add_arguments(parser, n_tokens=1, lr=1e-4, batch_size=64, epochs=1, warmup_epochs=0.1,
                          max_seq_len=1024, out="runs/dpo", shape_from="--init-aligner",
                          lora_note="the other settings stay this script's: the sources give no LoRA settings "
                                    "for DPO")
    return parser


def parse_flags(argv):
    """The run's flags, parsed (trainer.parse_args) and checked; on the demo, --init-aligner
    defaults to DEMO_INIT where that file is there."""
    args = trainer.parse_args(make_parser(), argv, demo_defaults=DEMO_DEFAULTS, demo_data="pku_saferlhf.jsonl")
    if args.prefix_init == "authors" and args.init_aligner is not None:
        raise ValueError(f"--prefix-init authors starts a fresh Aligner; --init-aligner {args.init_aligner} "
                         "starts from a file: give one or the other")
    if (args.ckpt == str(data.DEMO_CKPT) and args.init_aligner is None and args.prefix_init == "randn"
            and Path(DEMO_INIT).is_file()):
        args.init_aligner = DEMO_INIT
    return args


# -----------------------------------------------------------------------------
# processes, devices and the Aligner files

def start(args) -> distributed.Dist:
    """Join the processes, every rank given the same run; the Aligner files, --out and the context
    checked before anything loads, the shape of what trains settled; the micro-batch settled."""
    d = distributed.init_distributed(torch.device(args.device), args.fsdp)
    distributed.check_ranks_agree(d, args, trainer.INPUTS)
    if args.reference not in ("init", "base"):
        check_aligner_file(args.reference)  # an unreadable or unusable Aligner file stops here, before the base loads
    init = check_aligner_file(args.init_aligner) if args.init_aligner else None
    args.n_tokens, args.start_layer, args.llama_adapter = aligner_shape(  # what trains, as recorded
        args, None if isinstance(init, LoRAShape) else init)
    args.lora, args.lora_rank, args.lora_alpha = lora_shape(args, init)
    trainer.open_run(args)  # a finished run in --out is refused, and --resume checked
    check_context(args.ckpt, args.max_seq_len, args.beyond_context)
    if args.ckpt == str(data.DEMO_CKPT):
        fresh = ("a fresh Aligner from the authors' starting prefix" if args.prefix_init == "authors"
                 else f"a fresh Aligner (no {DEMO_INIT} yet: run `{DEMO_SFT}` first)")
        trainer.speaker(d)(f"{trainer.demo_line(args.ckpt, args.data, 'pku_saferlhf.jsonl')}, "
                           f"from {args.init_aligner or fresh}.")
    args.micro_batch_size = trainer.micro_batch_size(args, d)
    return d


# -----------------------------------------------------------------------------
# data: read, tokenise, split

def read_pairs(args, tokenizer, say) -> trainer.TrainingSet:
    """--data's preference pairs, tokenised (each response after the same prompt, cut to
    --max-seq-len) and split; a pair counts one unit of the loss."""
    triples, n_unsafe = data.read_preferences(args.data, args.pair, args.keep_unsafe, args.template)
    pairs, n_cut = [], 0
    for t in triples:
        pair = Pair(data.encode_example(tokenizer, t.prompt, t.chosen, args.max_seq_len),
                    data.encode_example(tokenizer, t.prompt, t.rejected, args.max_seq_len))
        n_cut += pair.chosen.truncated or pair.rejected.truncated
        if args.max_response_len is not None:
            pair = Pair(*(first_response_tokens(e, args.max_response_len) for e in pair))
        if data.n_targets(pair.chosen) > 0 and data.n_targets(pair.rejected) > 0:  # else the prompt filled it
            pairs.append(pair)
    if not pairs:
        raise ValueError(f"{args.data}: no pairs left: in every one the prompt alone fills "
                         f"--max-seq-len {args.max_seq_len}")
    lengths = [len(p.chosen.tokens) + len(p.rejected.tokens) for p in pairs]  # tokens a pair puts through the model
    units = [1] * len(pairs)  # the loss is a mean over pairs
    k = args.max_response_len
    scored = "" if k is None else f"; each response scored on its first {f'{k} tokens' if k > 1 else 'token'}"
    say(f"{args.data}: {cli.plural(len(pairs), 'pair')}; {n_unsafe} dropped because the chosen response is unsafe"
        f"{' (kept by --keep-unsafe)' if args.keep_unsafe else ''}; {n_cut} cut to --max-seq-len "
        f"{args.max_seq_len} tokens" + (f", {len(triples) - len(pairs)} of them dropped: no response left"
                                        if len(pairs) < len(triples) else "") + scored)
    train_idx, val_idx = trainer.split(len(pairs), args.val, args.seed)
    say(f"{cli.plural(len(train_idx), 'pair')} for training, {len(val_idx)} held out for validation")
    return trainer.TrainingSet(pairs, lengths, units, train_idx, val_idx)


# -----------------------------------------------------------------------------
# the policy's Aligner, the reference's, and the loss

def new_policy(args, model, device):
    """The policy's Aligner, the one trained (fp32 or --aligner-dtype): --init-aligner's, or a
    fresh one drawn after torch.manual_seed(--seed)."""
    torch.manual_seed(args.seed)
    if args.init_aligner:
        aligner = read_aligner(args.init_aligner, model.args).train()
    elif args.lora:
        aligner = LoRA(model.args, args.lora_rank, args.lora_alpha, args.lora_dropout)
    else:
        aligner = trainer.new_aligner(args, model.args)
    if args.lora:
        aligner.dropout = args.lora_dropout  # this run's, whatever the initial file trained with
    return aligner.to(device, getattr(torch, args.aligner_dtype))


def new_reference(args, model, policy, device):
    """The frozen reference Aligner of --reference: a copy of the initial policy, none (the
    base), or an Aligner file."""
    if args.reference == "init":
        return copy.deepcopy(policy).requires_grad_(False).eval()
    if args.reference == "base":
        return None
    return read_aligner(args.reference, model.args).to(device).requires_grad_(False).eval()


def reference_table(args, model, reference, dataset: trainer.TrainingSet, d):
    """--precompute-ref: the reference's (chosen, rejected) log-probs of every pair, (P, 2), each
    rank scoring its share and the sum over ranks filling the table; else None."""
    if not args.precompute_ref:
        return None
    pairs, lengths = dataset.items, dataset.lengths
    ref_logps = torch.zeros(len(pairs), 2, device=d.device)
    everything = list(range(len(pairs)))
    with torch.no_grad():
        for micro in trainer.my_micro_batches(everything, lengths, d.rank, d.world, args.micro_batch_size):
            ref_logps[micro] = torch.stack(pair_logps(model, reference, [pairs[i] for i in micro]), -1)
        for filler in trainer.fillers(everything, lengths, d, args.micro_batch_size):
            pair_logps(model, reference, [pairs[i] for i in filler])  # in step with the other ranks
    return distributed.all_reduce_sum(ref_logps, d.world)


STAT_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin")


class PreferenceLoss(NamedTuple):
    """trainer.train's batch_loss: called with the indices of some pairs, it returns Eq. 10 summed
    over them, with the reward statistics (STAT_NAMES) summed likewise."""
    model: torch.nn.Module
    policy: torch.nn.Module
    reference: torch.nn.Module | None
    ref_logps: torch.Tensor | None  # (P, 2) from reference_table, or None: the reference runs at every step
    pairs: list
    args: object  # --beta, --label-smoothing, --loss

    def __call__(self, indices: list):
        batch = [self.pairs[i] for i in indices]
        policy_chosen, policy_rejected = pair_logps(self.model, self.policy, batch)
        if self.ref_logps is not None:
            ref_chosen, ref_rejected = self.ref_logps[indices].unbind(-1)
        else:
            with torch.no_grad():
                ref_chosen, ref_rejected = pair_logps(self.model, self.reference, batch)
        losses, chosen, rejected = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                                            self.args.beta, self.args.label_smoothing, self.args.loss == "ipo")
        return losses.sum(), {"rewards/chosen": chosen.sum(), "rewards/rejected": rejected.sum(),
                              "rewards/accuracy": (chosen > rejected).float().sum(),
                              "rewards/margin": (chosen - rejected).sum()}


# -----------------------------------------------------------------------------
# the run: train; the Aligner files are written as it goes

def main(argv=None):
    args = parse_flags(argv)
    d = start(args)
    say = trainer.speaker(d)
    model, tokenizer = trainer.load_base(args, d)  # the frozen base: policy and reference share it
    dataset = read_pairs(args, tokenizer, say)
    policy = new_policy(args, model, d.device)
    reference = new_reference(args, model, policy, d.device)
    say(f"{policy.describe()}; reference: {args.reference}")
    ref_logps = reference_table(args, model, reference, dataset, d)
    loss = PreferenceLoss(model, policy, reference, ref_logps, dataset.items, args)
    trainer.train(args, policy, loss, dataset.train_idx, dataset.val_idx, dataset.lengths, dataset.units, d,
                  STAT_NAMES)
    say(f"done: {args.out / 'best.pt'} (the best by validation loss), {args.out / 'metrics.jsonl'}")
    distributed.exit_distributed()


if __name__ == "__main__":
    cli.run(main)
