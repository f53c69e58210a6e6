"""
What the four scripts (train_sft.py, train_dpo.py, generate.py, evaluate.py)
share at the command line:

- flag types that check a number's range while argparse parses, so that a bad
  value stops at once with argparse's own line, `error: argument --x: ...`,
  before any model loads;
- --device and --dtype, and the one place where their defaults are chosen:
  the base model runs in bfloat16 on a GPU and in float32 on CPU, while an
  Aligner's own parameters and optimizer state always stay float32;
- the one error path: `if __name__ == "__main__": cli.run(main)` turns any
  exception into one line on stderr, `<script>: error: <message>`, and exit
  code 1. --debug (or ALIGNER_DEBUG=1 in the environment) shows the traceback
  instead. Under torchrun each line is written whole, and once however many
  ranks raise it (say);
- how long a rank under torchrun waits for the others in a collective
  (collective_timeout, ALIGNER_COLLECTIVE_TIMEOUT).

The project's own errors are sentences that name the file, flag or key; the
catch-all in `run` is the safety net for everything else.
"""

import argparse
import datetime
import hashlib
import math
import os
import sys
from pathlib import Path

import torch

DTYPES = ("float32", "bfloat16", "float16")


class UsageError(Exception):
    """A command line that argparse refuses; `run` prints it as one line with exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose errors are one line like every other error of the scripts
    (`<script>: error: argument --x: <why>`, exit code 2), without the usage block."""

    def error(self, message):
        raise UsageError(message)


# -----------------------------------------------------------------------------
# flag types: each returns the parsed value or raises argparse's ArgumentTypeError,
# which argparse prints as `error: argument --flag: <message>`

def _int(text: str, what: str, ok) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return value


def _float(text: str, what: str, ok) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or not ok(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return value


def positive_int(text: str) -> int:
    return _int(text, "a positive integer", lambda v: v > 0)


def non_negative_int(text: str) -> int:
    return _int(text, "an integer >= 0", lambda v: v >= 0)


def seed(text: str) -> int:
    """A seed for torch's and Python's generators: an integer in [0, 2**32)."""
    return _int(text, "a seed in [0, 2**32)", lambda v: 0 <= v < 2 ** 32)


def positive_float(text: str) -> float:
    return _float(text, "a positive number", lambda v: v > 0)


def non_negative_float(text: str) -> float:
    return _float(text, "a number >= 0", lambda v: v >= 0)


def probability(text: str) -> float:
    """A probability mass to keep, in (0, 1]: nucleus sampling's top-p."""
    return _float(text, "in (0, 1]", lambda v: 0 < v <= 1)


def smoothing(text: str) -> float:
    """The assumed fraction of flipped labels, in [0, 0.5): at 0.5 a label says nothing."""
    return _float(text, "in [0, 0.5)", lambda v: 0 <= v < 0.5)


def split_size(text: str) -> str:
    """A held-out split: a fraction in [0, 1) written with a point ("0.05"), or a count ("500").

    Returned as written, since the two read differently (trainer.split)."""
    try:
        ok = 0 <= float(text) < 1 if "." in text else int(text) >= 0
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a fraction in [0, 1) such as 0.05 "
                                         "nor a count >= 0 such as 500")
    return text


def device(text: str) -> str:
    """A torch device this machine has: cpu, cuda, cuda:1, mps."""
    try:
        parsed = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has no CUDA device")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has no MPS device")
    elif parsed.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r}: the scripts run on cpu, cuda or mps")
    return text


# -----------------------------------------------------------------------------
# the flags every script takes, and the one choice of device and dtype

def add_checkpoint_flag(parser):
    """--ckpt, the same for every script: either layout, or the built-in demo when none is given."""
    parser.add_argument("--ckpt", default=None,
                        help="a checkpoint folder in Meta's layout (params.json, consolidated.*.pth, tokenizer.model "
                             "in it or beside it) or Hugging Face's (config.json, *.safetensors or *.bin, "
                             "tokenizer.model); none: the built-in demo")


def add_common_flags(parser):
    """--device, --dtype, --fsdp and --debug. The first two have no default in argparse's sense (so that
    --help does not print 'default: None'): `place` fills them in."""
    parser.add_argument("--device", type=device, default=argparse.SUPPRESS,
                        help="where the base model runs: cpu, cuda, cuda:1, ... (default: cuda where there is "
                             "one, else cpu; under torchrun each process takes the GPU of its LOCAL_RANK)")
    parser.add_argument("--dtype", choices=DTYPES, default=argparse.SUPPRESS,
                        help="the base model's dtype (default: bfloat16 on CUDA, float32 elsewhere); "
                             "the Aligner's own parameters stay float32")
    parser.add_argument("--fsdp", action="store_true",
                        help="under torchrun: shard the frozen base over the processes (FSDP2) rather than "
                             "give each a whole copy")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show Python's traceback instead of one line (or set ALIGNER_DEBUG=1)")


def place(args) -> tuple:
    """(device, dtype) of the base model, from --device and --dtype or their defaults.

    This is the one place the scripts choose them. It writes the choice back
    into args as strings, so that a run's settings.json records what ran.
    """
    given = getattr(args, "device", None)
    requested = torch.device(given or ("cuda" if torch.cuda.is_available() else "cpu"))
    if requested.type == "cuda" and requested.index is None:
        requested = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    args.device = str(requested)
    args.dtype = getattr(args, "dtype", None) or ("bfloat16" if requested.type == "cuda" else "float32")
    return requested, getattr(torch, args.dtype)


# -----------------------------------------------------------------------------
# the one error path

def debugging(argv=None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return "--debug" in argv or os.environ.get("ALIGNER_DEBUG", "") not in ("", "0")


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type's name where it has none."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def run(main, argv=None):
    """Run a script's main(argv). Any exception ends the process with one line on stderr
    (`<script>: error: <first line of the message>`) and exit code 1; a refused flag with exit
    code 2, as argparse's own; Ctrl-C with one line and exit code 130. With --debug or
    ALIGNER_DEBUG=1 the exception propagates, traceback and all.

    Errors the project raises itself (ValueError and its FileError and DataError,
    OSError, FloatingPointError) are sentences written for the user and print as they
    are; anything else is unexpected and prints with its type and the hint to use --debug.
    """
    prog = Path(sys.modules[main.__module__].__file__).name
    try:
        main(argv)
    except SystemExit:
        raise
    except UsageError as e:
        say(f"{prog}: error: {e} (--help lists the flags)")
        leave(2)
    except KeyboardInterrupt as e:
        if debugging(argv):
            raise
        detail = f": {first_line(e)}" if str(e) else ""
        say(f"{prog}: interrupted{detail}")
        leave(130)
    except Exception as e:
        if debugging(argv):
            raise
        message = collective_failure(e)
        if message is None:
            message = first_line(e)
            if not isinstance(e, (ValueError, OSError, FloatingPointError)):
                message = f"{type(e).__name__}: {message} (--debug shows the traceback)"
        say(f"{prog}: error: {message}")
        leave(1)


def say(line: str):
    """Write one line on stderr, in one write. Under torchrun (WORLD_SIZE > 1), where the ranks
    share the terminal or log: the line starts with a newline, since rank 0's progress bar may
    hold the line without ending it; and a line is printed once however many ranks raise it
    (only the first to count it in torchrun's store prints it), so an error that every rank
    meets, as the check that the ranks agree (distributed.check_ranks_agree) makes them, is one line."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if not first_to_say(line):
            return
        line = "\n" + line
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a stand-in stream (a test's capture) writes as it is
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
        return
    sys.stderr.flush()
    os.write(fd, (line + "\n").encode())


def first_to_say(line: str) -> bool:
    """Whether this rank is the first to count `line` in the store that torchrun's agent keeps for
    its ranks (the store's add is atomic); True where there is no such store or it cannot be reached."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return True
    try:
        store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                           is_master=False, timeout=datetime.timedelta(seconds=5),
                                           wait_for_workers=False)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        return store.add(f"aligner/said/{attempt}/{hashlib.sha256(line.encode()).hexdigest()}", 1) == 1
    except Exception:
        return True


def leave(code: int):
    """sys.exit(code); a rank under torchrun ends at once instead (exit_at_once)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        exit_at_once(code)
    sys.exit(code)


def exit_at_once(code: int):
    """End a rank under torchrun, its output flushed, without Python's finalization: there,
    Gloo's worker threads may still be releasing the last collective's tensors and abort the
    process (SIGABRT) when they need the interpreter (pytorch/pytorch#179291), losing its exit
    code. Destroying the process group does not join those threads under FSDP2, whose caches
    keep the group alive to the end. Every file is written and closed before this is called."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def collective_failure(e: Exception):
    """The line for a collective that failed under torchrun, or None for any other error: the
    other ranks did not all arrive within collective_timeout(), or one of them left the process
    group (its own line says why, and torchrun stops the ranks still waiting)."""
    pg = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not (pg or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        return None
    if not (isinstance(e, torch.distributed.DistError) or "gloo/transport/" in str(e)):  # Gloo: RuntimeError
        return None
    rank = torch.distributed.get_rank() if pg else os.environ.get("RANK", "?")
    if "timed out" in str(e).lower():
        return (f"rank {rank}: waited {collective_timeout():g} s for another rank that never came "
                f"({TIMEOUT_VARIABLE} sets the wait), so this one stops")
    return f"rank {rank}: another rank stopped, so this one stops too"


# -----------------------------------------------------------------------------
# how long a rank waits for the others

TIMEOUT_VARIABLE = "ALIGNER_COLLECTIVE_TIMEOUT"


def collective_timeout() -> float:
    """Seconds a rank under torchrun waits in a collective (an all-reduce, FSDP's gathering of a
    block's weights, the ranks' check that they agree) for the other ranks: 600, or the number
    in ALIGNER_COLLECTIVE_TIMEOUT. Ours: long enough for what one rank may do while the others
    wait (load a checkpoint a little slower, write the run's files), short enough that a rank
    that never arrives ends the run in minutes, not in Gloo's default 30."""
    text = os.environ.get(TIMEOUT_VARIABLE, "600")
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{TIMEOUT_VARIABLE}={text}: not a number of seconds > 0")
    return seconds
