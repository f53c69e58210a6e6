"""
Text generation with a frozen LLaMA and any number of Aligners, through the KV cache.

    python generate.py                                   # the built-in demo model and prompt
    python generate.py --ckpt llama-2-7b --aligner out/aligner.pt --prompt "Give three tips for staying healthy."
    python generate.py --ckpt llama-2-7b --aligner base --aligner out/sft.pt --aligner out/dpo.pt \\
        --prompts-file prompts.jsonl --out answers.jsonl  # each prompt answered by the base and two Aligners
    python generate.py --temperature 0.7 --top-p 0.9 --seed 0 --prompt "Write a haiku about autumn."
    python generate.py --ckpt llama-2-7b --template metamath --prompt "What is 15% of 80?" \\
        --aligner aligner1token-llama2-7B-lr0.009bs64-wu1-epoch-3.0-valloss0.7474.pth   # an authors' Aligner
    python generate.py --ckpt llama-2-7b --aligner base --aligner out/aligner.pt \\
        --prompts-file vicuna_bench/question.jsonl --answers-dir vicuna_bench/model_answer  # for FastChat's judge
    python generate.py --ckpt llama-2-7b --aligner runs/sft-lora/best.pt --merge-lora --prompt "Name a bird."

Each instruction is put in --template (data.TEMPLATES) and tokenized alone,
BOS first, by data.encode_prompt: the same ids that training puts before the response. Any Aligner
file is read by support.formats.read_adapter, this project's or the paper's authors'; so is a LoRA (lora.py:
ours, lit-llama's, a PEFT adapter folder), which decodes in batches of its own, applied beside wq and
wv or, with --merge-lora, written into them first; and a Prompt Tuning (prompt_tuning.py), also in
batches of its own.

--prompts-file also reads the question files of the paper's GPT-4 judges as they
are published (FastChat's Vicuna and MT-bench questions, the Beaver safety
prompts; questions.py), and --answers-dir writes one answer file per model as
the judge scripts read them. A later turn of a question (MT-bench's second) is
prompted with the conversation so far (questions.next_turn_prompt).

The library function is `generate(model, tokenizer, prompts, aligner)`; evaluate.py
calls it. Decoding follows Meta's generation.py and gpt-fast: one prefill of the
whole prompt, then one token per forward, reading the keys and values of earlier
positions from a KVCache. The Aligner's prefix keys and values (Aligner paper,
Eq. 5) depend on the Aligner alone, so the cache computes them on the prefill
and every later step reuses them.

Several prompts decode together, left-padded to the longest; each row stops on
its own (at EOS or a stop string) and the loop ends when all rows have stopped.
Each row may carry its own Aligner (an AlignerRows from AlignerBank.select):
rows with different Aligners share every batched forward.

With compile=True (--compile) the decode step is compiled as gpt-fast does
(torch.compile, mode="reduce-overhead", so CUDA graphs on a GPU) over static
shapes: the prompt is prefilled eagerly, then every step writes the cache at a
position tensor and attends to the whole cache under a mask. The caches come
from a pool and keep their addresses from one generation to the next, so a
new prompt length costs no new compilation, only a new (batch size, cache
length bucket, Aligner shape) does.

Departures from Meta's generation.py: left padding instead of right padding
(positions count from each row's first real token, so a row decodes exactly as
it would alone); stop strings besides EOS; top-k beside top-p.
"""

import support.startup  # noqa: F401  first: Ctrl-C while torch loads ends in one line too (startup.py)

import functools
import json
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import lora
from aligner import Aligner, AlignerBank, AlignerRows, shape_of
from llama import KVCache, ModelArgs
from prompt_tuning import PromptTuning, SoftTokens
from support import cli, distributed
from support.data import DEMO_CKPT, TEMPLATES, check_demo, encode_prompt, format_prompt
from support.files import atomic_text, check_writable, refuse_clashes, refuse_existing, short_names
from support.formats import check_adapter_files, check_context, checkpoint_inputs, load, read_adapter, read_params
from support.questions import (Question, answer_files, answers_path, check_model_ids, check_unique_ids,
                               next_turn_prompt, question_file, read_questions)

DEMO_PROMPT = "What is the home of Belrosvor?"  # a test person of the demo world, whom tuning never saw
DEMO_ALIGNER = "runs/sft/best.pt"  # where the quick start's `python train_sft.py` saves its Aligner


# -----------------------------------------------------------------------------
# sampling

def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep each row's k largest logits (B, V); the others become -inf."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2020): keep the smallest set of most
    probable tokens whose probabilities sum to at least p; the others become -inf.

    logits: (B, V). The most probable token is always kept.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)  # (B, V)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # (B, V)
    drop_sorted = mass_before >= p  # the set already held p without this token
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def sampling_distribution(logits: torch.Tensor, temperature: float, top_p: float = 1.0,
                          top_k: int = 0) -> torch.Tensor:
    """The distribution each row's next token is drawn from: logits (B, V) -> probabilities (B, V).

    The temperature comes first, as in Meta's generation.py (softmax(logits / T), then top-p):
    top-k and top-p then choose among the tokens of the distribution that is sampled.
    """
    logits = logits.float() / temperature
    if top_k > 0:
        logits = top_k_filter(logits, top_k)
    if top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    return torch.softmax(logits, dim=-1)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
           generator: torch.Generator = None) -> torch.Tensor:
    """The next token of each row: logits (B, V) -> ids (B,). Temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = sampling_distribution(logits, temperature, top_p, top_k)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


# -----------------------------------------------------------------------------
# the attention kernel, chosen once per generation

# Eager decoding: flash attention where no mask is needed (a prompt from position 0,
# a new token with no padding), the memory-efficient kernel where one is (left-padded
# rows), the math kernel as the last resort. Both fused kernels read grouped-query
# keys in place (enable_gqa); flash takes no mask, memory-efficient a boolean one.
# cuDNN's attention is left out, though recent torch tries it first on H100-class
# GPUs: it builds an execution graph for each new shape (cached by shape, sequence
# lengths included), and a decode step's key length is new at every step, so each
# call would pay that setup on the CPU. Flash and memory-efficient launch their
# kernels with no setup per shape, so a call costs the CPU about what a matrix
# product does. On the CPU, torch picks its flash kernel or math from the same list.
EAGER_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# The compiled decode step: the math form, which Inductor fuses with the mask and the
# softmax into kernels of its own, as gpt-fast's decode loop does.
COMPILED_ATTENTION = [SDPBackend.MATH]


def attention_kernels(backends: list):
    """A context in which F.scaled_dot_product_attention tries `backends`, in this order.

    Entered around a whole prefill or decode loop, not per call. torch before
    2.6 has no set_priority; its own order among these three is the same.
    """
    try:
        return sdpa_kernel(backends, set_priority=True)
    except TypeError:
        return sdpa_kernel(backends)


# -----------------------------------------------------------------------------
# the forward passes of a generation

def prefill(model, tokens: torch.Tensor, aligner, cache: KVCache) -> torch.Tensor:
    """Run the (left-padded) prompts (B, T) through the model, filling the cache.
    Returns the logits after each row's last prompt token, (B, V)."""
    return model(tokens, aligner, cache)[:, -1]


def decode_one_token(model, token: torch.Tensor, aligner, cache: KVCache,
                     position: torch.Tensor = None) -> torch.Tensor:
    """One new token per row (B, 1) -> the logits that follow it (B, V).

    position: None, and the cache counts positions itself (eager); or the
    token's cache slot as a (1,) tensor on the model's device, for the
    static-shape step that compiled_decode_one_token compiles.
    """
    return model(token, aligner, cache, positions=position)[:, -1]


@functools.cache
def compiled_decode_one_token():
    """decode_one_token compiled once per process, as gpt-fast compiles its decode step:
    fullgraph, static shapes (dynamic=False: a new shape gets a graph of its own
    rather than a slower symbolic one), and mode="reduce-overhead", which replays
    the step as a CUDA graph on a GPU (one launch instead of ~40 per layer)."""
    # Each (batch size, cache bucket, Aligner shape) is a graph of its own; past
    # dynamo's default of 8 per function, later ones would silently run eagerly.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    # RoPE multiplies complex numbers, as Meta's model does; Inductor runs that product
    # as a kernel of its own inside the graph, and warns once that it cannot fuse it.
    warnings.filterwarnings("ignore", message="Torchinductor does not support code generation for complex")
    return torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True, dynamic=False)


# -----------------------------------------------------------------------------
# static caches for the compiled step

CACHE_BUCKET = 256  # a compiled cache holds a multiple of this many positions


class StaticCache(KVCache):
    """A KVCache whose tensors keep their addresses from one generation to the next.

    A CUDA graph replays reads and writes at the addresses it was recorded
    with, so everything the compiled step reads from its arguments, other than
    the new token and its position, lives here: the keys and values, the padding,
    each adapted layer's prefix keys and values (Eq. 5) and the Aligner's gates.
    `pinned` copies a generation's values into tensors allocated once per name
    and shape; torch._dynamo.mark_static_address tells the compiler that their
    addresses never change, so it neither guards on them nor copies them in
    before each replay.
    """

    def __init__(self, args, batch_size: int, max_len: int, device, dtype):
        super().__init__(args, batch_size, max_len, device=device, dtype=dtype)
        for t in self.k + self.v:
            torch._dynamo.mark_static_address(t)
        self.slots = {}

    def reset(self, pad):
        """Empty the cache for a new generation, with `pad` (B,) or None for its prefill."""
        for t in self.k + self.v:
            t.zero_()  # masked slots are multiplied by zero weights: stale NaNs would survive that
        self.length, self.pad, self.prefix = 0, pad, [None] * len(self.k)

    def pinned(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """This cache's own tensor for `name`, at a fixed address, now holding `value`."""
        key = (name, value.shape, value.dtype)
        if key not in self.slots:
            self.slots[key] = torch.empty_like(value, memory_format=torch.contiguous_format)
            torch._dynamo.mark_static_address(self.slots[key])
        return self.slots[key].copy_(value)

    def pin(self, aligner):
        """After the prefill: move what the decode steps read into pinned tensors.

        The padding is pinned as a tensor even when no row is padded (zeros), so
        padded and unpadded batches share one compiled graph; the prefill ran
        without it and so kept the kernel's plain causal path. Returns the
        Aligner to pass to the decode steps.
        """
        pad = self.pad if self.pad is not None else torch.zeros(self.k[0].shape[0], dtype=torch.long)
        self.pad = self.pinned("pad", pad.to(self.k[0].device))
        self.prefix = [None if kv is None else (self.pinned(f"k_p{i}", kv[0]), self.pinned(f"v_p{i}", kv[1]))
                       for i, kv in enumerate(self.prefix)]
        if aligner is None or getattr(aligner, "kind", None) == "LoRA":  # a LoRA's own tensors, as they are
            return aligner
        return AlignerRows(self.pinned("prefix", aligner.prefix), self.pinned("gates", aligner.gates),
                           aligner.start_layer, aligner.layer_specific)


def pin_rope(model, device):
    """The model's RoPE table, read by the compiled step like its weights: on the device, at a fixed address."""
    if model.freqs_cis.device != device:
        model.freqs_cis = model.freqs_cis.to(device)
    torch._dynamo.mark_static_address(model.freqs_cis)


STATIC_CACHES = {}  # (model shape, batch size, bucket, device, dtype) -> StaticCache


def static_cache(args, batch_size: int, length: int, device, dtype) -> StaticCache:
    """A pooled StaticCache of at least `length` positions, rounded up to a CACHE_BUCKET multiple.

    Prompts of any length within a bucket reuse one cache and so one compiled
    graph. The pool keeps every cache it makes, for the life of the process: one
    per (batch size, bucket) met, each 2 * n_layers * B * bucket * H_kv * hd values.
    """
    bucket = min(-(-length // CACHE_BUCKET) * CACHE_BUCKET, args.max_seq_len)
    key = (args.n_layers, args.n_kv_heads, args.head_dim, batch_size, bucket, str(device), dtype)
    if key not in STATIC_CACHES:
        STATIC_CACHES[key] = StaticCache(args, batch_size, bucket, device, dtype)
    return STATIC_CACHES[key]


# -----------------------------------------------------------------------------
# the text of one row, as it grows

def cut_at_stop(text: str, stop) -> tuple:
    """(text before the earliest stop string, whether one was found)."""
    ends = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[:min(ends)], True) if ends else (text, False)


def undecided_tail(text: str, stop) -> int:
    """How many trailing characters may still change: the start of a stop string,
    or an incomplete UTF-8 character, which decodes as U+FFFD until its last byte comes."""
    broken = len(text) - len(text.rstrip("\ufffd"))
    longest = max((len(s) for s in stop), default=0)
    starts_stop = next((n for n in range(min(len(text), longest - 1), 0, -1)
                        if any(s.startswith(text[-n:]) for s in stop)), 0)
    return max(broken, starts_stop)


class Row:
    """One row's generated ids, the text sent to on_token so far, and whether it stopped."""

    def __init__(self, index: int):
        self.index = index
        self.ids = []
        self.sent = ""
        self.text = None  # the final completion, once the row has stopped

    def add(self, token: int, tokenizer, stop, on_token, last: bool):
        """Take one sampled token; stop at EOS, at a stop string, or when this is the last step."""
        done = token == tokenizer.eos_id or last
        if token != tokenizer.eos_id:
            self.ids.append(token)
        if not stop and on_token is None and not done:
            return  # nothing to look at until the end
        text, found = cut_at_stop(tokenizer.decode(self.ids), stop)
        done = done or found
        if done:
            self.text = text
        if on_token is not None:
            ready = text if done else text[:len(text) - undecided_tail(text, stop)]
            if len(ready) > len(self.sent) and ready.startswith(self.sent):
                on_token(self.index, ready[len(self.sent):])
                self.sent = ready


# -----------------------------------------------------------------------------
# the library function

def rows_of(aligner, rows: slice, device, dtype=None):
    """What forward takes as `aligner=` for these batch rows, on the model's device (and in its dtype)."""
    if aligner is None:
        return None
    if isinstance(aligner, PromptTuning):
        return aligner.rows(device, dtype)
    if isinstance(aligner, AlignerRows):
        return AlignerRows(aligner.prefix[rows].to(device, dtype), aligner.gates[rows].to(device, dtype),
                           aligner.start_layer, aligner.layer_specific)
    if aligner.kind == "LoRA":  # one LoRA for every row; the model casts it to its dtype (lora_layers)
        return aligner.to(device)
    # one Aligner for every row: a batch axis of 1 broadcasts over the batch
    return AlignerRows(aligner.prefix.detach()[None].to(device, dtype),
                       aligner.gates.detach()[None].to(device, dtype), aligner.start_layer, aligner.layer_specific)


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[list[int]], aligner=None, *, max_new_tokens: int = 256,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, stop: list[str] = (),
             seed: int | None = None, on_token=None, compile: bool = False, lockstep=None) -> list[str]:
    """Each prompt's completion: its text up to EOS or the first stop string (neither included).

    prompts: token ids, BOS included. aligner: None (the base model), an Aligner
    for every row, or an AlignerRows with one Aligner per prompt. Greedy at
    temperature 0; otherwise sampled with `seed` (None: a fresh random seed).
    on_token(row, text) receives each row's completion piece by piece as it
    becomes final; the pieces join into the returned text. Prompts are decoded
    in batches of at most model.args.max_batch_size rows. compile: decode
    with the compiled static-shape step (the first generation of each batch
    size and cache bucket compiles it). lockstep: a distributed.Lockstep when
    the model is sharded by FSDP; each of its forwards then waits its turn,
    and the caller ends the rank's share with lockstep.finish().
    """
    if compile and lockstep is not None:
        raise ValueError("--compile decodes with one model per process; it does not run under --fsdp")
    if isinstance(aligner, AlignerBank):
        raise TypeError("pass bank.select(rows), one Aligner per prompt, rather than the AlignerBank itself")
    if isinstance(aligner, AlignerRows) and aligner.prefix.shape[0] != len(prompts):
        raise ValueError(f"the AlignerRows hold {aligner.prefix.shape[0]} rows for {len(prompts)} prompts")
    weight = model.tok_embeddings.weight
    generator = torch.Generator(device=weight.device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    stop = [s for s in stop if s]
    batch_size = model.args.max_batch_size
    out = []
    for first in range(0, len(prompts), batch_size):
        rows = slice(first, first + batch_size)
        out += generate_batch(model, tokenizer, prompts[rows], rows_of(aligner, rows, weight.device, weight.dtype),
                              first, max_new_tokens, temperature, top_p, top_k, stop, generator, on_token, compile,
                              lockstep)
    return out


# Where the next step is queued before this step's tokens are read back (which
# waits for them): on a GPU the device then keeps working while Python checks the
# rows. The CPU runs nothing ahead, and reading first saves a step when all rows
# stop early. Reading ahead samples once more at the end of a batch.
READ_AHEAD = {"cuda"}


def next_logits(model, token: torch.Tensor, aligner, cache: KVCache, positions) -> torch.Tensor:
    """The decode step of a generation: this step's tokens (B,) -> the logits that follow them (B, V).

    positions: None for the eager step, which counts positions in the cache;
    for the compiled step, the (1,) slot of these tokens, a tensor on the device.
    """
    if positions is None:
        return decode_one_token(model, token[:, None], aligner, cache)
    torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are read; their memory may be reused
    return compiled_decode_one_token()(model, token[:, None], aligner, cache, positions)


def left_padded(prompts: list, pad_id: int, device) -> tuple:
    """(tokens (B, T), pad (B,) or None): the prompts left-padded with pad_id to the longest, T,
    so that every row's last prompt token sits in the same column; pad, on the device, counts each
    row's padding, None where no row has any."""
    lengths = [len(p) for p in prompts]
    longest = max(lengths)
    tokens = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, longest - len(p):] = torch.tensor(p)
    pad = None if min(lengths) == longest else torch.tensor([longest - n for n in lengths], device=device)
    return tokens, pad


def new_cache(model, batch_size: int, length: int, pad, compile: bool) -> KVCache:
    """The KV cache of one batch's generation, `length` positions in the model's dtype, empty: for the
    compiled step a pooled StaticCache (static_cache), else a KVCache of its own."""
    weight = model.tok_embeddings.weight
    if compile:
        cache = static_cache(model.args, batch_size, length, weight.device, weight.dtype)
        cache.reset(pad)
        return cache
    return KVCache(model.args, batch_size, length, device=weight.device, dtype=weight.dtype, pad=pad)


def generate_batch(model, tokenizer, prompts, aligner, first_row, max_new_tokens, temperature, top_p, top_k,
                   stop, generator, on_token, compile=False, lockstep=None) -> list[str]:
    """`generate` for one batch: left-pad, prefill, then decode until every row has stopped."""
    args = model.args
    device = model.tok_embeddings.weight.device
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError(f"prompt {first_row + lengths.index(0)} is empty; it needs at least the BOS token")
    longest = max(lengths)
    n_soft = aligner.soft_tokens.shape[0] if isinstance(aligner, SoftTokens) else 0  # Prompt Tuning's, in the cache
    if n_soft + longest >= args.max_seq_len:
        raise ValueError(f"a prompt of {longest} tokens" + f" after {n_soft} soft tokens" * (n_soft > 0)
                         + f" leaves no room to generate within max_seq_len {args.max_seq_len}")
    n_new = min(max_new_tokens, args.max_seq_len - n_soft - longest)  # as Meta does, stop at the context's end
    if n_new <= 0:
        return ["" for _ in prompts]

    tokens, pad = left_padded(prompts, tokenizer.bos_id, device)
    cache = new_cache(model, len(prompts), n_soft + longest + n_new - 1, pad, compile)

    # --- prefill, eager in both modes ---------------------------------------------
    with attention_kernels(EAGER_ATTENTION):
        if lockstep is not None:
            lockstep.turn()
        logits = prefill(model, tokens.to(device), aligner, cache)  # (B, V)
    if n_soft:
        aligner = None  # the soft tokens are in the cache now; the decode steps need nothing else of them
    positions = None
    if compile:
        pin_rope(model, device)
        aligner = cache.pin(aligner)
        # step s feeds slot n_soft + longest + s
        positions = torch.arange(n_soft + longest, n_soft + longest + n_new, device=device)

    # --- decode ----------------------------------------------------------------------
    ahead = device.type in READ_AHEAD and lockstep is None  # in lockstep, a rank forwards only on its turn
    rows = [Row(first_row + b) for b in range(len(prompts))]
    next_token = sample(logits, temperature, top_p, top_k, generator)  # (B,)
    with attention_kernels(COMPILED_ATTENTION if compile else EAGER_ATTENTION):
        for step in range(n_new):
            token, last = next_token, step == n_new - 1
            step_positions = None if positions is None else positions[step:step + 1]
            if ahead and not last:
                logits = next_logits(model, token, aligner, cache, step_positions)
                next_token = sample(logits, temperature, top_p, top_k, generator)
            for row, t in zip(rows, token.tolist()):
                if row.text is None:
                    row.add(t, tokenizer, stop, on_token, last=last)
            if all(row.text is not None for row in rows):
                break
            if not ahead and not last:
                # rows that stopped keep decoding their last token; what follows is never read
                if lockstep is not None:
                    lockstep.turn()
                logits = next_logits(model, token, aligner, cache, step_positions)
                next_token = sample(logits, temperature, top_p, top_k, generator)
    return [row.text for row in rows]


# -----------------------------------------------------------------------------
# every prompt answered by every model, turn by turn

def same_shape_groups(aligners: list) -> list:
    """The indices of `aligners` in groups that one AlignerBank can hold: Aligners of the same
    kind, number of tokens and start layer. A LoRA (it changes the base's own projections) and a
    Prompt Tuning (its soft tokens lengthen every row) each stand alone. None (the base model)
    joins the first group of Aligners, or stands alone."""
    groups = {}
    for k, aligner in enumerate(aligners):
        shape = None if aligner is None else shape_of(aligner) if isinstance(aligner, Aligner) else ("alone", k)
        groups.setdefault(shape, []).append(k)
    base = groups.pop(None, [])
    shaped = list(groups.values())
    for group in shaped:
        if base and isinstance(aligners[group[0]], Aligner):
            group[:] = sorted(base + group)
            base = []
    return [base] * bool(base) + shaped


def generate_side_by_side(model, tokenizer, prompts: list, aligners: list, lockstep=None, **options) -> list:
    """Every prompt answered by every Aligner: the answer of prompt i by Aligner k is at
    i * K + k. Aligners of one shape decode in shared batches, each row with its own Aligner;
    Aligners of different shapes (a 1-token and a 10-token one, an Aligner and a LLaMA-Adapter)
    decode group by group.
    Under FSDP (lockstep) every rank runs every group, on its own prompts."""
    n = len(aligners)
    outputs = [None] * (len(prompts) * n)
    for group in same_shape_groups(aligners):
        members = [aligners[k] for k in group]
        if all(a is None for a in members):
            row_aligners = None
        elif len(members) == 1:
            row_aligners = members[0]
        else:
            row_aligners = AlignerBank(members).select([j for _ in prompts for j in range(len(members))])
        rows = [p for p in prompts for _ in members]
        answers = generate(model, tokenizer, rows, row_aligners, lockstep=lockstep, **options)
        if lockstep is not None:
            lockstep.finish()
        for r, answer in enumerate(answers):
            i, j = divmod(r, len(members))
            outputs[i * n + group[j]] = answer
    return outputs


def answer_all(model, tokenizer, encoded: list, aligners: list, d, options: dict) -> list:
    """generate_side_by_side, on one process or under FSDP, where each rank answers its share of
    the prompts and every rank then holds all the answers (prompt i by Aligner k at i * K + k)."""
    if not d.fsdp:
        return generate_side_by_side(model, tokenizer, encoded, aligners, **options)
    n = len(aligners)
    lockstep = distributed.Lockstep(model, d)
    mine = lockstep.share(list(range(len(encoded))))
    answers = generate_side_by_side(model, tokenizer, [encoded[i] for i in mine], aligners, lockstep, **options)
    answers = lockstep.gather({i * n + k: answers[j * n + k] for j, i in enumerate(mine) for k in range(n)})
    return [answers[r] for r in range(len(encoded) * n)]


class Turn(NamedTuple):
    prompt: str  # the exact text given to the model
    answer: str


def converse(questions: list, first_prompts: list, aligners: list, template: str, encode, answer) -> list:
    """Every question answered by every Aligner, turn by turn: dialogues[i * K + k] is [Turn, ...]
    for question i and Aligner k.

    encode(texts, sources) -> token ids; answer(ids, aligners) -> generate_side_by_side's answers.
    The first turns of all questions decode together, every Aligner side by side. A later turn
    is prompted with that Aligner's own conversation so far (next_turn_prompt), so each Aligner
    answers its later turns in batches of its own.
    """
    n = len(aligners)
    first = answer(encode(first_prompts, [q.source for q in questions]), aligners)
    dialogues = [[Turn(first_prompts[r // n], first[r])] for r in range(len(first))]
    for t in range(1, max(len(q.turns) for q in questions)):
        asked = [i for i, q in enumerate(questions) if len(q.turns) > t]
        for k, aligner in enumerate(aligners):
            texts = [next_turn_prompt(dialogues[i * n + k][-1].prompt, dialogues[i * n + k][-1].answer.strip(),
                                      questions[i].turns[t], template) for i in asked]
            answers = answer(encode(texts, [f"{questions[i].source}, turn {t + 1}" for i in asked]), [aligner])
            for i, text, output in zip(asked, texts, answers):
                dialogues[i * n + k].append(Turn(text, output))
    return dialogues


# -----------------------------------------------------------------------------
# the command line: flags

def make_parser():
    """The command line: every flag, with its help and its default."""
    parser = cli.ArgumentParser(description="Generate text with a LLaMA checkpoint and any number of Aligners.")
    cli.add_checkpoint_flag(parser)
    parser.add_argument("--aligner", action="append", default=[],
                        help="an Aligner file, or a LoRA (file or PEFT folder); repeat to answer each prompt "
                             "with several, side by side; "
                             "'base' stands for the base model; none given: the base model alone")
    parser.add_argument("--prompt", action="append", default=[], help="an instruction; repeatable")
    parser.add_argument("--prompts-file", type=cli.path, default=None,
                        help="one instruction per line; or .jsonl/.json records, each kind told by its keys: "
                             "Alpaca's instruction and input, FastChat's Vicuna and MT-bench questions, the "
                             "Beaver safety prompts (questions.py)")
    parser.add_argument("--template", choices=list(TEMPLATES), default="alpaca",
                        help="the prompt format each instruction is put in (data.TEMPLATES): Stanford Alpaca's, "
                             "the authors' MetaMath or Beaver format, or none (the instruction as it is)")
    parser.add_argument("--max-new-tokens", type=cli.positive_int, default=256,
                        help="at most this many tokens per answer")
    parser.add_argument("--max-seq-len", type=cli.positive_int, default=2048,
                        help="the longest prompt and answer together (at most the checkpoint's context: "
                             "see --beyond-context)")
    parser.add_argument("--temperature", type=cli.non_negative_float, default=0.0,
                        help="0: greedy; otherwise sample from softmax(logits / temperature)")
    parser.add_argument("--top-p", type=cli.probability, default=1.0,
                        help="nucleus sampling: keep this much probability")
    parser.add_argument("--top-k", type=cli.non_negative_int, default=0,
                        help="sample among the k most probable tokens; 0: all")
    parser.add_argument("--stop", action="append", default=[], help="end an answer before this string; repeatable")
    parser.add_argument("--seed", type=cli.seed, default=None,
                        help="seed for sampling, for reproducible output; none: a fresh one each run")
    parser.add_argument("--out", type=cli.out_path, default=None,
                        help="also write JSON Lines: instruction, input, prompt (the exact text given to "
                             "the model), aligner, output")
    parser.add_argument("--answers-dir", type=Path, default=None,
                        help="also write each model's answers to <dir>/<model id>.jsonl, as FastChat's judge "
                             "reads them (llm_judge's data/<bench>/model_answer/; for the older eval's "
                             "table/question.jsonl, the answers its eval_gpt_review.py reads)")
    parser.add_argument("--model-id", action="append", default=[],
                        help="the model id of each --aligner in turn, naming its answer file (default: the "
                             "file's stem; 'base' for the base model)")
    parser.add_argument("--questions-out", type=Path, default=None,
                        help="also write the questions as FastChat's question.jsonl, with the answers' ids: "
                             "the judge's question file for prompts that have none (the Beaver prompts)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the files of --out, --answers-dir and --questions-out if they exist")
    cli.add_common_flags(parser)
    parser.add_argument("--compile", action="store_true",
                        help="compile the decode step (torch.compile; CUDA graphs on a GPU): slow to "
                             "start, then less time per token")
    parser.add_argument("--merge-lora", action="store_true",
                        help="write the one --aligner, a LoRA, into the base's wq and wv before generating "
                             "(the same answers to float rounding, no extra work per token), rather than apply "
                             "it beside them")
    return parser


# -----------------------------------------------------------------------------
# what can be checked before anything loads

def check_aligners(args):
    """Each --aligner file readable and usable (formats.check_adapter_files), and --merge-lora's
    one LoRA mergeable: a damaged file stops the run here, before the model loads."""
    shapes = check_adapter_files(args.aligner)
    if args.merge_lora:
        lora.check_merge(args.aligner, shapes, args.fsdp)


def demo_aligners() -> list:
    """The models the demo shows when no --aligner is given: the base beside the quick start's
    Aligner, DEMO_ALIGNER, where one for the demo model is there, since the difference is what
    the demo is about; else the base alone, with a line on how to train that Aligner."""
    try:
        read_adapter(DEMO_ALIGNER, ModelArgs(**read_params(DEMO_CKPT)))
    except (OSError, ValueError):  # not there yet, or trained for another base
        print(f"the base model alone: `python train_sft.py` trains an Aligner into {DEMO_ALIGNER} in a few "
              "minutes, and this then shows the two side by side", file=sys.stderr)
        return []
    print(f"the base model beside the Aligner in {DEMO_ALIGNER} (pass --aligner for others)", file=sys.stderr)
    return ["base", DEMO_ALIGNER]


def gather_questions(parser, args) -> tuple:
    """(questions, checkpoint): --prompt's and --prompts-file's questions and --ckpt; with no
    --ckpt, the built-in demo's model, and its prompt and models (demo_aligners) where none are given."""
    questions = [Question((p,), "", f"--prompt {n}", n) for n, p in enumerate(args.prompt, 1)]
    if args.prompts_file is not None:
        questions += read_questions(args.prompts_file)
    if not questions and args.ckpt is not None:
        parser.error("give --prompt or --prompts-file")
    ckpt = args.ckpt
    if ckpt is None:
        check_demo(DEMO_CKPT)
        ckpt = DEMO_CKPT
        print(f"using the built-in demo model {ckpt} (pass --ckpt for another)", file=sys.stderr)
        questions = questions or [Question((DEMO_PROMPT,), "", "the demo's prompt", 1)]
        args.aligner = args.aligner or demo_aligners()
    return questions, ckpt


def aligner_names(paths) -> list:
    """A short name for each --aligner, which also names its answer file (files.short_names): the
    file's stem (a folder, a PEFT LoRA, by its whole name), led by its run folder for a training's
    best.pt or epoch-E.pt ('sft10-best' for runs/sft10/best.pt), 'base' for the base model; where
    names are alike, with as many of its folders as tell the files apart ('a-best' and 'b-best'
    for runs/a/best.pt and runs/b/best.pt)."""
    return short_names(paths)


def model_names(args) -> list:
    """The name of each model, in --aligner order: --model-id, or aligner_names' rule."""
    paths = args.aligner or ["base"]
    if not args.model_id:
        return aligner_names(paths)
    if len(args.model_id) != len(paths):
        raise ValueError(f"--model-id: {len(args.model_id)} given for {cli.plural(len(paths), 'model')}; give one per "
                         "--aligner, in the same order (one for the base model when there is no --aligner)")
    return list(args.model_id)


def check_outputs(args, questions: list, names: list, ckpt):
    """Before the model loads: every output can be written, none is one of the inputs or another
    output, and none would replace a file unasked."""
    outputs = {}  # flag -> the files it would write
    if args.out is not None:
        check_writable(args.out, "--out", folder=False)
        outputs["--out"] = [args.out]
    if args.answers_dir is not None or args.questions_out is not None:
        check_unique_ids(questions)
    if args.answers_dir is not None:
        check_model_ids(names, "--model-id" if args.model_id else "--aligner")
        check_writable(args.answers_dir, "--answers-dir", folder=True)
        outputs["--answers-dir"] = [answers_path(args.answers_dir, name) for name in names]
    if args.questions_out is not None:
        check_writable(args.questions_out, "--questions-out", folder=False)
        outputs["--questions-out"] = [args.questions_out]
    for flag, path in (("--out", args.out), ("--questions-out", args.questions_out)):
        if args.answers_dir is not None and path is not None and Path(path).resolve().parent == \
                args.answers_dir.resolve():
            raise ValueError(f"{flag} {path}: inside --answers-dir, where the judge would read it as one "
                             "more model's answers; put it beside that folder")
    inputs = checkpoint_inputs(ckpt, args.tokenizer) + [("--aligner", p) for p in args.aligner if p != "base"]
    inputs += [("--prompts-file", args.prompts_file)] if args.prompts_file is not None else []
    refuse_clashes(inputs, [(flag, path) for flag, paths in outputs.items() for path in paths])
    if not args.overwrite:
        for flag, paths in outputs.items():
            refuse_existing(paths, flag)


# -----------------------------------------------------------------------------
# load

def load_models(args, ckpt, d, dtype) -> tuple:
    """(model, tokenizer, aligners): the frozen base and every --aligner in turn (None for
    'base'; the base alone where none is given), or with --merge-lora the base with its LoRA
    written into wq and wv."""
    model, tokenizer = (distributed.load_sharded if d.fsdp else load)(ckpt, device=d.device, dtype=dtype,
                                                                      tokenizer_path=args.tokenizer,
                                                                      max_seq_len=args.max_seq_len)
    aligners = [None if p == "base" else read_adapter(p, model.args) for p in args.aligner] or [None]
    if args.merge_lora:  # W + (alpha / r) B A in the base's own wq and wv; the model then runs as it is
        lora.merge(model, aligners[0])
        aligners = [None]
    return model, tokenizer, aligners


# -----------------------------------------------------------------------------
# generate

def encode_prompts(tokenizer, max_seq_len: int, texts: list, sources: list) -> list:
    """Each prompt text as token ids (data.encode_prompt); one that leaves no room for an answer
    within --max-seq-len is refused, named by its source."""
    encoded = [encode_prompt(tokenizer, text) for text in texts]
    for source, ids in zip(sources, encoded):
        if len(ids) >= max_seq_len:
            raise ValueError(f"{source}: the prompt is {len(ids)} tokens, and --max-seq-len "
                             f"{max_seq_len} leaves no room for an answer")
    return encoded


def print_piece(row: int, piece: str):
    """generate's on_token when the one answer streams to a terminal: each piece as it becomes final."""
    print(piece, end="", flush=True)


def answer_questions(args, questions: list, model, tokenizer, aligners: list, d) -> tuple:
    """(dialogues, stream): question i's turns answered by model k are dialogues[i * K + k];
    stream, whether the one answer was printed to a terminal as it came."""
    texts = [format_prompt(q.instruction, q.input, args.template) for q in questions]
    stream = (len(questions) * len(aligners) == 1 and len(questions[0].turns) == 1 and sys.stdout.isatty()
              and d.world == 1)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   top_k=args.top_k, stop=args.stop, seed=args.seed, on_token=print_piece if stream else None,
                   compile=args.compile)
    encode = functools.partial(encode_prompts, tokenizer, args.max_seq_len)
    answer = functools.partial(answer_all, model, tokenizer, d=d, options=options)
    return converse(questions, texts, aligners, args.template, encode, answer), stream


# -----------------------------------------------------------------------------
# show and save

def show_and_save(args, questions: list, names: list, dialogues: list, stream: bool):
    """Print the answers (each question's, turn by turn, model by model), and write --out,
    --answers-dir and --questions-out."""
    n = len(names)
    if stream:
        print()
    elif len(dialogues) == 1 and len(dialogues[0]) == 1:
        print(dialogues[0][0].answer)
    else:
        for i, q in enumerate(questions):
            for t, turn in enumerate(q.turns):
                print(f"=== {turn}" + (f"\n{q.input}" if q.input and t == 0 else "") + " ===")
                for k, name in enumerate(names):
                    if n > 1:
                        print(f"--- {name} ---")
                    print(dialogues[i * n + k][t].answer)
                print()
    if args.out is not None:
        records = [{"instruction": q.turns[t], "input": q.input if t == 0 else "", "prompt": turn.prompt,
                    "aligner": name, "output": turn.answer}
                   for i, q in enumerate(questions) for t in range(len(q.turns))
                   for k, name in enumerate(names) for turn in [dialogues[i * n + k][t]]]
        write(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
              cli.plural(len(records), "answer"))
    if args.answers_dir is not None:
        answers = [[[turn.answer for turn in dialogues[i * n + k]] for i in range(len(questions))] for k in range(n)]
        for path, text in answer_files(args.answers_dir, questions, names, answers).items():
            write(path, text, cli.plural(len(questions), "answer"))
    if args.questions_out is not None:
        write(args.questions_out, question_file(questions), cli.plural(len(questions), "question"))


def write(path: Path, text: str, what: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_text(path, text)
    print(f"wrote {what} to {path}", file=sys.stderr)


def main(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    device, dtype = cli.place(args)
    d = distributed.init_distributed(device, args.fsdp, args.compile)
    distributed.check_ranks_agree(d, args, ("aligner", "prompts_file"))  # under torchrun, every rank the same run
    check_aligners(args)
    questions, ckpt = gather_questions(parser, args)
    names = model_names(args)
    check_outputs(args, questions, names, ckpt)
    check_context(ckpt, args.max_seq_len, args.beyond_context)
    model, tokenizer, aligners = load_models(args, ckpt, d, dtype)
    dialogues, stream = answer_questions(args, questions, model, tokenizer, aligners, d)
    if d.rank == 0:
        show_and_save(args, questions, names, dialogues, stream)
    distributed.exit_distributed()


if __name__ == "__main__":
    cli.run(main)
