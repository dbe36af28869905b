"""MkDocs hooks for the catdog site (mkdocs.yml `hooks:`).

- The API section: one page per module of `catdog_nb` (`::: catdog_nb.<module>`, rendered by mkdocstrings) and an
  index of them, generated at every build and appended to the nav, so that a new module has its page without an edit.
- The notebooks as nbdev shows them: cells marked `#| hide` or `#| default_exp` left out, and the `#|` directive lines
  taken off the code that is shown. mkdocs-jupyter renders these copies with their stored outputs; the notebooks in
  `nbs/` are only read.
- A notebook page's table of contents made from the headings of its markdown cells as rendered: mkdocs-jupyter's own
  leaves the inline code out of a heading's anchor, which then points nowhere (`#stage` for "Stage `split`"); and
  its relative links made site links: a notebook to its page (index.ipynb, the README's source, links them from the
  repository root: `nbs/00_core.ipynb`), another file of the repository to that file on GitHub.
- nbdev's plain-Markdown copy of every notebook page, `<name>.html.md` at the site root (`core.html.md` for
  `00_core.ipynb`), where the `Docs:` line of each module docstring and the links of `llms.txt` point: the same
  notebook as its page, stored outputs and all, but for images, which only the HTML page shows. MkDocs copies
  `nbs/llms.txt` to the site root as it does any other file of `docs_dir`.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import tempfile
from html import escape
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import nbformat
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files
from mkdocs.structure.toc import get_toc
from nbconvert import MarkdownExporter
from nbdev.config import nbpath2html
from traitlets.config import Config

PACKAGE = "catdog_nb"
API_DIR = "api"
HIDDEN_DIRECTIVES = {"hide", "default_exp"}  # nbdev shows neither cell in its docs
_DIRECTIVE = re.compile(r"^\s*#\|\s*([\w-]+)")


def api_modules(root: Path) -> list[str]:
    "The public modules of the package: every `catdog_nb/*.py` but `__init__` and `_modidx`."
    return sorted(p.stem for p in (root / PACKAGE).glob("*.py") if not p.stem.startswith("_"))


def module_summary(path: Path) -> str:
    "The first paragraph of a module's docstring, on one line."
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return " ".join(doc.split("\n\n")[0].split())


def api_index(root: Path) -> str:
    rows = [f"- [`{PACKAGE}.{m}`]({m}.md): {module_summary(root / PACKAGE / f'{m}.py')}" for m in api_modules(root)]
    return "# API\n\nThe modules of `catdog_nb`, each exported from its notebook.\n\n" + "\n".join(rows) + "\n"


def for_docs(nb: dict) -> dict:
    "The notebook without its hidden cells, and its code cells without their leading `#|` directive lines."
    cells = []
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            lines = "".join(cell["source"]).splitlines()
            n = next((i for i, line in enumerate(lines) if not _DIRECTIVE.match(line)), len(lines))
            if {_DIRECTIVE.match(line)[1] for line in lines[:n]} & HIDDEN_DIRECTIVES: continue
            cell = {**cell, "source": "\n".join(lines[n:])}
        cells.append(cell)
    return {**nb, "cells": cells}


def _root(config) -> Path:
    return Path(config.config_file_path).parent


def on_config(config):
    "Append the API section to the nav written in mkdocs.yml."
    pages = [{f"{PACKAGE}.{m}": f"{API_DIR}/{m}.md"} for m in api_modules(_root(config))]
    config.nav.append({"API": [f"{API_DIR}/index.md", *pages]})
    return config


_tmp: Path | None = None  # this build's notebook copies


@event_priority(100)  # before mkdocs-jupyter's on_files, which takes the .ipynb files as pages
def on_files(files: Files, config) -> Files:
    global _tmp
    _tmp = Path(tempfile.mkdtemp(prefix="catdog-docs-"))
    out = []
    for f in files:
        if f.src_uri.endswith(".ipynb"):
            copy = _tmp / f.src_uri
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_text(json.dumps(for_docs(json.loads(f.content_string))))
            # a File in the copies' folder, not File.generated: mkdocs-jupyter reads the notebook through src_dir
            f = File(f.src_uri, src_dir=str(_tmp), dest_dir=config.site_dir, use_directory_urls=config.use_directory_urls)
        out.append(f)
    root = _root(config)
    out.append(File.generated(config, f"{API_DIR}/index.md", content=api_index(root)))
    for m in api_modules(root):
        out.append(File.generated(config, f"{API_DIR}/{m}.md", content=f"::: {PACKAGE}.{m}\n"))
    return Files(out)


class _Headings(HTMLParser):
    "The headings of a rendered notebook's markdown cells (not of its outputs), as toc tokens: level, id, name."
    def __init__(self):
        super().__init__()
        self.divs, self.tokens, self.heading = [], [], None  # divs: is each open div an output area?

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "div": self.divs.append("jp-OutputArea" in (attrs.get("class") or ""))
        elif re.fullmatch(r"h[1-6]", tag) and attrs.get("id") and not any(self.divs):
            self.heading = {"level": int(tag[1]), "id": attrs["id"], "name": "", "children": []}
        elif tag == "a" and self.heading and "anchor-link" in (attrs.get("class") or ""):
            self.tokens.append(self.heading)  # the text ends where nbconvert's ¶ link starts
            self.heading = None

    def handle_endtag(self, tag):
        if tag == "div" and self.divs: self.divs.pop()

    def handle_data(self, data):
        if self.heading: self.heading["name"] += escape(data)


def notebook_toc(html: str) -> list[dict]:
    "Toc tokens nested by level, as Python-Markdown's toc extension gives them."
    parser, roots, open_ = _Headings(), [], []
    parser.feed(html)
    for token in parser.tokens:
        while open_ and open_[-1]["level"] >= token["level"]: open_.pop()
        (open_[-1]["children"] if open_ else roots).append(token)
        open_.append(token)
    return roots


_HREF = re.compile(r'href="([^"#:]+)(#[^"]*)?"')


def site_link(link: str, page, files: Files, config) -> str | None:
    "Where a notebook's relative link goes on the site, or None to leave it as it is."
    root = _root(config)
    docs = Path(config.docs_dir).relative_to(root).as_posix()
    notebook_dir = os.path.dirname(os.path.join(docs, page.file.src_uri))
    for src in (os.path.join(notebook_dir, link), link):  # paths in the repository: from the notebook, from its root
        src = os.path.normpath(unquote(src))
        if src.startswith(".."): continue
        if f := files.get_file_from_path(os.path.relpath(src, docs)):
            return f.url_relative_to(page.file)
        if (root / src).exists() and not (root / src).is_relative_to(config.docs_dir):
            return f"{config.repo_url.rstrip('/')}/blob/main/{src}"
    return None


def on_page_content(html: str, page, config, files: Files) -> str:
    if not page.file.src_uri.endswith(".ipynb"): return html
    page.toc = get_toc(notebook_toc(html))

    def relink(m):
        url = site_link(m[1], page, files, config)
        return f'href="{url}{m[2] or ""}"' if url else m[0]
    return _HREF.sub(relink, html)


def markdown_name(notebook: str | Path) -> str:
    "Where nbdev's `Docs:` URLs put a notebook's Markdown copy (nbdev.config.nbpath2docurl): `core.html.md`."
    return nbpath2html(notebook).as_posix() + ".md"


def for_markdown(nb: dict) -> dict:
    "The notebook as its Markdown copy shows it: no image outputs (text only), code fenced in its kernel's language."
    def is_image(output): return any(mime.startswith("image/") for mime in output.get("data", {}))
    language = nb["metadata"].get("kernelspec", {}).get("language", "python")
    return {**nb, "metadata": {"language_info": {"name": language}, **nb["metadata"]},
            "cells": [{**cell, "outputs": [o for o in cell["outputs"] if not is_image(o)]}
                      if cell["cell_type"] == "code" else cell for cell in nb["cells"]]}


def _remove_tmp(*_args, **_kwargs):
    if _tmp: shutil.rmtree(_tmp, ignore_errors=True)


def on_post_build(config):
    "Write the Markdown copy of every notebook, from the copies its page was rendered from, tag rules and all."
    tags = config.plugins["mkdocs-jupyter"].config["remove_tag_config"]
    exporter = MarkdownExporter(config=Config(TagRemovePreprocessor={k: set(v) for k, v in tags.items()}))
    for copy in _tmp.rglob("*.ipynb"):
        nb = nbformat.from_dict(for_markdown(nbformat.read(copy, as_version=4)))
        markdown = Path(config.site_dir) / markdown_name(copy.relative_to(_tmp))
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(exporter.from_notebook_node(nb)[0])
    _remove_tmp()


on_build_error = _remove_tmp
