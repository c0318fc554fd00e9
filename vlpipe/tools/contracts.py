"""`vlpipe contracts --write DIR` / `--check DIR`: the generated contract files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlpipe.shared.asyncapi import rendered

DEFAULT_DIR = Path("docs/contracts")


def stale_files(directory: Path) -> list[str]:
    """Generated files that are missing or differ from what the models produce now."""
    stale = []
    expected = rendered()
    for rel, text in expected.items():
        path = directory / rel
        if not path.exists() or path.read_text() != text:
            stale.append(rel)
    schema_dir = directory / "schemas"
    if schema_dir.exists():
        for path in schema_dir.glob("*.json"):
            if f"schemas/{path.name}" not in expected:
                stale.append(f"schemas/{path.name} (no longer generated)")
    return stale


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vlpipe contracts", description=__doc__)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", type=Path, nargs="?", const=DEFAULT_DIR, metavar="DIR")
    group.add_argument("--check", type=Path, nargs="?", const=DEFAULT_DIR, metavar="DIR")
    args = parser.parse_args(argv)
    if args.write:
        for rel, text in rendered().items():
            path = args.write / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        print(f"wrote {len(rendered())} files to {args.write}")
        return 0
    stale = stale_files(args.check)
    if stale:
        print("stale contract files (run `vlpipe contracts --write`):", *stale, sep="\n  ")
        return 1
    print("contract files are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
