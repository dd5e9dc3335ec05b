"""docs/method.md: the anchors that docstrings cite exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "method.md"


def _anchors():
    """GitHub's anchors of the document's headings: lower case, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", METHOD.read_text(), re.M)
    return {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in headings}


def test_every_cited_anchor_is_a_heading():
    anchors = _anchors()
    sources = [*ROOT.glob("pyro_bc/**/*.py"), *ROOT.glob("models/*.py"), ROOT / "README.md"]
    sources += [*ROOT.glob("docs/*.md")]
    cited = {}
    for path in sources:
        for anchor in re.findall(r"method\.md#([\w-]+)", path.read_text()):
            cited.setdefault(anchor, path.relative_to(ROOT))
        if path == METHOD:
            for anchor in re.findall(r"\]\(#([\w-]+)\)", path.read_text()):
                cited.setdefault(anchor, "docs/method.md")
    missing = {anchor: str(path) for anchor, path in cited.items() if anchor not in anchors}
    assert not missing, f"anchors cited but not headings of docs/method.md: {missing}"
    assert {"pruning", "thresholds", "bit-widths", "predictive-uncertainty"} <= set(cited)


def test_display_math_is_closed():
    text = re.sub(r"```.*?```", "", METHOD.read_text(), flags=re.S)
    assert text.count("$$") % 2 == 0
    inline = re.sub(r"\$\$.*?\$\$", "", text, flags=re.S)
    for paragraph in inline.split("\n\n"):
        assert paragraph.count("$") % 2 == 0, paragraph[:80]
