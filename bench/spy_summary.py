"""py-spy for the server: `record` samples a process while a block runs (serve_bench --py-spy),
and the script summarizes the collapsed stacks: samples per thread, and per thread the functions
with the most inclusive samples (optionally only frames matching --match).

    python bench/spy_summary.py OUT/py_spy_c128.txt [--top 25] [--match model_host/]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import re
import signal
import subprocess
import sys
from pathlib import Path


@contextlib.contextmanager
def record(pid: int, out: Path | None, gil: bool = False):
    """py-spy samples the server process while the block runs (threads on a CPU; with `gil`, only
    the thread holding the GIL); collapsed stacks go to `out` (a line per stack: frames;... count)."""
    if out is None:
        yield
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    spy = subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--rate", "250", "--format", "raw", "--threads",
                            *(["--gil"] if gil else []), "--nonblocking", "--output", str(out), "--duration", "3600"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
        try:
            spy.wait(timeout=60)
        except subprocess.TimeoutExpired:
            spy.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--match", default="", help="count only frames whose text contains this")
    args = ap.parse_args()
    per_thread: collections.Counter = collections.Counter()
    incl: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    leaf: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in Path(args.file).read_text().splitlines():
        stack, _, n = line.rstrip().rpartition(" ")
        if not n.isdigit():
            continue
        frames = stack.split(";")
        thread = re.sub(r"\(\d+\)", "", frames[0]).strip()
        count = int(n)
        per_thread[thread] += count
        for f in set(frames[1:]):
            if args.match in f:
                incl[thread][f] += count
        leaf[thread][frames[-1]] += count
    total = sum(per_thread.values())
    for thread, n in per_thread.most_common():
        print(f"\n== {thread}: {n} samples ({n / total:.0%} of all)")
        print("  inclusive:")
        for f, c in incl[thread].most_common(args.top):
            print(f"  {c / n:6.1%}  {f}")
        print("  self:")
        for f, c in leaf[thread].most_common(12):
            print(f"  {c / n:6.1%}  {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
