"""
Train an Aligner by supervised fine-tuning: the paper's Experiment 1 (Alpaca).

Aligner (Zhou, Wu, Zhu, Terzopoulos, arXiv 2312.05503), Experiment 1: N learnable
tokens (N = 10, or 1 for the one-token headline) attended by every layer from
layer 2 on, trained on Alpaca with AdamW (lr 9e-3, weight decay 0.02), global
batch 64, linear warmup for one epoch then cosine decay, 8 epochs, examples cut
to 512 tokens. Only the Aligner trains; the base model is frozen (bf16 on a
GPU, fp32 on CPU), the Aligner's own parameters stay in fp32.

Departure: the loss covers the response tokens only by default, as Stanford
Alpaca's train.py does; the authors' preparation script (prepare_alpaca.py,
mask_inputs=False) trains on the whole sequence (--train-on-prompt). Their
finetune script's learning rate rises linearly from zero and never decays
(--schedule constant); the README's "Reproducing the paper" has their run.

Commands:
    python train_sft.py                          # the built-in demo (build it with python build_demo.py)
    python train_sft.py --ckpt llama-2-7b --data alpaca_data.json --n-tokens 1
    torchrun --nproc_per_node 8 train_sft.py --ckpt llama-2-7b --data alpaca_data.json
    python train_sft.py --ckpt llama-2-7b --data alpaca_data.json --resume   # continue a stopped run

--data reads Alpaca's JSON list of {"instruction", "input", "output"} (put in
--template, Stanford Alpaca's by default), the same records as JSON Lines, or
JSON Lines of already formatted {"prompt", "response"}, used as they are.
The Aligner files land in --out (runs/sft): best.pt, epoch-E.pt.
"""

import torch
import torch.nn.functional as F

import cli
import data
import distributed
import trainer
from aligner import Aligner


# The demo's SFT set is small (1,715 examples): the paper's batch of 64 would give only about 200
# optimizer steps in 8 epochs. AdamW moves each parameter by about lr per step, and 200 steps are
# too few for a one-token Aligner's gates to grow from zero (the README has the figures).
DEMO_DEFAULTS = dict(batch_size=16)


def main(argv=None):
    parser = trainer.make_parser("Train an Aligner on instruction data (SFT).", DEMO_DEFAULTS,
                                 "Alpaca JSON, Alpaca JSON Lines, or prompt/response JSON Lines")
    parser.add_argument("--train-on-prompt", action="store_true",
                        help="put the loss on the whole sequence, as the paper's code did, not the response only")
    parser.add_argument("--template", choices=list(data.TEMPLATES), default="alpaca",
                        help="the prompt format of instruction/input/output records (data.TEMPLATES)")
    trainer.add_arguments(parser, n_tokens=10, lr=9e-3, batch_size=64, epochs=8, warmup_epochs=1.0,
                          max_seq_len=512, out="runs/sft")
    args = trainer.parse_args(parser, argv, demo_defaults=DEMO_DEFAULTS, demo_data="alpaca.json")

    # --- processes and devices; every rank given the same run, --out checked, before anything loads
    d = distributed.init_distributed(torch.device(args.device), args.fsdp)
    distributed.check_ranks_agree(d, args, trainer.INPUTS)
    trainer.open_run(args)  # a finished run in --out is refused, and --resume checked
    say = print if d.rank == 0 else (lambda *a, **k: None)
    if args.ckpt == str(data.DEMO_CKPT):
        say(f"Training on the built-in demo ({args.ckpt}, {args.data}).")
    args.micro_batch_size = trainer.micro_batch_size(args, d)

    # --- load the frozen base model
    model, tokenizer = trainer.load_base(args, d)

    # --- data: read, tokenise, split
    pairs = data.read_sft(args.data, args.template)
    examples, n_cut = [], 0
    for pair in pairs:
        example = data.encode_example(tokenizer, pair.prompt, pair.response, args.max_seq_len, args.train_on_prompt)
        n_cut += example.truncated
        if data.n_targets(example) > 0:  # else the prompt alone filled max_seq_len: nothing to learn
            examples.append(example)
    if not examples:
        raise ValueError(f"{args.data}: no examples left: in every one the prompt alone fills "
                         f"--max-seq-len {args.max_seq_len}")
    lengths = [len(e.tokens) for e in examples]
    units = [data.n_targets(e) for e in examples]  # the loss is a mean over these tokens
    say(f"{args.data}: {len(pairs)} examples; {n_cut} cut to --max-seq-len {args.max_seq_len} tokens"
        + (f", {len(pairs) - len(examples)} of them dropped: no response left" if len(examples) < len(pairs) else ""))
    train_idx, val_idx = trainer.split(len(examples), args.val, args.seed)
    say(f"{len(train_idx)} for training, {len(val_idx)} held out for validation; "
        f"{sum(units[i] for i in train_idx)} loss tokens per epoch")

    # --- the Aligner: the only trained parameters, fp32
    torch.manual_seed(args.seed)
    aligner = Aligner(model.args, n_tokens=args.n_tokens, start_layer=args.start_layer).to(d.device)
    say(f"Aligner: {args.n_tokens} token{'s' * (args.n_tokens != 1)} from layer {args.start_layer}, "
        f"{aligner.num_params():,} parameters")

    def batch_loss(indices):
        """Cross-entropy summed over the response tokens of these examples (float32 logits)."""
        tokens, targets = data.collate([examples[i] for i in indices])  # (B, T-1) each
        logits = model(tokens.to(d.device), aligner=aligner)  # (B, T-1, V)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.to(d.device).flatten(),
                               ignore_index=data.IGNORE, reduction="sum")
        return loss, {}

    # --- train; the Aligner files are written as it goes
    trainer.train(args, aligner, batch_loss, train_idx, val_idx, lengths, units, d)
    say(f"done: {args.out / 'best.pt'} (the best by validation loss), {args.out / 'metrics.jsonl'}")
    distributed.exit_distributed()


if __name__ == "__main__":
    cli.run(main)
