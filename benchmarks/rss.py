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


def run_measured(cmd: list[str], *, cwd: Path | str | None = None, env: dict | None = None,
                 log_path: Path | None = None, interval: float = 0.2, echo: bool = True) -> Measurement:
    """Run cmd (stdout+stderr merged) and measure its memory; one child at a time."""
    t_start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    samples: list[tuple[float, int, int, int, int]] = []
    lines: list[tuple[float, int, int, str]] = []
    last = {"rss": 0, "anon": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss = anon = file_ = 0
            pids = descendants(proc.pid)
            for pid in pids:
                st = proc_status(pid)
                rss += st.get("VmRSS", 0)
                anon += st.get("RssAnon", 0)
                file_ += st.get("RssFile", 0)
            if rss:
                samples.append((time.monotonic() - t_start, rss, anon, file_, len(pids)))
                last["rss"], last["anon"] = rss, anon
            done.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    log = open(log_path, "w") if log_path else None
    assert proc.stdout is not None
    for text in proc.stdout:
        t = time.monotonic() - t_start
        # the RSS at this moment, not the last (up to `interval` old) sample
        rss = anon = 0
        for pid in descendants(proc.pid):
            st = proc_status(pid)
            rss += st.get("VmRSS", 0)
            anon += st.get("RssAnon", 0)
        lines.append((t, rss or last["rss"], anon or last["anon"], text.rstrip("\n")))
        if log:
            log.write(f"[{t:8.2f}s rss={rss / 1e9:6.2f}GB anon={anon / 1e9:6.2f}GB] {text}")
            log.flush()
        if echo:
            print(f"    [{t:7.1f}s rss {rss / 1e9:5.2f} GB] {text.rstrip()}", flush=True)
    _, status, rusage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t_start
    done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if log:
        log.close()
    return Measurement(
        cmd=cmd,
        returncode=proc.returncode,
        wall_s=wall,
        ru_maxrss_bytes=rusage.ru_maxrss * 1024,  # Linux reports KiB
        sampled_peak_tree_rss=max((s[1] for s in samples), default=0),
        sampled_peak_tree_anon=max((s[2] for s in samples), default=0),
        samples=samples,
        lines=lines,
        output="\n".join(line[3] for line in lines),
    )
