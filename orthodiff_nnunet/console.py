"""What a person sees while a long command runs: one line per stage, nnU-Net's chatter in log files.

nnU-Net prints its plans, its configuration and a few lines per epoch through ``print_to_log_file``
(which also prints) and plain ``print``; worker processes print too. :func:`output_to_log` sends all
of it (file descriptor 1, so child processes and C extensions included, and ``sys.stdout``) and this
package's log records into one log file, while progress bars (tqdm, on standard error) and this
package's warnings stay on the console (the libraries' deprecation notices go to the log).
:class:`StageConsole` prints, per stage, the equivalent ``orthodiff`` command before it starts and one
line with its time and figures when it ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["BAR_FORMAT", "StageConsole", "Stage", "output_to_log"]

#: tqdm bar of training iterations: always iterations per second (tqdm's default turns a rate below 1
#: into seconds per iteration), remaining time, then the postfix (epoch, loss)
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: loggers whose debug records (e.g. "nnU-Net said: ...") the log files keep
_OUR_LOGGERS = ("orthodiff_nnunet", "orthodiff", "trainers")


@contextlib.contextmanager
def output_to_log(log_file: Path | None) -> Iterator[Path | None]:
    """Send standard output and this package's log records to ``log_file`` (appended) while the block runs.

    Standard output is redirected at the file-descriptor level (``os.dup2``) as well as ``sys.stdout``,
    so prints of nnU-Net, of its worker processes and of C code all land in the file. Console log
    handlers are raised to WARNING meanwhile (warnings and errors stay visible), and a file handler
    writes every record of this package, debug included, to the same file. Standard error, where tqdm
    draws its bars, is untouched. Everything is restored on exit, also after an exception.

    Args:
        log_file: the log file (its folder is created); ``None``: do nothing (verbose mode).
    """
    if log_file is None:
        yield None
        return
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    ours = [logging.getLogger(n) for n in _OUR_LOGGERS]
    consoles = [h for h in root.handlers
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    saved_handler_levels = [(h, h.level) for h in consoles]
    saved_levels = [(lg, lg.level) for lg in ours]
    with open(log_file, "a", encoding="utf-8", buffering=1) as f:
        handler = logging.FileHandler(log_file, encoding="utf-8")
        handler.setFormatter(logging.Formatter(_LOG_FORMAT, datefmt="%H:%M:%S"))
        handler.setLevel(logging.DEBUG)
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
        saved_fd = None
        try:
            saved_fd = os.dup(1)
            os.dup2(f.fileno(), 1)
        except OSError:  # no file descriptor 1 (embedded interpreters): sys.stdout alone
            saved_fd = None
        root.addHandler(handler)
        for h in consoles:
            h.setLevel(max(h.level, logging.WARNING))
        for lg in ours:
            lg.setLevel(logging.DEBUG)
        saved_showwarning = warnings.showwarning
        warnings.showwarning = _warnings_for_the_log(f, saved_showwarning)
        try:
            with contextlib.redirect_stdout(f):
                yield log_file
        finally:
            warnings.showwarning = saved_showwarning
            f.flush()
            if saved_fd is not None:
                os.dup2(saved_fd, 1)
                os.close(saved_fd)
            root.removeHandler(handler)
            handler.close()
            for h, level in saved_handler_levels:
                h.setLevel(level)
            for lg, level in saved_levels:
                lg.setLevel(level)


def _warnings_for_the_log(log, console_showwarning):
    """A ``warnings.showwarning`` that writes what a user cannot act on to ``log``, the rest as before.

    To the log: deprecation notices of the libraries (``DeprecationWarning``, ``FutureWarning``:
    torch, MONAI, nnU-Net) and what nnU-Net's own code warns about (e.g. its pseudo Dice dividing
    by zero for a structure absent from a validation batch). This package's warnings, and any other,
    stay on the console.
    """

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, (DeprecationWarning, FutureWarning)) or f"{os.sep}nnunetv2{os.sep}" in str(filename):
            log.write(warnings.formatwarning(message, category, filename, lineno, line))
        else:
            console_showwarning(message, category, filename, lineno, file, line)

    return showwarning


@dataclass
class Stage:
    """One stage of a :class:`StageConsole`; set ``figures`` (a short text) before the stage ends."""

    index: int
    total: int
    title: str
    log_file: Path | None
    figures: str = ""
    seconds: float = float("nan")
    extra: list[str] = field(default_factory=list)

    def line(self, width: int = 28) -> str:
        """``[3/8] pretrain sag   41.2 s  loss 0.52 -> 0.31   log: ...``."""
        parts = [f"[{self.index}/{self.total}] {self.title:<{width}} {self.seconds:7.1f} s"]
        if self.figures:
            parts.append(self.figures)
        if self.log_file is not None:
            parts.append(f"log: {self.log_file}")
        return "   ".join(parts)


class StageConsole:
    """Stages with their equivalent commands, times and figures; nnU-Net's output in one log file per stage.

    Args:
        log_dir: folder of the stage log files (``NN_<slug>.log``).
        total: number of stages (for ``[k/N]``).
        verbose: show everything on the console as nnU-Net prints it (no log files).
        write: where the lines go (default: ``print`` to the current ``sys.stdout``, flushed).
    """

    def __init__(self, log_dir: Path, total: int, verbose: bool = False,
                 write: Callable[[str], None] | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.total = int(total)
        self.verbose = bool(verbose)
        self._write = write or (lambda text: print(text, flush=True))
        self.stages: list[Stage] = []

    def say(self, text: str = "") -> None:
        """A line on the console (outside stages)."""
        self._write(text)

    @contextlib.contextmanager
    def stage(self, title: str, commands: Sequence[str] = ()) -> Iterator[Stage]:
        """Run one stage: print its commands, send its output to its log file, print its line at the end."""
        index = len(self.stages) + 1
        slug = "".join(c if c.isalnum() else "_" for c in title.lower()).strip("_")
        log_file = None if self.verbose else self.log_dir / f"{index:02d}_{slug}.log"
        stage = Stage(index, self.total, title, log_file)
        self.stages.append(stage)
        for command in commands:
            self._write(f"      $ {command}")
        start = time.perf_counter()
        try:
            with output_to_log(log_file):
                yield stage
        except BaseException:
            stage.seconds = time.perf_counter() - start
            stage.figures = "FAILED"
            self._write(stage.line())
            raise
        stage.seconds = time.perf_counter() - start
        self._write(stage.line())
        for text in stage.extra:
            self._write(f"      {text}")
