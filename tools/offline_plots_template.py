"""Build .dvc/offline_plots.html: DVC's plots page template with Vega, Vega-Lite and
Vega-Embed inlined, so that `dvc plots show` / `dvc plots diff` draw every plot without
internet (DVC's default page loads them from a CDN and shows blank plots offline).

The versions are those dvc-render's page asks for. Their minified builds come from the npm
packages (BSD-3-Clause, https://vega.github.io):

    cd /tmp && npm pack vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2
    python tools/offline_plots_template.py /tmp

`.dvc/config` names the file (`plots.html_template`); it is committed, so users need neither
npm nor a network.
"""

from __future__ import annotations

import sys
import tarfile
from pathlib import Path

PACKAGES = {  # npm tarball -> the minified browser build inside it
    "vega-5.20.2.tgz": "package/build/vega.min.js",
    "vega-lite-5.2.0.tgz": "package/build/vega-lite.min.js",
    "vega-embed-6.18.2.tgz": "package/build/vega-embed.min.js",
}
OUT = Path(__file__).resolve().parents[1] / ".dvc" / "offline_plots.html"
PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- Vega 5.20.2, Vega-Lite 5.2.0, Vega-Embed 6.18.2 (BSD-3-Clause), inlined by
         tools/offline_plots_template.py: no network needed -->
SCRIPTS
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def main(folder: str) -> None:
    scripts = []
    for tarball, member in PACKAGES.items():
        with tarfile.open(Path(folder) / tarball) as tar:
            code = tar.extractfile(member).read().decode()
        for placeholder in ("{plot_divs}", "{scripts}", "{refresh_tag}", "</script"):
            if placeholder in code:  # dvc-render replaces the first three in the page
                raise SystemExit(f"{tarball}: contains {placeholder!r}")
        scripts.append(f'    <script type="text/javascript">\n{code}\n    </script>')
    OUT.write_text(PAGE.replace("SCRIPTS", "\n".join(scripts)))
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
