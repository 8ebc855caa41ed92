"""The README is the front page: its layout section names every runtime module in the folder it sits in, it
links every page of the manual, and every relative link of the README and the manual resolves."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vllm_stgridpool"
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _layout() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme[readme.index("## Layout") :]


def test_layout_names_every_runtime_module_under_its_folder():
    layout = _layout()
    for folder in [PACKAGE, *sorted(p for p in PACKAGE.iterdir() if (p / "__init__.py").exists())]:
        modules = sorted(p.name for p in folder.glob("*.py") if p.name != "__init__.py" or folder != PACKAGE)
        if folder.name == "compat":  # one module per ledger entry: the ledger lists them
            continue
        if folder != PACKAGE:
            assert f"`{folder.name}/`" in layout, f"the README's layout does not name {folder.name}/"
        for module in modules:
            if module == "__init__.py":
                continue
            assert f"`{module}`" in layout, f"the README's layout does not name {folder.name}/{module}"
    # and names nothing that is not there
    for named in re.findall(r"`([a-z_]+\.py)`", layout):
        folders = [PACKAGE, ROOT / "vllm_stgridpool_testing", ROOT / "examples", ROOT / "eval", ROOT / "benchmarks"]
        assert any(any(folder.rglob(named)) for folder in folders), (
            f"the README's layout names {named}, which does not exist")


def test_every_manual_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    pages = sorted((ROOT / "docs").glob("*.md"))
    assert len(pages) >= 7
    for page in pages:
        assert f"(docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"


def test_relative_links_resolve():
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in LINK.findall(doc.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            assert (doc.parent / target).exists(), f"{doc.relative_to(ROOT)} links {target}, which does not exist"
