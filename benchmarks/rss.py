"""Peak-RSS measurement of a process tree, with psutil.

`run_measured(cmd, ...)` runs one child process and returns:
- ru_maxrss of that child from os.wait4 (the kernel's peak RSS of the child or of the largest of
  its waited-for descendants), the reliable number;
- a timeline sampled every `interval` s of the RSS of the child's whole process tree, split into
  anonymous memory (heap, torch tensors) and shared pages (file-backed: mmapped files such as
  safetensors weights, shared libraries; and shared memory);
- every output line of the child with its time and the RSS at that moment (phase boundaries).

`TreeSampler` samples a process tree that is not simply waited for (a model server).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import psutil


class Usage(NamedTuple):
    """Summed memory of a process tree at one moment, in bytes."""

    rss: int
    anon: int  # RSS minus shared pages: what the processes allocated themselves
    shared: int  # file-backed and shared-memory pages (Linux: RssFile + RssShmem)
    nproc: int


def tree_usage(pid: int) -> Usage:
    """The summed RSS of pid and its live descendants (zeros if pid is gone)."""
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return Usage(0, 0, 0, 0)
    rss = shared = 0
    for proc in tree:
        try:
            mem = proc.memory_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):  # ended between the listing and now
            continue
        rss += mem.rss
        shared += mem.shared
    return Usage(rss, rss - shared, shared, len(tree))


Sample = tuple[float, int, int, int, int]  # t, rss, anon, shared, nproc


class TreeSampler:
    """Samples the RSS of a process tree every `interval` s in a background thread."""

    def __init__(self, pid: int, interval: float = 0.2, t_start: float | None = None) -> None:
        self.pid = pid
        self.interval = interval
        self.t_start = time.monotonic() if t_start is None else t_start
        self.samples: list[Sample] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._done.is_set():
            usage = tree_usage(self.pid)
            if usage.rss:
                self.samples.append((time.monotonic() - self.t_start, *usage))
            self._done.wait(self.interval)

    def start(self) -> TreeSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    @property
    def last(self) -> tuple[int, int]:
        """(RSS, anonymous RSS) of the latest sample."""
        return (self.samples[-1][1], self.samples[-1][2]) if self.samples else (0, 0)

    @property
    def peak_rss(self) -> int:
        return max((s[1] for s in self.samples), default=0)

    @property
    def peak_anon(self) -> int:
        return max((s[2] for s in self.samples), default=0)


@dataclass
class Measurement:
    cmd: list[str]
    returncode: int
    wall_s: float
    ru_maxrss_bytes: int  # from os.wait4: peak RSS of the child (or its largest reaped descendant)
    sampled_peak_tree_rss: int  # max over samples of the summed RSS of the process tree
    sampled_peak_tree_anon: int  # max over samples of the summed anonymous RSS of the tree
    samples: list[Sample] = field(default_factory=list)
    lines: list[tuple[float, int, int, str]] = field(default_factory=list)  # t, rss, anon, text

    @property
    def peak_bytes(self) -> int:
        """The larger of the two peaks: a child process shows in the tree's sum, not in ru_maxrss."""
        return max(self.ru_maxrss_bytes, self.sampled_peak_tree_rss)

    def peak_between(self, t0: float, t1: float) -> tuple[int, int]:
        """(max tree RSS, max tree anonymous RSS) sampled in [t0, t1]."""
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        return (max((s[1] for s in inside), default=0), max((s[2] for s in inside), default=0))


def run_measured(cmd: list[str], *, cwd: Path | str | None = None, env: dict | None = None,
                 log_path: Path | None = None, interval: float = 0.2, echo: bool = True) -> Measurement:
    """Run cmd (stdout+stderr merged) and measure its memory; one child at a time."""
    t_start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    sampler = TreeSampler(proc.pid, interval, t_start).start()
    lines: list[tuple[float, int, int, str]] = []
    log = open(log_path, "w") if log_path else None
    assert proc.stdout is not None
    for text in proc.stdout:
        t = time.monotonic() - t_start
        # the RSS at this moment, not the last (up to `interval` old) sample
        now = tree_usage(proc.pid)
        last_rss, last_anon = sampler.last
        lines.append((t, now.rss or last_rss, now.anon or last_anon, text.rstrip("\n")))
        if log:
            log.write(f"[{t:8.2f}s rss={now.rss / 1e9:6.2f}GB anon={now.anon / 1e9:6.2f}GB] {text}")
            log.flush()
        if echo:
            print(f"    [{t:7.1f}s rss {now.rss / 1e9:5.2f} GB] {text.rstrip()}", flush=True)
    _, status, rusage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t_start
    sampler.stop()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if log:
        log.close()
    return Measurement(
        cmd=cmd,
        returncode=proc.returncode,
        wall_s=wall,
        ru_maxrss_bytes=rusage.ru_maxrss * 1024,  # Linux reports KiB
        sampled_peak_tree_rss=sampler.peak_rss,
        sampled_peak_tree_anon=sampler.peak_anon,
        samples=sampler.samples,
        lines=lines,
    )
