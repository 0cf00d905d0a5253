"""Runs a command and reports the peak resident memory of its whole process tree.

The test suite spawns processes (a CLI run, a notebook kernel, backend renders), so
the figure that decides whether it fits a 16 GB laptop is the sum of the resident
sets of the command and all its descendants at the same moment, sampled here every
`--interval` seconds with psutil. The command's exit status is passed through.

A resident set counts the pages a process shares with others (TensorFlow's libraries,
mapped by every process that imports it) in full, so with many such processes the sum
overstates what the machine holds; `--pss` also sums the proportional set sizes (each
shared page split between its processes: the memory the tree takes from the machine).

    python benchmarks/peak_memory.py [--interval 0.5] [--log FILE] [--pss] -- python -m pytest
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import psutil


def tree_memory(root: psutil.Process, pss: bool = False) -> tuple:
    """(resident bytes, proportional bytes or 0) of `root` and every live descendant."""
    rss = prop = 0
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    for proc in procs:
        try:
            if pss:
                info = proc.memory_full_info()
                rss, prop = rss + info.rss, prop + info.pss
            else:
                rss += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return rss, prop


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between samples (default: 0.5)")
    parser.add_argument("--log", default=None, help="also append 'seconds GiB' samples to this file")
    parser.add_argument("--pss", action="store_true", help="also report the proportional set size (Linux)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give a command after --")
    start = time.perf_counter()
    child = subprocess.Popen(command)
    root = psutil.Process(child.pid)
    peak, peak_at, peak_pss, pss_at = 0, 0.0, 0, 0.0
    log = open(args.log, "a") if args.log else None
    try:
        while child.poll() is None:
            rss, pss = tree_memory(root, args.pss)
            now = time.perf_counter() - start
            if rss > peak:
                peak, peak_at = rss, now
            if pss > peak_pss:
                peak_pss, pss_at = pss, now
            if log:
                log.write(f"{now:.1f} {rss / 2**30:.3f}" + (f" {pss / 2**30:.3f}" if args.pss else "") + "\n")
                log.flush()
            time.sleep(args.interval)
    except KeyboardInterrupt:
        child.terminate()
    finally:
        if log:
            log.close()
    wall = time.perf_counter() - start
    print(f"peak_memory: {peak / 2**30:.2f} GiB resident (process tree) at {peak_at:.0f} s; "
          + (f"{peak_pss / 2**30:.2f} GiB proportional (shared pages split) at {pss_at:.0f} s; " if args.pss else "")
          + f"wall {wall:.0f} s; exit {child.returncode}", file=sys.stderr)
    return child.returncode


if __name__ == "__main__":
    sys.exit(main())
