"""Print a requirements list for a Docker image from pyproject.toml, the one place versions live.

    python docker/requirements.py pyproject.toml --cpu-torch          # every dependency; torch from the CPU index
    python docker/requirements.py pyproject.toml torch fastapi ...    # only the named dependencies

`--cpu-torch` turns the `torch==X` pin into `torch==X+cpu`, the CPU build on
https://download.pytorch.org/whl/cpu, so pip never fetches the multi-gigabyte CUDA build.
Standard library only: it runs in a bare python image before anything is installed.
"""

from __future__ import annotations

import argparse
import re
import sys

import tomllib


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def requirements(pyproject: str, names: list[str], cpu_torch: bool = False) -> list[str]:
    with open(pyproject, "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    by_name = {_name(d): d for d in deps}
    wanted = [n.lower().replace("_", "-") for n in names]
    missing = [n for n in wanted if n not in by_name]
    if missing:
        raise SystemExit(f"pyproject.toml does not list {', '.join(missing)}; add it there first")
    out = [by_name[n] for n in wanted] if wanted else list(deps)
    if cpu_torch:
        out = [re.sub(r"^torch==([\w.]+)$", r"torch==\1+cpu", d.strip()) for d in out]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pyproject")
    p.add_argument("names", nargs="*", help="dependencies to keep (default: all)")
    p.add_argument("--cpu-torch", action="store_true", help="pin the CPU build of torch")
    args = p.parse_args(argv)
    print("\n".join(requirements(args.pyproject, args.names, args.cpu_torch)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
