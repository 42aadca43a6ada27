"""The documentation site builds strictly (no broken link or anchor, every page in the nav)
and reads offline: pages link to each other as .html files, and the Python API page is
generated from the docstrings."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    if shutil.which("mkdocs") is None and not (Path(sys.executable).parent / "mkdocs").exists():
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]')")
    out = tmp_path_factory.mktemp("site")
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def test_every_page_is_built_and_linked_as_a_file(site):
    pages = sorted(p.relative_to(REPO / "docs") for p in (REPO / "docs").rglob("*.md"))
    for page in pages:
        assert (site / page.with_suffix(".html")).is_file(), page
    index = (site / "index.html").read_text()
    assert 'href="concepts.html"' in index  # file:// browsing: no directory URLs


def test_the_api_page_documents_the_public_functions(site):
    api = (site / "reference" / "api.html").read_text()
    for name in ("profile", "allocate", "prune", "save_compact", "load_compact"):
        assert f'id="rdprune.api.{name}"' in api or f'id="rdprune.{name}"' in api, name


def test_readme_links_into_the_docs_resolve():
    import re

    text = (REPO / "README.md").read_text()
    links = re.findall(r"\]\((docs/[^)#]+)(?:#[^)]*)?\)", text)
    assert links, "the README links into the docs"
    for link in links:
        assert (REPO / link).is_file(), link


def test_the_params_page_renders_every_meaning_whole(site):
    """Pipes, braces and angle brackets of the generated table survive Markdown: no stray
    backslash, no example eaten as attributes, no text taken for an HTML tag."""
    page = (site / "reference" / "params.html").read_text()
    assert "\\|" not in page
    assert '&#123;"conv1": [0, 0]' in page  # allocate.limits' example
    assert "sqlite:///&lt;project root&gt;/mlflow.db" in page
