"""The docs keep one home for measured figures: docs/results.md (and the history in docs/log/).

A dated figure or a commit id in code, configs or the explanatory docs goes stale the day the
next run lands; the README stays a short front page; links between the docs resolve.
"""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Where dated figures and commit ids may not appear (results.md and log/ are their home).
UNDATED_DIRS = ("hq_jax", "pallas_kernels", "configs", "scripts")
UNDATED_DOCS = ("README.md", "docs/architecture.md", "docs/scripts.md", "docs/traces.md")

DATE = re.compile(r"20\d\d-\d\d-\d\d")
# A commit id: 7-40 hex characters, at least one a digit (so English words like "defaced" do
# not count), right before or after the word "commit" (optionally plural, a colon or brackets).
_HEX = r"(?=[0-9a-f]*\d)[0-9a-f]{7,40}"
COMMIT_ID = re.compile(rf"\bcommits?\b[\s:(`]*\b{_HEX}\b|\b{_HEX}\b[\s)`]*\bcommits?\b",
                       re.IGNORECASE)
MD_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
DOC_PATH = re.compile(r"\bdocs/[\w./-]+\.md\b")
# A link to a log file names its date; the link is not a dated figure.
LOG_FILE = re.compile(r"\blog/20\d\d-\d\d-\d\d[\w.-]*")


def _undated_files():
  files = [ROOT / name for name in UNDATED_DOCS]
  for folder in UNDATED_DIRS:
    files += sorted(p for p in (ROOT / folder).rglob("*")
                    if p.is_file() and p.suffix in (".py", ".md", ".sh", ".toml", ".txt"))
  return files


def _markdown_files():
  return [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md")) + sorted(
      (ROOT / "docs" / "log").glob("*.md"))


def test_readme_is_short():
  lines = (ROOT / "README.md").read_text().splitlines()
  assert len(lines) <= 150, f"README.md has {len(lines)} lines (at most 150): move detail to docs/"


def test_no_dated_figures_outside_results_and_log():
  found = []
  for path in _undated_files():
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
      line = LOG_FILE.sub("log/FILE", line)
      for pattern in (DATE, COMMIT_ID):
        m = pattern.search(line)
        if m:
          found.append(f"{path.relative_to(ROOT)}:{n}: {m.group(0)!r}")
  assert not found, ("dates and commit ids belong in docs/results.md or docs/log/:\n"
                     + "\n".join(found))


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
  broken = []
  for target in MD_LINK.findall(path.read_text()):
    if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
      continue  # a URL, mailto: or an anchor in the same file
    file_part = target.split("#", 1)[0]
    if not (path.parent / file_part).exists():
      broken.append(target)
  assert not broken, f"{path.relative_to(ROOT)} links to missing files: {broken}"


def test_named_docs_exist():
  """A `docs/NAME.md` named in the code, configs, tests, notebooks or docs exists (the log is
  history: it may name a file that has since gone)."""
  files = _undated_files() + [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md")) + sorted(
      (ROOT / "tests").glob("*.py")) + sorted((ROOT / "notebooks").glob("*.ipynb"))
  missing = []
  for path in files:
    if path.name == "test_docs.py":
      continue
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
      for name in DOC_PATH.findall(line):
        if not (ROOT / name).exists():
          missing.append(f"{path.relative_to(ROOT)}:{n}: {name}")
  assert not missing, "names a doc that does not exist:\n" + "\n".join(missing)
