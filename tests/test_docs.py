"""The docs site as `make docs` builds it (`mkdocs build --strict`, mkdocs.yml): a page per notebook, an API page per
module of catdog_nb, and every relative link of the built HTML, with its #anchor, resolving to a file of the site;
nbdev's Markdown copy of every page, where the `Docs:` URL of each module docstring and the links of llms.txt point;
and the workflow that publishes it (.github/workflows/docs.yml)."""
import ast
import os
import re
import subprocess
import sys
import tomllib
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml
from nbdev.config import nbpath2docurl

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODULES = sorted(p.stem for p in (ROOT / "catdog_nb").glob("*.py") if not p.stem.startswith("_"))
NOTEBOOKS = sorted(p.stem for p in (ROOT / "nbs").glob("*.ipynb"))
DOCS_URL = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Documentation"]  # nbdev's doc_host


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    "The site built into a temporary folder; run from another one, so that mkdocs-jupyter's cache starts empty."
    site, work = tmp_path_factory.mktemp("site"), tmp_path_factory.mktemp("work")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    build = subprocess.run([BIN / "mkdocs", "build", "--strict", "-f", ROOT / "mkdocs.yml", "-d", site],
                           cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    return site


def page(site: Path, url: str) -> Path:
    return site / url / "index.html"


def notebook_url(stem: str) -> str:
    return "" if stem == "index" else stem


def module_names(module: str) -> list[str]:
    """What the module's `__all__` lists (nbdev writes it from the exported cells) and defines on its own: a function,
    a class or a name assigned alone. Griffe, which reads the source for mkdocstrings, skips `A, B = 1, 2`."""
    tree = ast.parse((ROOT / "catdog_nb" / f"{module}.py").read_text())
    defined, listed = set(), []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)): defined.add(node.name)
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for target in targets:
            if isinstance(target, ast.Name): defined.add(target.id)
            if getattr(target, "id", None) == "__all__": listed = ast.literal_eval(node.value)
    return [name for name in listed if name in defined]


class Links(HTMLParser):
    "The ids of a page and its links (href and src)."
    def __init__(self):
        super().__init__()
        self.ids, self.links = set(), []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name == "id" and value: self.ids.add(value)
            if name in ("href", "src") and value: self.links.append(value)


def parse(path: Path) -> Links:
    links = Links()
    links.feed(path.read_text())
    return links


def test_every_notebook_is_a_page_with_its_stored_outputs(site):
    for stem in NOTEBOOKS:
        html = page(site, notebook_url(stem)).read_text()
        assert "jp-Notebook" in html, stem  # rendered by mkdocs-jupyter, not copied as a file
        assert "#| export" not in html and "default_exp" not in html, stem  # nbdev's directives are not shown
    # a stored output (not executed at build time): the table 00_core's `load_params()` cell printed
    assert "'val_fraction': 0.15" in page(site, "00_core").read_text()


def test_every_module_has_an_api_page_documenting_its_all(site):
    assert MODULES and "core" in MODULES
    index = parse(page(site, "api")).links
    for module in MODULES:
        ids = parse(page(site, f"api/{module}")).ids
        assert f"catdog_nb.{module}" in ids, module
        missing = [n for n in module_names(module) if f"catdog_nb.{module}.{n}" not in ids]
        assert not missing, f"catdog_nb.{module}: {missing}"
        assert f"{module}/" in index, module


def test_every_relative_link_resolves_in_the_site(site):
    pages = {path: parse(path) for path in site.rglob("*.html")}
    broken = []
    for path, links in pages.items():
        for link in links.links:
            url = urlsplit(link)
            if url.scheme or url.netloc or link.startswith("/"): continue  # not a link inside the site
            target = (path.parent / unquote(url.path)).resolve() if url.path else path
            if target.is_dir(): target = target / "index.html"
            if not target.is_file(): broken.append(f"{path.relative_to(site)}: {link}")
            elif url.fragment and target.suffix == ".html" and unquote(url.fragment) not in pages[target].ids:
                broken.append(f"{path.relative_to(site)}: {link} (no such anchor)")
    assert len(pages) >= len(NOTEBOOKS) + len(MODULES)
    assert not broken, "\n".join(broken[:50])


def site_file(site: Path, url: str) -> Path:
    "The file of the built site that a URL of the published site names."
    assert url.startswith(DOCS_URL), url
    return site / unquote(url.removeprefix(DOCS_URL))


def docs_url(module: str) -> str:
    "The URL that nbdev writes at the end of a module's docstring, `Docs: <url>`."
    doc = ast.get_docstring(ast.parse((ROOT / "catdog_nb" / f"{module}.py").read_text())) or ""
    found = re.search(r"^Docs: (\S+)\Z", doc, re.M)
    assert found, f"catdog_nb.{module}: no Docs: line at the end of its docstring"
    return found[1]


def test_the_site_is_published_where_nbdev_links_it():
    assert yaml.safe_load((ROOT / "mkdocs.yml").read_text())["site_url"] == DOCS_URL


def test_every_module_docs_url_is_the_markdown_of_its_notebook(site):
    for module in MODULES:
        markdown = site_file(site, docs_url(module))
        assert markdown.is_file(), f"catdog_nb.{module}: {docs_url(module)} is not in the site"
        text = markdown.read_text()
        assert text.startswith("# ") and "#|" not in text and "default_exp" not in text, markdown.name
        assert "![png]" not in text and "![jpeg]" not in text, markdown.name  # images only on the HTML page
    # a stored output, as on the page: the table 00_core's `load_params()` cell printed
    assert "'val_fraction': 0.15" in site_file(site, docs_url("core")).read_text()


def test_every_notebook_has_its_markdown_copy(site, monkeypatch):
    monkeypatch.chdir(ROOT)  # nbdev reads its settings from the pyproject.toml above the working directory
    for stem in NOTEBOOKS:
        assert site_file(site, nbpath2docurl(ROOT / "nbs" / f"{stem}.ipynb")).is_file(), stem


def test_llms_txt_is_in_the_site_and_its_links_resolve(site):
    llms = (site / "llms.txt").read_text()
    assert llms == (ROOT / "nbs" / "llms.txt").read_text()
    links = re.findall(r"\]\((\S+?\.html\.md)\)", llms)
    assert len(links) >= len(MODULES), links
    missing = [link for link in links if not site_file(site, link).is_file()]
    assert not missing, missing


WORKFLOW = ROOT / ".github" / "workflows" / "docs.yml"


@pytest.mark.parametrize("schema", ["vendor.github-workflows", "custom.github-workflows-require-timeout"])
def test_docs_workflow_matches_the_github_schema(schema):
    result = subprocess.run([BIN / "check-jsonschema", "--builtin-schema", schema, WORKFLOW], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_docs_workflow_builds_with_make_docs_and_deploys_with_least_privilege():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    build, deploy = workflow["jobs"]["build"], workflow["jobs"]["deploy"]
    assert workflow["permissions"] == {"contents": "read"}
    assert deploy["permissions"] == {"pages": "write", "id-token": "write"} and deploy["needs"] == "build"
    assert "write" not in build["permissions"].values()
    assert any(step.get("run") == "make docs" for step in build["steps"])
    uses = [step["uses"] for job in (build, deploy) for step in job["steps"] if "uses" in step]
    assert all(re.fullmatch(r"actions/[\w-]+@[0-9a-f]{40}", u) for u in uses), uses  # pinned to commits
    checkout = next(step for step in build["steps"] if step.get("uses", "").startswith("actions/checkout@"))
    assert checkout["with"]["persist-credentials"] is False
