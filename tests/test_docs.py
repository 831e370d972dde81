"""The user's pages: README.md stays short; it, BENCHMARKS.md and docs/*.md hold no dead relative
link, image or #anchor; every node and every node input is documented in docs/nodes.md, every
template is named in the README's first-run table and in docs/workflows.md and has its thumbnail.

Anchors follow GitHub's rule for heading ids (lower case; letters, digits, '-' and '_' kept,
other punctuation dropped, each space a '-'; a repeated heading gets -1, -2, ...)."""
import re
from pathlib import Path

import pytest

from conftest import REPO, siso

README_MAX_LINES = 210
PAGES = [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_REF = re.compile(r"<(?:img|a|source)\b[^>]*?\b(?:src|href)\s*=\s*[\"']([^\"']+)[\"']", re.I)
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)[ \t#]*$", re.M)
HTML_ID = re.compile(r"<a\s+(?:name|id)\s*=\s*[\"']([^\"']+)[\"']", re.I)


def prose(text: str) -> str:
    """The page without fenced code blocks and inline code spans (no links live there)."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)   # a link's text only
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set:
    found, seen = set(), {}
    for match in HEADING.finditer(FENCE.sub("", text)):
        base = slug(match.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found | set(HTML_ID.findall(text))


def dead_links(page: Path, text: str, repo: Path) -> list:
    """(target, why) for every relative link, image or anchor of a page that does not resolve."""
    dead = []
    body = prose(text)
    for target in LINK.findall(body) + HTML_REF.findall(body):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):   # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        if repo.resolve() not in (resolved, *resolved.parents):
            dead.append((target, "points outside the repository"))
            continue
        if not resolved.exists():
            dead.append((target, f"no such file: {resolved.relative_to(repo.resolve())}"))
            continue
        if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved.read_text()):
            dead.append((target, f"no heading with the anchor #{anchor} in {resolved.name}"))
    return dead


def test_the_link_checker_finds_a_dead_link_image_and_anchor(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## What `x` refuses, and when\n\n## Twice\n\n## Twice\n")
    (tmp_path / "pic.png").write_bytes(b"")
    page = tmp_path / "README.md"
    page.write_text(
        "[ok](docs/a.md#what-x-refuses-and-when) [ok](docs/a.md#twice-1) ![ok](pic.png) [ok](#top)\n"
        "[web](https://example.com/none.md#nothing) `[in code](missing.md)`\n"
        "```\n[in a block](missing.md)\n```\n"
        "# Top\n"
        "[gone](docs/b.md) ![gone](docs/pic.png) [bad anchor](docs/a.md#twice-2) [up](../outside.md)\n"
        '<img src="docs/none.png">\n')
    dead = [target for target, _ in dead_links(page, page.read_text(), tmp_path)]
    assert dead == ["docs/b.md", "docs/pic.png", "docs/a.md#twice-2", "../outside.md", "docs/none.png"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_image_and_anchor_resolves(page):
    dead = dead_links(page, page.read_text(), REPO)
    assert not dead, f"{page.relative_to(REPO)}: " + "; ".join(f"{t} ({why})" for t, why in dead)


def test_the_readme_stays_short():
    lines = len((REPO / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}): it is the ComfyUI user's first page; "
        "move the detail into docs/ and link to it")


def node_sections() -> dict:
    """docs/nodes.md's sections by heading: '## <display name>' up to the next '## '."""
    text = FENCE.sub("", (REPO / "docs" / "nodes.md").read_text())
    parts = re.split(r"^## +(.+?)\s*$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def documented_inputs(section: str) -> set:
    """The names in the first column of the section's input tables (| a, b | default | meaning |)."""
    names = set()
    for table in re.findall(r"^\| *input *\|.*\n\|[-| :]+\|\n((?:\|.*\n?)*)", section, re.M):
        for row in table.splitlines():
            first = row.strip().strip("|").split("|")[0]
            names |= {n.strip(" `") for n in first.split(",")}
    return names


def test_every_node_and_every_input_is_documented():
    sections = node_sections()
    readme = (REPO / "README.md").read_text()
    for cls in siso("nodes").NODES:
        schema = cls.define_schema()
        name = schema.display_name
        assert name in sections, f"docs/nodes.md has no '## {name}' section for node {schema.node_id}"
        missing = [i.id for i in schema.inputs if i.id not in documented_inputs(sections[name])]
        assert not missing, f"docs/nodes.md, '## {name}': no input-table row for {missing}"
        assert f"[{name}](docs/nodes.md#{slug(name)})" in readme, f"README.md's node list has no line for {name}"


def test_every_template_is_named_in_the_readme_and_docs_workflows():
    readme = (REPO / "README.md").read_text()
    workflows = (REPO / "docs" / "workflows.md").read_text()
    for template in sorted((REPO / "example_workflows").glob("*.json")):
        word = f"`{template.stem}`"
        assert word in readme, f"README.md's first-run table does not name the template {template.stem}"
        assert word in workflows, f"docs/workflows.md does not name the template {template.stem}"


def test_every_template_has_its_thumbnail():
    """ComfyUI's template browser shows example_workflows/<name>.jpg on the template's card; the
    browser tests take them (`make screenshots`) for each template they open."""
    templates = {path.stem for path in (REPO / "example_workflows").glob("*.json")}
    thumbnails = {path.stem for path in (REPO / "example_workflows").glob("*.jpg")}
    assert templates - thumbnails == set(), f"templates without a thumbnail (make screenshots): {sorted(templates - thumbnails)}"
    assert thumbnails - templates == set(), f"thumbnails of no template: {sorted(thumbnails - templates)}"
    for name in sorted(templates):
        head = (REPO / "example_workflows" / f"{name}.jpg").read_bytes()[:3]
        assert head == b"\xff\xd8\xff", f"example_workflows/{name}.jpg is not a JPEG file"
