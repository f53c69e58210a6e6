"""The README is a front page a newcomer finishes, and every link in it and in docs/ lands: on a file
that exists and, for a `#anchor`, on a heading of that file, by GitHub's anchor rules."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SETUP = ("pip install torch==2.13.0 -r requirements.txt && python train_sft.py", "python -m pytest -q")


def prose(text: str) -> str:
    """The text with its fenced code blocks blanked (a `# comment` in a bash block is no heading,
    and `[x](y)` in code is no link), line numbers kept."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            lines.append("")
        else:
            lines.append("" if fenced else line)
    return "\n".join(lines)


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading's text: what it renders as (a link's text, code without its
    backticks, no emphasis marks), lower-cased, every character but letters, digits, spaces, hyphens
    and underscores dropped, then each space a hyphen."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").replace("*", "")
    return "".join(c for c in text.strip().lower() if c.isalnum() or c in " -_").replace(" ", "-")


def anchors(path: Path) -> set:
    """Every heading's anchor in a Markdown file; a repeated one gets -1, -2, ... as on GitHub."""
    seen, found = {}, set()
    for line in prose(path.read_text()).splitlines():
        match = re.match(r"#{1,6} (.*)", line)
        if match:
            slug = anchor(match.group(1))
            seen[slug] = seen.get(slug, -1) + 1
            found.add(slug if seen[slug] == 0 else f"{slug}-{seen[slug]}")
    return found


def links(path: Path) -> list:
    """The relative targets of a page's inline links, outside code; web addresses left out."""
    text = re.sub(r"`[^`\n]*(?:\n[^`\n]*)?`", "", prose(path.read_text()))  # code spans, one line break at most
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    return [t for t in targets if not re.match(r"[a-z]+:", t)]


def broken_links(path: Path) -> list:
    """The links of a page that land nowhere, each with what is wrong."""
    wrong = []
    for target in links(path):
        file, _, fragment = target.partition("#")
        where = (path.parent / file).resolve() if file else path
        if not where.exists():
            wrong.append(f"{path.name}: {target}: no file {where}")
        elif fragment and fragment not in anchors(where):
            wrong.append(f"{path.name}: {target}: no heading with that anchor in {where.name}")
    return wrong


def test_the_anchor_rules_are_githubs():
    """Anchors as GitHub gives them for these headings (read off github.com)."""
    assert anchor("Several GPUs, and models larger than one: `--fsdp`") == "several-gpus-and-models-larger-than-one---fsdp"
    assert anchor("DPO: the paper's Experiment 2 (PKU-SafeRLHF, Eq. 10)") == "dpo-the-papers-experiment-2-pku-saferlhf-eq-10"
    assert anchor("Rebuilding `demo/`") == "rebuilding-demo"
    assert anchor("The **method** in [the code](x.md)") == "the-method-in-the-code"
    assert anchor("snake_case stays") == "snake_case-stays"


def test_a_broken_link_or_a_missing_heading_is_caught(tmp_path):
    (tmp_path / "other.md").write_text("# Other\n\n## A part\n\n## A part\n")
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n[fine](other.md#a-part), [the second](other.md#a-part-1), [here](#page),\n"
                    "[gone](missing.md), [no such part](other.md#b-part), [web](https://example.com/x),\n"
                    "`[code](not-a-link.md)`\n\n```bash\n# not a heading\necho [x](nor-this.md)\n```\n")
    assert broken_links(page) == [
        f"page.md: missing.md: no file {tmp_path / 'missing.md'}",
        "page.md: other.md#b-part: no heading with that anchor in other.md"]


def test_every_link_in_the_readme_and_the_docs_lands():
    assert len(PAGES) > 5
    wrong = [problem for page in PAGES for problem in broken_links(page)]
    assert not wrong, "\n".join(wrong)


def test_every_docs_page_is_linked_from_the_front_page():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(ROOT / "README.md")}
    assert [p.name for p in PAGES[1:] if p.resolve() not in linked] == []


def test_the_front_page_is_short_and_opens_with_the_two_setup_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) < 300
    for command in SETUP:
        where = [i for i, line in enumerate(lines) if line.split("#")[0].strip() == command]
        assert where and where[0] < 60, command
