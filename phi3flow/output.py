"""What a step prints where a person reads it later (a log file, a pipe, CI): third-party progress
bars off, or reduced to their last state where a library has no switch for them; a line per layer
merged; known-harmless log messages dropped. On a terminal the libraries print as they like (a bar
is one line that updates in place).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator
from typing import TextIO

from phi3flow import settings


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def quiet_progress_bars() -> None:
    """Turn off the progress bars that have a switch (settings.PROGRESS_BARS_OFF) unless stderr is a
    terminal. In the environment, so the steps main starts inherit it; before transformers and
    huggingface_hub are imported, which read it once. Values the user set win."""
    if is_terminal(sys.stderr):
        return
    for name, value in settings.PROGRESS_BARS_OFF.items():
        os.environ.setdefault(name, value)


TERMINAL_STYLE = re.compile(r"\x1b\[[0-9;]*m")  # ANSI colour and weight: "\x1b[94m" ... "\x1b[0m"


class LogLines(io.TextIOBase):
    """A text stream that passes complete lines to target: a line redrawn with carriage returns (a
    progress bar) as its last state, and a run of consecutive lines that match `merge` (a line per
    layer: "Reading layer 0" ... "Reading layer 31") as its first and last line, and terminal colour
    codes (MLflow's evaluation summary has them) left out. Nothing else is changed or held back."""

    def __init__(self, target: TextIO, merge: re.Pattern[str] | None = None, lock: threading.RLock | None = None):
        self.target, self.merge = target, merge
        self.peers: list[LogLines] = []  # the other streams of the same output (stdout for stderr)
        self._pending = ""  # the line being written
        self._redrawing = False  # the last write redrew the pending line ("\r...", no newline)
        self._last, self._count = "", 0  # the newest line of the current run of `merge` lines, and their number
        self._lock = lock or threading.RLock()  # libraries write from worker threads; shared with the peers

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # tqdm draws Unicode bars only on a stream that says it takes them
        return getattr(self.target, "encoding", None) or "utf-8"

    def fileno(self) -> int:
        return self.target.fileno()

    def write(self, text: str) -> int:
        with self._lock:
            if not text:
                return 0
            for peer in self.peers:  # a bar on the other stream is shown as far as it got, in order
                peer._end_redraw()
            if self._redrawing and text.strip() and not text.startswith(("\r", "\n")):
                self._end_redraw()  # a bar left without its newline (onnxruntime's quantizer): new text, new line
            self._redrawing = text.startswith("\r") and "\n" not in text
            *lines, self._pending = (self._pending + text).split("\n")
            for line in lines:
                self._line(line)
        return len(text)

    def flush(self) -> None:
        self.target.flush()

    def finish(self) -> None:
        """Write what is still held: an unfinished line and the end of a run."""
        with self._lock:
            if self._pending:
                self._line(self._pending)
                self._pending = ""
            self._end_run()
            self.target.flush()

    def _end_redraw(self) -> None:
        if self._redrawing and self._pending:
            self._line(self._pending)
            self._pending = ""
        self._redrawing = False

    def _line(self, line: str) -> None:
        if "\r" in line:
            line = line.rstrip("\r").rpartition("\r")[2].rstrip()  # tqdm pads a redraw with spaces
            if not line:  # a bar that erased itself
                return
        if self.merge is not None and self.merge.fullmatch(line):
            self._count += 1
            if self._count > 1:
                self._last = line
                return
        else:
            self._end_run()
        self._emit(line)

    def _end_run(self) -> None:
        if self._count > 1:
            left_out = self._count - 2
            self._emit(f"{self._last} ({left_out} alike lines left out)" if left_out else self._last)
        self._last, self._count = "", 0

    def _emit(self, line: str) -> None:
        self.target.write(TERMINAL_STYLE.sub("", line) + "\n")
        self.target.flush()


@contextlib.contextmanager
def bounded(merge: re.Pattern[str] | None = None) -> Iterator[None]:
    """While inside, sys.stdout and sys.stderr pass through LogLines where they are not a terminal.
    Output written to the file descriptors directly (C++ code), or by logging handlers made
    before, passes unchanged."""
    originals = {name: getattr(sys, name) for name in ("stdout", "stderr")}
    lock = threading.RLock()
    wrapped = {name: LogLines(stream, merge, lock) for name, stream in originals.items() if not is_terminal(stream)}
    for stream in wrapped.values():
        stream.peers = [peer for peer in wrapped.values() if peer is not stream]
    for name, stream in wrapped.items():
        setattr(sys, name, stream)
    try:
        yield
    finally:
        for name, stream in wrapped.items():
            setattr(sys, name, originals[name])
            stream.finish()


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def drop_log_message(logger_name: str, prefix: str) -> None:
    """Drop the records of one logger whose message starts with prefix (only those: the logger's
    other messages, and the same text from elsewhere, still show). Calling it again adds nothing."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _DropMessage) and f.prefix == prefix for f in logger.filters):
        logger.addFilter(_DropMessage(prefix))
