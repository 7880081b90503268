import pytest

from hq_jax import data


def test_clean_wiki_strips_tags_unescapes_and_drops_stubs():
  raw = ('<doc id="1" url="u" title="A">\nA\n\nBody &amp; more.\n\n</doc>\n'
         '<doc id="2" url="u" title="Stub">\nStub\n\n</doc>\n'
         '<doc id="3" url="u" title="B">\nB\n\nx &lt; y\n</doc>\n')
  assert data.clean_wiki(raw) == ["A\n\nBody & more.", "B\n\nx < y"]


def test_missing_text_names_the_command(tmp_path, monkeypatch):
  monkeypatch.setenv("HQ_JAX_CACHE", str(tmp_path))
  with pytest.raises(data.DataMissingError, match=r"-m hq_jax.data fetch"):
    data.wiki_text()


def test_cached_wiki_text_is_real(tmp_path):
  articles = data.wiki_articles()  # `make test` fetches it first.
  assert len(articles) == 1095
  assert articles[0].startswith("2007 European Parliament election in Romania")


def test_read_text_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data.read_text(str(tmp_path / "nope.txt"))
  (tmp_path / "empty.txt").write_text("  \n")
  with pytest.raises(ValueError, match="is empty"):
    data.read_text(str(tmp_path / "empty.txt"))


def test_non_utf8_text_file_is_named(tmp_path):
  """Issue 14 defect 8: a non-UTF-8 --text_file raised without naming the file."""
  path = tmp_path / "latin1.txt"
  path.write_bytes("café".encode("latin-1") * 10)
  with pytest.raises(ValueError, match=rf"--text_file '{path}' is not UTF-8 text"):
    data.read_text(str(path))
