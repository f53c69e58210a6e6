"""
Reading and writing files: atomic writes, one-line errors for files that cannot be read.

Every file the project reads or writes goes through here: writes are atomic
(a temporary file beside the target, fsynced, then renamed over it), and a
file that cannot be read is named in a one-line error, never left to a
traceback from deep inside torch.
"""

import errno
import hashlib
import os
import pickle
import re
import tempfile
import warnings
from pathlib import Path

import torch

# A value this large in an Aligner has exploded: AdamW moves a value by about lr per step, so even a
# million steps at lr 1 stay below 1e7, while 1e10 is still far from where float32 (3.4e38) or the
# attention's dot products would overflow. A file or a training step beyond it is refused.
EXPLODED = 1e10


class FileError(ValueError):
    """A file the project cannot use; the message names it and says why."""


def atomic_write(path, write, mode="wb"):
    """Write through `write(file)` to a temporary file beside `path`, then rename over it:
    a crash at any moment leaves either the old file or the new one, never half of one.

    A write that fails for want of space (or any other error of the file system) removes
    the temporary file, leaves the old file as it was, and raises a FileError naming `path`."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it the usual permissions
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        problem = write_failure(e)
        if problem is None:
            raise
        kept = " (the file there before is unchanged)" if path.exists() else ""
        raise FileError(f"{path}: not written: {problem}{kept}") from None


# What torch.save's zip writer (caffe2/serialize/inline_container.cc) raises when the
# operating system takes fewer bytes than it wrote: a full disk, reported as a position
# mismatch or a failed write rather than as ENOSPC.
TORCH_SHORT_WRITE = ("unexpected pos", "file write failed")


def write_failure(error: BaseException):
    """A sentence for an error that writing a file raised, or None where it is not the
    file system's (a bug in the caller's `write`, Ctrl-C)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk is full ({error.strerror or os.strerror(error.errno)}); free some space and run again"
    if isinstance(error, RuntimeError) and any(s in str(error) for s in TORCH_SHORT_WRITE):
        return "the disk is full (the writer could not write all its bytes); free some space and run again"
    if isinstance(error, OSError) and error.errno is not None:
        return error.strerror or os.strerror(error.errno)
    return None


# The name atomic_write gives its temporary file: "." + the target's name + "." + the eight
# characters of tempfile.mkstemp's random part (lower-case letters, digits and "_").
TEMPORARY_PART = 8
TEMPORARY_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789_")


def stray_temporaries(folder, is_target) -> list:
    """The temporary files that atomic_write left in `folder` for targets whose names satisfy
    is_target(name): it removes its own on any error, so such a file is one that a kill -9 or a
    power cut left mid-write. Nothing else in the folder is listed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    strays = []
    for path in sorted(folder.glob(".*")):
        target, _, random_part = path.name[1:].rpartition(".")
        if (path.is_file() and len(random_part) == TEMPORARY_PART and set(random_part) <= TEMPORARY_CHARS
                and target and is_target(target)):
            strays.append(path)
    return strays


def atomic_save(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_text(path, text: str):
    atomic_write(path, lambda f: f.write(text), mode="w")


# How a file begins: any pickle with its protocol opcode; torch.save's old (non-zip) format with
# the pickled magic number 0x1950a86a20f9469cfc6c (torch/serialization.py, MAGIC_NUMBER) among its
# first bytes. torch.save's zip format begins "PK".
PICKLE_START = b"\x80"
OLD_TORCH_MAGIC = b"\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"


def load_pt(path, what: str, mmap: bool = False):
    """torch.load(weights_only=True) of `path`, or a FileError that names the file: missing,
    empty, truncated, a plain pickle, not a torch file, or holding something other than
    tensors and plain data. torch's own warnings about the file's pickle are not shown: the
    file is read, or refused in one line."""
    path = Path(path)
    if not path.is_file():
        raise FileError(f"{path}: no {what} here")
    if path.stat().st_size == 0:
        raise FileError(f"{path}: the file is empty (expected: {what})")
    with open(path, "rb") as f:
        start = f.read(32)
    if start.startswith(PICKLE_START) and OLD_TORCH_MAGIC not in start:
        raise FileError(f"{path}: a plain pickle (pickle.dump), not a file torch.save wrote; "
                        f"save the {what} with torch.save")
    if start.startswith(PICKLE_START) and start[1] >= 4:  # torch's safe unpickler knows no FRAME opcode
        raise FileError(f"{path}: torch's old (non-zip) format with pickle protocol {start[1]}, which "
                        f"torch.load(weights_only=True) cannot read; save the {what} again with torch.save")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except pickle.UnpicklingError:  # what weights_only refuses to build, or not a pickle at all
        raise FileError(f"{path}: not a readable {what}: it holds something other than tensors and plain "
                        "data, or is no torch file at all") from None
    except Exception as e:  # torch raises RuntimeError, EOFError, KeyError, ... by the file's damage
        reason = "truncated or damaged, or no torch file at all"
        if isinstance(e, (RuntimeError, OSError)) and "central directory" not in str(e) and str(e).strip():
            reason += f": {str(e).strip().splitlines()[0][:160]}"
        raise FileError(f"{path}: not a readable {what} ({reason})") from None


def read_text(path, what: str) -> str:
    """The UTF-8 text of `path`, or a FileError that names the file: missing, a folder,
    unreadable, or not UTF-8 (with the line of the first bad byte)."""
    path = Path(path)
    if path.is_dir():
        raise FileError(f"{path}: a folder, not a {what}")
    if not path.is_file():
        raise FileError(f"{path}: no {what} here")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise FileError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        return raw.decode("utf-8-sig")  # a byte-order mark, as some editors write, is not part of the text
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise FileError(f"{path}, line {line}: not UTF-8 text (byte {raw[e.start]:#04x}); "
                        f"save the {what} as UTF-8") from None


def bad_value(tensors: dict):
    """A sentence about the first of these tensors that is not a tensor, or holds NaN, an infinity
    or a value beyond EXPLODED in magnitude, as 'prefix holds NaN'; None where all are usable."""
    for key, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            return f"{key} is a {type(tensor).__name__}, not a tensor"
        if not tensor.is_floating_point():
            continue
        t = tensor.detach()
        if torch.isnan(t).any():
            return f"{key} holds NaN"
        if torch.isinf(t).any():
            return f"{key} holds an infinite value"
        if t.numel() and t.abs().max().item() > EXPLODED:
            return f"{key} holds {t.abs().max().item():.3g}, beyond {EXPLODED:.0e}: it has exploded"
    return None


def check_values(path, tensors: dict, what: str):
    """Refuse a file whose tensors hold NaN, infinities or exploded values, naming the file and key."""
    problem = bad_value(tensors)
    if problem is not None:
        raise FileError(f"{path}: {problem}; this {what} is not usable")


def sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def append_line(path, line: str):
    """Append one line with a single write to a file opened for appending, then fsync: a kill can
    cut only the line being written, never one before it. A failed write raises a FileError
    naming the file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, (line + "\n").encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise FileError(f"{path}: not written: {write_failure(e) or e}") from None


# -----------------------------------------------------------------------------
# how files are named in tables, legends and answer files

# File names that say nothing of the run they come from: a training's best.pt and epoch-E.pt.
RUN_STEMS = re.compile(r"best|epoch-\d+")


def short_names(paths, alone: tuple = ("base",)) -> list:
    """A short name for each path: its stem, led by its folder where the stem is a run's
    (runs/sft10/best.pt: 'sft10-best'), and with as many more folders as tell alike names apart
    ('x-a-best' and 'y-a-best' for /x/a/best.pt and /y/a/best.pt). A value in `alone` ('base',
    the base model) is its own name."""
    parts = [(p,) if p in alone else (Path(p) if Path(p).is_dir() else Path(p).with_suffix("")).parts
             for p in paths]  # a folder (a PEFT LoRA) keeps its whole name
    names = ["-".join(p[-2:]).lstrip("/-") if RUN_STEMS.fullmatch(p[-1]) and len(p) > 1 else p[-1] for p in parts]
    depth = 1
    while len(set(names)) < len(names) and depth < max(len(p) for p in parts):
        depth += 1
        names = [name if names.count(name) == 1 else "-".join(p[-depth:]).lstrip("/-")
                 for name, p in zip(names, parts)]
    return names


# -----------------------------------------------------------------------------
# where results go: checked before the work, never written over unasked

def check_writable(path, flag: str = "--out", folder: bool = True):
    """Stop now, naming the flag, where results could not be written to `path` (a folder, or a
    file when folder=False): a file in the way, or a place this process may not write. Nothing
    is created: a probe file is written and removed in the nearest folder that exists."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise FileError(f"{flag} {path}: a file is there, not a folder")
    if not folder and path.is_dir():
        raise FileError(f"{flag} {path}: a folder is there, not a file")
    existing = path if path.is_dir() else path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise FileError(f"{flag} {path}: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise FileError(f"{flag} {path}: cannot write in {existing} ({e.strerror or e})") from None


def refuse_existing(paths, flag: str = "--out"):
    """Stop, naming them, where any of these result files already exists: --overwrite replaces them."""
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing:
        verb = "exists" if len(existing) == 1 else "exist"
        raise FileError(f"{flag}: {', '.join(existing)} already {verb}; choose another {flag}, "
                        "or pass --overwrite to replace")


def same_file_key(path):
    """What makes two paths one file: the device and inode of a file that exists (so that a
    symbolic or hard link to it is the same file), the resolved path of one that does not yet."""
    path = Path(path)
    try:
        stat = path.stat()
        return ("inode", stat.st_dev, stat.st_ino)
    except OSError:
        return ("path", str(path.resolve()))


def input_files(flag: str, path) -> list:
    """(how to name it, file) for each file an input names: the file itself ("--aligner a.pt"), or
    every file under a folder ("--ckpt's llama/params.json"); none for a path where nothing is."""
    path = Path(path)
    if path.is_dir():
        return [(f"{flag}'s {p}", p) for p in sorted(path.rglob("*")) if p.is_file()]
    return [(f"{flag} {path}", path)] if path.is_file() else []


def refuse_clashes(inputs, outputs):
    """Stop, before anything is written, where an output would replace one of the command's own
    inputs (with --overwrite too: it replaces earlier results, never what the command reads) or
    two outputs are one file, each written over the other. inputs: (flag, path) pairs, a folder
    standing for every file under it (input_files); outputs: (flag, file) pairs. Paths are
    compared as files (same_file_key), however they are spelt."""
    read = {}
    for flag, path in inputs:
        for name, file in input_files(flag, path):
            read.setdefault(same_file_key(file), name)
    written = {}
    for flag, path in outputs:
        key = same_file_key(path)
        if key in read:
            raise FileError(f"{flag} {path}: the same file as {read[key]}, which this command reads; "
                            f"choose another {flag} (--overwrite replaces earlier results, never an input)")
        if key in written and written[key] != (flag, Path(path)):
            other_flag, other = written[key]
            raise FileError(f"{other_flag} {other} and {flag} {path}: one file for two outputs, each "
                            "written over the other; choose another for one of them")
        written[key] = (flag, Path(path))


# -----------------------------------------------------------------------------
# what an input holds: compared when a run resumes (trainer), and between the ranks of one
# run before the model loads (distributed.check_ranks_agree)

WEIGHT_FILES = (".pth", ".safetensors", ".bin")  # Meta's shards, Hugging Face's weight files
CHECKPOINT_SETTINGS = ("params.json", "config.json")

# A weight file is hashed by its size and SLICES slices of SLICE_BYTES at fixed places, not
# whole: reading all 13 GB of LLaMA-2-13B takes a minute from a fast disk and far longer over a
# network, while 16 MiB take a fraction of a second. Ours, and its price: a change confined to
# the bytes between the slices goes unseen. Another model's weights, or the same model's in
# another dtype, differ already in the first slice, which holds the file's header (the names,
# shapes and places of the tensors) and the start of the first tensor's data.
SLICES = 16
SLICE_BYTES = 1 << 20


def sampled_sha256(path, slices: int = SLICES, slice_bytes: int = SLICE_BYTES) -> str:
    """sha256 of a file's size and of `slices` slices of `slice_bytes` bytes: the first, the last,
    and the others evenly between. A file no larger than the slices together is hashed whole."""
    size = os.path.getsize(path)
    digest = hashlib.sha256(f"{size}\n".encode())
    with open(path, "rb") as f:
        if size <= slices * slice_bytes:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        else:
            for i in range(slices):
                f.seek(i * (size - slice_bytes) // (slices - 1))
                digest.update(f.read(slice_bytes))
    return digest.hexdigest()


def file_fingerprint(path: Path) -> dict:
    """A file's size and hash: sampled for a weight file (sampled_sha256), whole for any other."""
    if path.name.endswith(WEIGHT_FILES):
        return {"bytes": path.stat().st_size, "sampled_sha256": sampled_sha256(path)}
    return {"bytes": path.stat().st_size, "sha256": sha256(path)}


def fingerprint(value, find_tokenizer):
    """What an input holds, as plain data that is equal exactly where the content is (for weight
    files, as far as their sampled slices tell):

    - a file: its size and hash (file_fingerprint);
    - a checkpoint folder (params.json or config.json in it): by file name, its settings file,
      its weight files and its tokenizer.model (in the folder or beside it: `find_tokenizer`, which
      is support.formats.find_tokenizer, passed in so that this module imports nothing above it);
      nothing else there, so that notes or a licence put in the folder change nothing;
    - any other folder (MMLU's): every file under it, by its path inside the folder;
    - anything else (None, 'init', 'base', a path where nothing is): itself, as a string.

    An unreadable file raises OSError."""
    path = Path(value) if isinstance(value, (str, Path)) else None
    if path is not None and path.is_file():
        return file_fingerprint(path)
    if path is not None and path.is_dir():
        if not any((path / name).is_file() for name in CHECKPOINT_SETTINGS):
            return {str(p.relative_to(path)): file_fingerprint(p) for p in sorted(path.rglob("*")) if p.is_file()}
        try:
            tokenizer = [find_tokenizer(path)]
        except FileNotFoundError:
            tokenizer = []
        files = ([path / name for name in CHECKPOINT_SETTINGS if (path / name).is_file()] + tokenizer
                 + [p for p in sorted(path.iterdir()) if p.is_file() and p.name.endswith(WEIGHT_FILES)])
        return {p.name: file_fingerprint(p) for p in files}  # settings first: a difference is named at the first file
    return None if value is None else str(value)
