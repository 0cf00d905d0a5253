"""Runs a command and reports the peak resident memory of its whole process tree.

The test suite spawns processes (a CLI run, a notebook kernel, backend renders), so
the figure that decides whether it fits a 16 GB laptop is the sum of the resident
sets of the command and all its descendants at the same moment, sampled here every
`--interval` seconds with psutil. The command's exit status is passed through.

    python benchmarks/peak_memory.py [--interval 0.5] [--log FILE] -- python -m pytest
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import psutil


def tree_rss(root: psutil.Process) -> int:
    """Bytes resident in `root` and every live descendant."""
    total = 0
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between samples (default: 0.5)")
    parser.add_argument("--log", default=None, help="also append 'seconds GiB' samples to this file")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give a command after --")
    start = time.perf_counter()
    child = subprocess.Popen(command)
    root = psutil.Process(child.pid)
    peak, peak_at = 0, 0.0
    log = open(args.log, "a") if args.log else None
    try:
        while child.poll() is None:
            rss = tree_rss(root)
            now = time.perf_counter() - start
            if rss > peak:
                peak, peak_at = rss, now
            if log:
                log.write(f"{now:.1f} {rss / 2**30:.3f}\n")
                log.flush()
            time.sleep(args.interval)
    except KeyboardInterrupt:
        child.terminate()
    finally:
        if log:
            log.close()
    wall = time.perf_counter() - start
    print(f"peak_memory: {peak / 2**30:.2f} GiB resident (process tree) at {peak_at:.0f} s; "
          f"wall {wall:.0f} s; exit {child.returncode}", file=sys.stderr)
    return child.returncode


if __name__ == "__main__":
    sys.exit(main())
