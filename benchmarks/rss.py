"""Peak-RSS measurement helpers for the benchmarks (Linux /proc only, no psutil needed).

`run_measured(cmd, ...)` runs one child process and returns:
- ru_maxrss of that child from os.wait4 (the kernel's peak RSS of the child or of the largest of
  its waited-for descendants), the reliable number;
- a timeline sampled every `interval` s of the RSS of the child's whole process tree, split into
  anonymous memory (RssAnon: heap, torch tensors) and file-backed pages (RssFile: mmapped files
  such as safetensors weights, shared libraries);
- every output line of the child with its time and the RSS at that moment (phase boundaries).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

_FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, RssShmem, VmHWM of a process in bytes ({} if it is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in _FIELDS:
                    out[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return {}
    return out


def descendants(pid: int) -> list[int]:
    """pid and all its live descendants (one scan of /proc)."""
    parent: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        # the command name (field 2) may contain spaces: parse after its closing parenthesis
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        parent[int(entry.name)] = ppid
    tree, frontier = [pid], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        tree += kids
        frontier += kids
    return tree


@dataclass
class Measurement:
    cmd: list[str]
    returncode: int
    wall_s: float
    ru_maxrss_bytes: int  # from os.wait4: peak RSS of the child (or its largest reaped descendant)
    sampled_peak_tree_rss: int  # max over samples of the summed RSS of the process tree
    sampled_peak_tree_anon: int  # max over samples of the summed RssAnon of the tree
    samples: list[tuple[float, int, int, int, int]] = field(default_factory=list)  # t, rss, anon, file, nproc
    lines: list[tuple[float, int, int, str]] = field(default_factory=list)  # t, rss, anon, text
    output: str = ""

    def peak_between(self, t0: float, t1: float) -> tuple[int, int]:
        """(max tree RSS, max tree RssAnon) sampled in [t0, t1]."""
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        return (max((s[1] for s in inside), default=0), max((s[2] for s in inside), default=0))


def tree_usage(pid: int) -> tuple[int, int, int, int]:
    """Summed VmRSS, RssAnon, RssFile of pid and its descendants, and how many processes that is."""
    rss = anon = file_ = 0
    pids = descendants(pid)
    for p in pids:
        st = proc_status(p)
        rss += st.get("VmRSS", 0)
        anon += st.get("RssAnon", 0)
        file_ += st.get("RssFile", 0)
    return rss, anon, file_, len(pids)


class TreeSampler:
    """Samples the RSS of a process tree every `interval` s in a background thread.

    Used for children that are not simply waited for (a model server), and by run_measured.
    """

    def __init__(self, pid: int, interval: float = 0.2, t_start: float | None = None) -> None:
        self.pid = pid
        self.interval = interval
        self.t_start = time.monotonic() if t_start is None else t_start
        self.samples: list[tuple[float, int, int, int, int]] = []  # t, rss, anon, file, nproc
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._done.is_set():
            rss, anon, file_, n = tree_usage(self.pid)
            if rss:
                self.samples.append((time.monotonic() - self.t_start, rss, anon, file_, n))
            self._done.wait(self.interval)

    def start(self) -> TreeSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    @property
    def last(self) -> tuple[int, int]:
        return (self.samples[-1][1], self.samples[-1][2]) if self.samples else (0, 0)

    @property
    def peak_rss(self) -> int:
        return max((s[1] for s in self.samples), default=0)

    @property
    def peak_anon(self) -> int:
        return max((s[2] for s in self.samples), default=0)


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
        rss, anon, _, _ = tree_usage(proc.pid)
        last_rss, last_anon = sampler.last
        lines.append((t, rss or last_rss, anon or last_anon, text.rstrip("\n")))
        if log:
            log.write(f"[{t:8.2f}s rss={rss / 1e9:6.2f}GB anon={anon / 1e9:6.2f}GB] {text}")
            log.flush()
        if echo:
            print(f"    [{t:7.1f}s rss {rss / 1e9:5.2f} GB] {text.rstrip()}", flush=True)
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
        output="\n".join(line[3] for line in lines),
    )
