"""Process supervision of a stage: it ends (SIGTERM, unwinding like Ctrl-C) when whatever
launched it dies, through Linux's parent-death signal and a watchdog thread on the launcher
behind a shell, and a SIGTERM becomes a clean SystemExit.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from pathlib import Path

SHELLS = ("sh", "bash", "dash", "zsh", "fish", "ksh")


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(command name, parent pid, start time) of a live process; None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm, rest = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
    return comm, int(rest[1]), int(rest[19])  # fields 4 (ppid) and 22 (starttime) of proc(5)


def die_with_parent() -> None:
    """End this stage (SIGTERM, so it unwinds) when whatever launched it dies: a killed
    ``dvc repro`` must not leave its stage running as an orphan that later writes outputs.

    DVC runs the command through ``$SHELL -c``: bash execs it, dash keeps a shell in between,
    so the launcher is the parent, or the shell's parent. Linux's PR_SET_PDEATHSIG covers the
    direct parent at once; a watchdog thread covers the launcher behind a shell.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    stat = proc_stat(parent)
    if stat is None or os.getppid() != parent:  # gone before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)
        return
    launcher = stat[1] if stat[0] in SHELLS else parent
    if launcher == 1 and parent != launcher:
        # the shell between us and our launcher was handed to init: the launcher died while
        # this process was starting
        os.kill(os.getpid(), signal.SIGTERM)
        return
    started = (proc_stat(launcher) or ("", 0, -1))[2]

    def watch() -> None:
        while (proc_stat(launcher) or ("", 0, -2))[2] == started:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def raise_on_sigterm(signum: int, frame: object) -> None:
    # SystemExit unwinds like Ctrl-C: atomic writes drop their temporary files, Ray shuts down,
    # an MLflow run ends FAILED. Later SIGTERMs (the parent-death signal and the watchdog may
    # both send one) are ignored, so that a second exit cannot cut that clean-up short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise SystemExit(128 + signum)
