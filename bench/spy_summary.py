"""Summarize py-spy collapsed stacks (serve_bench --py-spy): samples per thread, and per thread the
functions with the most inclusive samples under a chosen root (default: every frame).

    python bench/spy_summary.py OUT/py_spy_c128.txt [--top 25] [--match model_host/]
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path


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
