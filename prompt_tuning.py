"""
Prompt Tuning (Lester, Al-Rfou, Constant, "The Power of Scale for Parameter-Efficient Prompt
Tuning", arXiv 2104.08691): N learned embeddings placed before the input tokens, at the input
only. No layer reads anything else: no per-layer keys, no gates; the base model stays frozen.

It is here to check one sentence of the Aligner paper (Zhou et al., arXiv 2312.05503, Section 2,
"Related Work"): Prompt Tuning "is the only other method aside from ours that can leverage as
little as one token", but the authors "failed to produce meaningful responses, which highlights
the importance of our novel global-token design". The authors' repository says the same on
Alpaca (README.md, line 25) and holds no Prompt Tuning code; this one trains through the same
scripts, loop and data as the Aligner.

Unlike the Aligner's prefix, the soft tokens are real sequence positions: they take the first N
positions of each row (RoPE, the causal mask and the KV cache treat them as tokens), and the
tokens after them count their positions from N. Transformer.forward places them (llama.py,
"Prompt Tuning" section) on a sequence's first forward and drops the logits of their positions,
so a caller sees logits for its own tokens only. They count towards --max-seq-len.

Initialisation (ours, one of the starts Lester et al. compare in their Section 2.1: random
uniform, sampled vocabulary, class labels): each soft token starts as the embedding of a
vocabulary token drawn at random. In their ablation (Section 3.2, "Prompt Initialization") the
random start lags the vocabulary one except at their largest model; it also puts the soft tokens
at the scale of the embeddings they sit beside, where N(0, 1) rows would be far larger than
LLaMA's token embeddings in the residual stream. Lester et al. draw from the 5,000 most common
tokens of T5's vocabulary; here from the whole vocabulary, whose frequencies the checkpoint does
not record.

File: {"kind": "prompt-tuning", "n_tokens", "base" (the base shape), "soft_tokens" (N, dim)},
read by `PromptTuning.read`; the scripts take it through support.formats.read_adapter, beside Aligner files.
"""

from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from llama import BASE_KEYS, ModelArgs
from support.files import atomic_save, check_values, load_pt

KIND = "prompt-tuning"  # the file's "kind"


class SoftTokens(NamedTuple):
    """What Transformer.forward reads of a Prompt Tuning, on the model's device and in its dtype."""
    soft_tokens: torch.Tensor  # (N, dim), the same for every row


class PromptTuning(nn.Module):
    kind = "Prompt Tuning"

    def __init__(self, args: ModelArgs, n_tokens: int, tok_embeddings: torch.Tensor = None):
        """N soft tokens of width dim: copies of N rows of tok_embeddings (V, dim), drawn with torch's
        global generator, where given; zeros otherwise (a file's values are copied in after)."""
        super().__init__()
        if n_tokens < 1:
            raise ValueError(f"Prompt Tuning needs at least one token, not {n_tokens}")
        self.n_tokens = n_tokens
        self.base = args.base_shape()
        if tok_embeddings is None:
            start = torch.zeros(n_tokens, args.dim)
        else:
            ids = torch.randint(0, tok_embeddings.shape[0], (n_tokens,))
            start = tok_embeddings.detach()[ids.to(tok_embeddings.device)].float().cpu()  # (N, dim)
        self.soft_tokens = nn.Parameter(start)

    def num_params(self) -> int:
        """N * dim: 4,096 for LLaMA-2-7B with N = 1."""
        return self.soft_tokens.numel()

    def describe(self) -> str:
        """One line for the scripts to print: what it is and how many parameters it trains."""
        return (f"{self.kind}: {self.n_tokens} soft token{'s' * (self.n_tokens != 1)} at the input, "
                f"{self.num_params():,} parameters")

    def check_fits(self, args: ModelArgs, source="the Prompt Tuning"):
        args.check_base(self.base, source)

    def rows(self, device, dtype) -> SoftTokens:
        """The soft tokens as forward reads them, on the model's device and in its dtype; the module
        itself stays in float32 where it is."""
        return SoftTokens(self.soft_tokens.detach().to(device, dtype))

    # --- files ---------------------------------------------------------------

    def save(self, path):
        """One small file with the soft tokens, N and the base shape; written atomically."""
        atomic_save({"kind": KIND, "n_tokens": self.n_tokens, "base": self.base,
                     "soft_tokens": self.soft_tokens.detach().cpu()}, path)

    @classmethod
    def read(cls, path, args: ModelArgs = None) -> "PromptTuning":
        """A file written by `save`; with `args`, refuses one made for a base of another shape."""
        return cls.from_state(load_pt(path, "Prompt Tuning file"), Path(path), args)

    @classmethod
    def from_state(cls, state, path: Path, args: ModelArgs = None) -> "PromptTuning":
        needed = ("kind", "n_tokens", "base", "soft_tokens")
        if not isinstance(state, dict) or any(key not in state for key in needed):
            raise ValueError(f"{path}: not a Prompt Tuning file (it needs the keys {list(needed)})")
        if state["kind"] != KIND:
            raise ValueError(f"{path}: 'kind' is {state['kind']!r}, not {KIND!r}")
        if type(state["n_tokens"]) is not int:  # type(), not isinstance: True and False are ints to Python
            raise ValueError(f"{path}: n_tokens is {state['n_tokens']!r}, not an integer")
        base = state["base"]
        if not isinstance(base, dict) or any(key not in base for key in BASE_KEYS):
            raise ValueError(f"{path}: 'base' must hold {list(BASE_KEYS)}, not {base!r}")
        try:
            shape_args = ModelArgs(**{key: base[key] for key in BASE_KEYS}, vocab_size=1)
            prompt = cls(shape_args, n_tokens=state["n_tokens"])
        except (ValueError, TypeError) as e:  # the settings it records are not a Prompt Tuning's
            raise ValueError(f"{path}: {e}") from None
        if args is not None:
            prompt.check_fits(args, source=str(path))
        soft = state["soft_tokens"]
        if not isinstance(soft, torch.Tensor) or soft.shape != prompt.soft_tokens.shape:
            shape = tuple(soft.shape) if isinstance(soft, torch.Tensor) else type(soft).__name__
            raise ValueError(f"{path}: soft_tokens has shape {shape}, its settings imply "
                             f"{tuple(prompt.soft_tokens.shape)}")
        check_values(path, {"soft_tokens": soft}, "Prompt Tuning file")
        prompt.soft_tokens.data.copy_(soft)
        return prompt


def is_prompt_tuning(state) -> bool:
    """Whether a loaded file says it is a Prompt Tuning (its "kind")."""
    return isinstance(state, dict) and state.get("kind") == KIND
