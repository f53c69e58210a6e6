"""
The command line the scripts share: checked flag types, --device and --dtype, one-line errors, progress.

What the four scripts (train_sft.py, train_dpo.py, generate.py, evaluate.py)
share at the command line:

- flag types that check a number's range while argparse parses, so that a bad
  value stops at once with argparse's own line, `error: argument --x: ...`,
  before any model loads;
- --device and --dtype, and the one place where their defaults are chosen:
  the base model runs in bfloat16 on a GPU and in float32 on CPU, while an
  Aligner's own parameters and optimizer state stay float32 (unless a training
  script is given --aligner-dtype bfloat16, as the authors trained theirs);
- the one error path: `if __name__ == "__main__": cli.run(main)` turns any
  exception into one line on stderr, `<script>: error: <message>`, and exit
  code 1. --debug (or ALIGNER_DEBUG=1 in the environment) shows the traceback
  instead. A warning is one line too, `<script>: warning: <message>`;
- a --help that shows every flag's default (HelpFormatter);
- progress: a bar on a terminal, a plain line every 5% (and at least every 10 s) in a log (progress);
- under torchrun, each error line written whole, and once however many ranks
  raise it (say);
- how long a rank under torchrun waits for the others in a collective
  (collective_timeout, ALIGNER_COLLECTIVE_TIMEOUT).

The project's own errors are sentences that name the file, flag or key; the
catch-all in `run` is the safety net for everything else.
"""

import argparse
import contextlib
import datetime
import hashlib
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from support import startup

DTYPES = ("float32", "bfloat16", "float16")


class UsageError(Exception):
    """A command line that argparse refuses; `run` prints it as one line with exit code 2."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help with the description as written and every flag's default after its help:
    `(default: 16)`, `(default: none)` where there is none, `(default: off)` for a switch.
    A help string that already speaks of its default is left as it is."""

    def _get_help_string(self, action):
        help = action.help or ""
        if "default" in help or action.default is argparse.SUPPRESS or action.help is argparse.SUPPRESS:
            return help
        if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return help  # a required positional has no default
        return f"{help} (default: {shown_default(action)})"


def shown_default(action) -> str:
    """How --help writes a flag's default: switches as off/on, an empty list or None as none."""
    default = action.default
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "on" if default else "off"
    if default is None or default == []:
        return "none"
    if isinstance(default, (list, tuple)):
        return " ".join(str(d) for d in default)
    return str(default).replace("%", "%%")


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose errors are one line like every other error of the scripts
    (`<script>: error: argument --x: <why>`, exit code 2), without the usage block, and
    whose --help shows every default (HelpFormatter)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

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


def dropout(text: str) -> float:
    """A dropout probability, in [0, 1): at 1 nothing would pass."""
    return _float(text, "in [0, 1)", lambda v: 0 <= v < 1)


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


def path(text: str) -> str:
    """A path given on the command line: not empty (an empty one would mean the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; name a file or folder")
    return text


def out_path(text: str) -> Path:
    """Where results go: not empty, which would write them into the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path would write into the current folder; name a folder")
    return Path(text)


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
            raise argparse.ArgumentTypeError(
                f"{text!r}: this machine has {plural(torch.cuda.device_count(), 'CUDA device')}")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has no MPS device")
    elif parsed.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r}: the scripts run on cpu, cuda or mps")
    return text


# -----------------------------------------------------------------------------
# the flags every script takes, and the one choice of device and dtype

def add_checkpoint_flag(parser):
    """--ckpt and --tokenizer, the same for every script: either layout, or the built-in demo when
    none is given."""
    parser.add_argument("--ckpt", type=path, default=None,
                        help="a checkpoint folder in Meta's layout (params.json, consolidated.*.pth, tokenizer.model "
                             "in it or beside it) or Hugging Face's (config.json, *.safetensors or *.bin, "
                             "tokenizer.model); none: the built-in demo")
    parser.add_argument("--tokenizer", type=path, default=None,
                        help="the SentencePiece tokenizer.model; none: the first found of tokenizer.model in the "
                             "--ckpt folder, beside it, and, where --ckpt is a symbolic link, beside the folder "
                             "it points to")


def add_common_flags(parser):
    """--device, --dtype, --fsdp and --debug. The first two have no default in argparse's sense (so that
    --help does not print 'default: None'): `place` fills them in."""
    parser.add_argument("--device", type=device, default=argparse.SUPPRESS,
                        help="where the base model runs: cpu, cuda, cuda:1, ... (default: cuda where there is "
                             "one, else cpu; under torchrun each process takes the GPU of its LOCAL_RANK)")
    parser.add_argument("--dtype", choices=DTYPES, default=argparse.SUPPRESS,
                        help="the base model's dtype (default: bfloat16 on CUDA, float32 elsewhere); "
                             "the Aligner's own parameters stay float32 (training scripts: see --aligner-dtype)")
    parser.add_argument("--beyond-context", action="store_true",
                        help="allow --max-seq-len past the checkpoint's context (config.json's "
                             "max_position_embeddings; 4096, LLaMA-2's, for Meta's params.json, which records none)")
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
# progress: a bar on a terminal; in a log, a line every few percent

class Progress:
    """Progress through `total` units, written to `file` (stderr): a tqdm bar where `file` is a
    terminal; elsewhere (a log file, a pipe) one plain line each time another `every` of the
    total is done, `desc: 40/200 (20%) loss=0.8123`, since a bar's carriage-return updates
    would fill a log with thousands of them, and also whenever `seconds` have passed since the
    last line: on a loaded machine 5% can take minutes, which a log should not pass in silence.
    `unit` names what is counted (`evaluating mmlu [base]: 6/6 questions (100%)`). disable: write
    nothing (ranks other than 0)."""

    def __init__(self, total: int, desc: str, initial: int = 0, disable: bool = False, file=None,
                 every: float = 0.05, unit: str = "", seconds: float = 10.0, clock=time.monotonic):
        self.file = file or sys.stderr
        self.total, self.desc, self.n, self.every = total, desc, initial, every
        self.unit, self.seconds, self.clock = unit, seconds, clock
        self.postfix = ""
        self.disable = disable
        self.bar = None
        if not disable and self.file.isatty():
            self.bar = tqdm(total=total, initial=initial, desc=desc, file=self.file, dynamic_ncols=True,
                            unit=f" {unit}" if unit else "it")
        self.shown = self._notch(initial)
        self.shown_at = clock()

    def _notch(self, n: int) -> int:
        """How many steps of `every` n units have completed."""
        return int(n / self.total / self.every + 1e-9) if self.total else 0

    def update(self, n: int = 1):
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif not self.disable and (self._notch(self.n) > self.shown or self.n == self.total
                                   or self.clock() - self.shown_at >= self.seconds):
            self.shown, self.shown_at = self._notch(self.n), self.clock()
            percent = 100 * self.n / self.total if self.total else 100
            unit = f" {self.unit}" if self.unit else ""
            print(f"{self.desc}: {self.n}/{self.total}{unit} ({percent:.0f}%){self.postfix}", file=self.file,
                  flush=True)

    def set_postfix(self, **values):
        """Values shown after the count (the bar's postfix; a log line's tail)."""
        if self.bar is not None:
            self.bar.set_postfix(**values)
        self.postfix = "".join(f" {k}={v}" for k, v in values.items())

    def close(self):
        if self.bar is not None:
            self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def progress(total: int, desc: str, initial: int = 0, disable: bool = False, file=None,
             unit: str = "") -> Progress:
    """The progress display every script uses (Progress)."""
    return Progress(total, desc, initial=initial, disable=disable, file=file, unit=unit)


def plural(n: int, word: str) -> str:
    """'1 answer', '3 answers': a count with its noun in the right number."""
    return f"{n} {word if n == 1 else word + 's'}"


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
    ALIGNER_DEBUG=1 the exception propagates, traceback and all. A warning prints as one line,
    `<script>: warning: <message>`, without the source line Python shows by default.

    Errors the project raises itself (ValueError and its FileError and DataError,
    OSError, FloatingPointError) are sentences written for the user and print as they
    are; anything else is unexpected and prints with its type and the hint to use --debug.
    """
    prog = Path(sys.modules[main.__module__].__file__).name
    startup.hand_over()  # Ctrl-C raises KeyboardInterrupt again, caught below
    try:
        with one_line_warnings(prog, enabled=not debugging(argv)):
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


@contextlib.contextmanager
def one_line_warnings(prog: str, enabled: bool = True):
    """Within this context, each warning (ours or torch's) is one line on stderr, with no source line."""
    if not enabled:
        yield
        return
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        text = (str(message).strip().splitlines() or [category.__name__])[0]
        print(f"{prog}: warning: {text}", file=file or sys.stderr)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


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
