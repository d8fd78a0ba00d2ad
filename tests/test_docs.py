"""The reference pages are current, every layer's page carries its derivation, and the guide runs."""
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mnn

ROOT = Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "api"
BASES = {"Layer", "LossLayer", "CompositeLayer"}


def test_docs_are_current(tmp_path):
    # a subprocess: lazydocs re-imports mnn's modules, which would split class identities here
    subprocess.run([sys.executable, str(ROOT / "docs" / "generate.py"), str(tmp_path / "api")], check=True,
                   capture_output=True)
    fresh = tmp_path / "api"
    names = sorted(p.name for p in fresh.iterdir())
    assert names == sorted(p.name for p in API.iterdir()), "docs/api is out of date: run python docs/generate.py"
    for name in names:
        assert (fresh / name).read_text() == (API / name).read_text(), \
            f"docs/api/{name} is out of date: run python docs/generate.py"


def class_section(name):
    module = inspect.getmodule(getattr(mnn, name)).__name__
    page = (API / f"{module}.md").read_text()
    start = page.index(f"## <kbd>class</kbd> `{name}`")
    end = page.find("## <kbd>class</kbd>", start + 1)
    return page[start:end if end > 0 else None]


@pytest.mark.parametrize("name", [n for n in mnn.layers.__all__ if n not in BASES])
def test_every_layer_page_has_its_derivation(name):
    section = class_section(name)
    assert section.count("$$") >= 2, f"{name}: no display math on its page"
    assert section.count("$$") % 2 == 0, f"{name}: unbalanced $$"
    inline = section.replace("$$", "")
    assert inline.count("$") % 2 == 0, f"{name}: unbalanced $"
    for line in section.splitlines():
        if "$$" in line:
            assert line.lstrip().startswith("$$"), f"{name}: display math must start its own line: {line[:60]}"


def test_the_writing_a_layer_guide_runs():
    guide = (ROOT / "docs" / "writing-a-layer.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", guide, flags=re.S)
    assert len(blocks) == 7
    namespace = {}
    exec(compile("\n".join(blocks), "writing-a-layer.md", "exec"), namespace)


def test_readme_links_reach_pages_and_sections():
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(((?:docs/api|src)/[^)#]+)(?:#([^)]+))?\)", readme)
    assert len(links) > 20
    for path, anchor in links:
        assert (ROOT / path).exists(), path
        if anchor:
            kind, name = anchor.split("-", 1)
            headings = re.findall(rf"## <kbd>{kind}</kbd> `(\w+)`", (ROOT / path).read_text())
            assert name in [h.lower() for h in headings], f"{path}#{anchor}"


def heading_anchors(markdown):
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", markdown, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", ["README.md", "docs/performance.md"])
def test_links_between_the_guides_reach_files_and_headings(page):
    source = ROOT / page
    links = re.findall(r"\]\(([^)\s]*)\)", source.read_text())
    assert links, page
    for link in links:
        path, _, anchor = link.partition("#")
        if path.startswith("http") or (path.startswith("docs/api") or "/api/" in path) and anchor:
            continue  # the web, and the reference pages' <kbd> anchors, checked above
        target = (source.parent / path).resolve() if path else source
        assert target.exists(), f"{page}: {link} reaches no file"
        if anchor and target.suffix == ".md":
            assert anchor in heading_anchors(target.read_text()), f"{page}: {link} reaches no heading"


def test_the_readme_example_runs():
    readme = (ROOT / "README.md").read_text()
    example = re.search(r"## Ten lines\n\n```python\n(.*?)```", readme, flags=re.S).group(1)
    assert len(example.strip().splitlines()) <= 12
    exec(compile(example, "README.md", "exec"), {})
