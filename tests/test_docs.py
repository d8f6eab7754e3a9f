"""The documentation site: built with `mkdocs build --strict` (every internal link and
anchor resolves), no broken link in the built pages, the README a front page whose
links land on pages, and the config reference generated from the schema."""
from __future__ import annotations

import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlparse

from pydantic import Field

from orchestrator.config import EnsembleConfig
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "docs" / "hooks"))
import config_reference  # noqa: E402


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if key in ("href", "src") and value:
                self.links.append(value)


def test_the_site_builds_strict_and_no_page_links_nowhere(tmp_path):
    site = tmp_path / "site"
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (site / "reference" / "index.html").exists()  # the generated config reference
    broken = []
    for page in site.rglob("*.html"):
        parser = Links()
        parser.feed(page.read_text())
        for link in parser.links:
            url = urlparse(link)
            if url.scheme or link.startswith(("#", "mailto:")) or not url.path:
                continue
            base = site if url.path.startswith("/") else page.parent  # 404.html links from the site's root
            target = (base / url.path.lstrip("/")).resolve()
            if not (target.exists() or (target / "index.html").exists()):
                broken.append(f"{page.relative_to(site)} -> {link}")
    assert not broken, "\n".join(broken)


def test_the_readme_is_a_front_page_whose_links_land():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert text.index("bash infra/local/setup.sh && .venv/bin/python jobs/train_ensemble.py") < 1000
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        assert (ROOT / target).exists(), target
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)", text))
    assert pages - {"index.md"} <= linked | {"reference.md"}, pages - linked  # every page reachable from the front


def test_the_config_reference_lists_every_field_of_the_schema():
    text = config_reference.render()
    for model in config_reference.reachable(EnsembleConfig):
        section = text.split(f"\n## {model.__name__}\n", 1)[1].split("\n## ", 1)[0]
        for name in model.model_fields:
            assert f"| `{name}` |" in section, (model.__name__, name)
    assert "| `minival` | int \\| NoneType |" in text  # with its type


def test_a_field_added_to_the_schema_appears_without_editing_a_page():
    class Extended(EnsembleConfig):
        new_knob: int = Field(3, description="a knob added later")

    assert "| `new_knob` | int | `3` | a knob added later |" in config_reference.render(Extended)
