"""Write the params reference (docs/reference/params.md) and the comments of params.yaml and
the presets from the config dataclasses' field docstrings; ``--check``: write nothing, exit 1
naming each file that disagrees (tests/test_params_reference.py runs the same comparison).

    python tools/params_reference.py [--check]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.config.reference import annotate, markdown

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "reference" / "params.md"


def expected() -> dict[Path, str]:
    """Each generated file's text as the dataclasses say it should be."""
    files = {PAGE: markdown()}
    for path in [ROOT / "params.yaml", *sorted((ROOT / "presets").glob("*.yaml"))]:
        files[path] = annotate(path.read_text())
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 on a difference")
    args = parser.parse_args()
    files = expected()
    stale = [p for p, text in files.items() if not p.is_file() or p.read_text() != text]
    for path in stale:
        if args.check:
            print(
                f"error: {path.relative_to(ROOT)} disagrees with the config dataclasses; run "
                f"python tools/params_reference.py",
                file=sys.stderr,
            )
        else:
            path.write_text(files[path])
            print(f"wrote {path.relative_to(ROOT)}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
