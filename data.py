"""
What the scripts share about data: the prompt template, and where the built-in demo lives.

The template is Stanford Alpaca's, in its two variants (with and without an
input). Training, generation and evaluation all format prompts through
`format_prompt`, so they can never disagree.
"""

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent / "demo"
DEMO_CKPT = DEMO_DIR / "llama-demo"  # Meta layout; demo/tokenizer.model lies beside it
DEMO_DATA = DEMO_DIR / "data"

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def format_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt; the response follows it directly."""
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)
