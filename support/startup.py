"""
Imported first by every script: Ctrl-C during start-up ends it in one line.

Ctrl-C while a script is still starting: one line, `<script>: interrupted`, and exit code 130,
as cli.run ends an interrupted script later on.

Every script imports this module first, before torch, whose import takes seconds. Python's own
handler would raise KeyboardInterrupt inside that import, where nothing catches it: a traceback,
and exit code -2. So, when the program being run is one of this project's scripts, this module
puts in a handler that ends the process at once (nothing has been written yet); cli.run gives
Ctrl-C back to Python (hand_over) as it calls the script's main, and catches KeyboardInterrupt
itself from then on, where a run may have files to finish.

A module imported by another program (pytest importing a script to test it) changes nothing.
It imports nothing heavy, and nothing of the project.
"""

import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT_FOLDERS = (ROOT, ROOT / "bench", ROOT / "support")  # support/ for `python -m support.build_demo`


def quit_at_once(signum, frame):
    """Ctrl-C before cli.run: the one line, then exit code 130 (128 + SIGINT), nothing else run."""
    os.write(2, f"{Path(sys.argv[0]).name}: interrupted\n".encode())
    os._exit(130)


def running_a_script() -> bool:
    """Whether the program being run (__main__) is a file among this project's scripts; not in a
    worker that multiprocessing started, whose copy of the script is named __mp_main__."""
    main = sys.modules.get("__main__")
    program = getattr(main, "__file__", None)
    return (getattr(main, "__name__", None) == "__main__" and program is not None
            and Path(program).resolve().parent in SCRIPT_FOLDERS)


def hand_over():
    """From here on Ctrl-C raises KeyboardInterrupt again, for cli.run to catch."""
    if signal.getsignal(signal.SIGINT) is quit_at_once:
        signal.signal(signal.SIGINT, signal.default_int_handler)


if running_a_script() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, quit_at_once)
