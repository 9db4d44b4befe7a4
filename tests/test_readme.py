"""The README and docs/ stay true: every ```python block runs as written, every relative link and
#anchor resolves, and the README stays a front door (at most 15,000 characters)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_LIMIT = 15_000


def _name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def _python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


BLOCKS = _python_blocks(README)
PAGE_BLOCKS = [(_name(page), i, block) for page in PAGES for i, block in enumerate(_python_blocks(page))]


def _prose(page: Path) -> list[str]:
    """The page's lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in page.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: link text kept, lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    anchors, seen = set(), {}
    for line in _prose(page):
        m = re.match(r"#{1,6} +(.*?) *#*$", line)
        if m:
            slug = _slug(m.group(1))
            anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _links(page: Path) -> list[str]:
    """Targets of the page's Markdown links (inline code and code blocks aside)."""
    prose = re.sub(r"`[^`\n]*`", "", "\n".join(_prose(page)))
    return re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose)


def test_the_readme_has_python_examples():
    assert BLOCKS


@pytest.mark.parametrize(
    ("page", "index", "block"), PAGE_BLOCKS, ids=[f"{page}-block{i + 1}" for page, i, _ in PAGE_BLOCKS]
)
def test_readme_python_block_runs(page, index, block):
    """Every ```python block of the README and of docs/*.md, by file and position."""
    exec(compile(block, f"{page} python block {index + 1}", "exec"), {})


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_relative_links_resolve(page):
    """Every relative link of the page names an existing file, and its #anchor a heading there."""
    broken = []
    for target in _links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, flags=re.I):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.name}")
    assert not broken, f"{_name(page)}: " + "; ".join(broken)


def test_the_link_check_sees_links_and_anchors():
    """The checks above are not vacuous: the README links to docs pages, and to headings in them."""
    links = _links(README)
    assert any(link.startswith("docs/") and "#" in link for link in links), links
    assert "the-two-commands" in _anchors(README)
    assert (
        _slug("Stage I for a pretrained MoE student: `padd seed`") == "stage-i-for-a-pretrained-moe-student-padd-seed"
    )


def test_the_readme_is_a_front_door():
    length = len(README.read_text())
    assert length <= README_LIMIT, f"README.md has {length} characters; move detail into docs/ (limit {README_LIMIT})"


def test_public_functions_are_at_the_package_top():
    """`padd.grade` is the function (its module is padd.grading), even after every module is imported."""
    import padd
    import padd.data  # noqa: F401  (imports the grading module)
    import padd.eval  # noqa: F401

    assert callable(padd.grade) and padd.grade(r"\boxed{2}", "2")
    for name in padd.__all__:
        assert getattr(padd, name) is not None
    with pytest.raises(AttributeError):
        padd.no_such_function  # noqa: B018
