"""Regenerate docs/api/ from mnn's docstrings with lazydocs: ``python docs/generate.py``."""
import re
import shutil
import sys
from pathlib import Path

from lazydocs import generate_docs

API = Path(__file__).resolve().parent / "api"


def generate(output=API):
    """Write one markdown page per module of mnn (classes, methods, signatures, docstrings) to ``output``."""
    output = Path(output)
    if output.exists():
        shutil.rmtree(output)
    generate_docs(["mnn"], output_path=str(output), src_base_url="../../", overview_file="README.md",
                  watermark=False, remove_package_prefix=False)
    for page in output.glob("*.md"):
        page.write_text(without_sourceless_links(page.read_text()))
    return output


def without_sourceless_links(page):
    """Drop the "source" badges lazydocs links to ``<string>``: code it generated (a dataclass's
    ``__init__``) has no file to point at."""
    return re.sub(r'<a href="\.\./\.\./<string>">.*?</a>\n', "", page)


if __name__ == "__main__":
    print(f"wrote {generate(sys.argv[1] if len(sys.argv) > 1 else API)}")
