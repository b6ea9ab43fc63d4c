"""A parallel corpus's splits as streams of sentence-pair chunks, with content fingerprints.

A :class:`PairSource` is what the token cache (:mod:`resnorm_jax.tasks.translation.cache`)
reads a split through, never holding it whole as Python strings: pairs in memory (the toy
language), plain text files (one sentence per line, one file per side) or a prepared TFDS
data set (its ArrayRecord data source).  Each translation data set builds its sources in
its registry entry (:class:`resnorm_jax.tasks.translation.corpora.CorpusInfo`); the
fingerprint identifies the content, so that a cache made from other text is detected
(:func:`fingerprint_matches`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
from typing import Callable, Iterator

from etils import epath

from resnorm_jax.errors import ConfigError


@dataclasses.dataclass
class PairSource:
  """One split of a parallel corpus as a stream of (sources, targets) chunks.

  ``chunks(size)`` yields lists of at most ``size`` pairs in corpus order; ``fingerprint``
  identifies the content (see :func:`fingerprint_matches`); ``where`` names it in errors.
  """
  where: str
  size: int
  chunks: Callable[[int], Iterator[tuple[list[str], list[str]]]]
  fingerprint: dict


def _iter_lines(path: str) -> Iterator[str]:
  # Same normalization as corpora.read_lines (universal newlines, stripped).
  with epath.Path(path).open("r", encoding="utf-8") as f:
    for line in f:
      yield line.rstrip("\n").strip()


def _count_lines(path: str) -> int:
  return sum(1 for _ in _iter_lines(path))


def hash_file(path: str) -> str:
  """The BLAKE2b (16 bytes) of the file ``path``, read in blocks."""
  h = hashlib.blake2b(digest_size=16)
  with epath.Path(path).open("rb") as f:
    while block := f.read(1 << 22):
      h.update(block)
  return h.hexdigest()


def _stat(path: str) -> tuple[int, int]:
  st = os.stat(path) if "://" not in path else None
  if st is not None:
    return st.st_size, st.st_mtime_ns
  p = epath.Path(path)
  return p.stat().length, int(p.stat().mtime * 1e9)


def file_fingerprint(path: str, recorded: dict | None = None) -> dict:
  """{name, bytes, mtime_ns, blake2b}; the hash of ``recorded`` (an earlier fingerprint of
  the same name) is reused when size and modification time are unchanged."""
  size, mtime = _stat(path)
  name = os.path.basename(path)
  if recorded and recorded.get("name") == name and recorded.get("bytes") == size and \
      recorded.get("mtime_ns") == mtime:
    digest = recorded["blake2b"]
  else:
    digest = hash_file(path)
  return {"name": name, "bytes": size, "mtime_ns": mtime, "blake2b": digest}


def list_source(where: str, src: list[str], tgt: list[str], fingerprint: dict) -> PairSource:
  """A split held in memory (``src[i]`` translates to ``tgt[i]``)."""
  def chunks(size):
    for start in range(0, len(src), size):
      yield src[start:start + size], tgt[start:start + size]
  return PairSource(where, len(src), chunks, fingerprint)


def plain_files_source(directory: str, split: str, langs: tuple[str, str],
                       recorded: dict | None) -> PairSource:
  """``<directory>/<split>.<lang>`` for the two languages, line i of each a pair; the files
  are fingerprinted (hashed only when new or changed since ``recorded``), not read."""
  paths = [os.path.join(directory, f"{split}.{lang}") for lang in langs]
  where = os.path.join(directory, f"{split}.{{{','.join(langs)}}}")
  old = (recorded or {}).get("files", [None, None])
  files = [file_fingerprint(p, o) for p, o in zip(paths, old)]

  def chunks(size):
    src_lines, tgt_lines = (_iter_lines(p) for p in paths)
    while True:
      src = list(itertools.islice(src_lines, size))
      tgt = list(itertools.islice(tgt_lines, size))
      if len(src) != len(tgt):
        raise ConfigError(f"{where}: the two sides have different line counts; the files "
                          "are corrupt or do not belong together (fix or replace them)")
      if not src:
        return
      yield src, tgt
  return PairSource(where, -1, chunks, {"kind": "files", "files": files})


def sized(source: PairSource) -> PairSource:
  """Counts the pairs of a file source (one pass) and checks both sides agree."""
  if source.size >= 0:
    return source
  counts = [_count_lines(os.path.join(os.path.dirname(source.where), f["name"]))
            for f in source.fingerprint["files"]]
  if counts[0] != counts[1]:
    raise ConfigError(f"{source.where}: {counts[0]} source lines but {counts[1]} target "
                      "lines; the files are corrupt or do not belong together (fix or "
                      "replace them)")
  source.size = counts[0]
  return source


def tfds_sources(version_dir: str, name: str, source_lang: str,
                 target_lang: str) -> dict[str, PairSource] | None:
  """{"train", "test"} of the prepared TFDS data set ``name`` in ``version_dir``, or None
  when its reader cannot open it (the caller phrases the error)."""
  import tensorflow_datasets as tfds
  try:
    builder = tfds.builder_from_directory(version_dir)
    data = {s: builder.as_data_source(split=s) for s in ("train", "test")}
  except Exception:  # pylint: disable=broad-except  (its reader's message)
    return None
  info = epath.Path(version_dir, "dataset_info.json").read_bytes()
  files = sorted((p.name, p.stat().length) for p in epath.Path(version_dir).iterdir()
                 if p.is_file())
  decode = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)
  out = {}
  for split, ds in data.items():
    def chunks(size, ds=ds):
      for start in range(0, len(ds), size):
        rows = ds.__getitems__(list(range(start, min(start + size, len(ds)))))
        yield [decode(r[source_lang]) for r in rows], [decode(r[target_lang]) for r in rows]
    out[split] = PairSource(f"{version_dir} ({split})", len(ds), chunks, {
        "kind": "tfds", "name": name, "dataset_info": hashlib.sha256(info).hexdigest(),
        "files": [list(f) for f in files]})
  return out


def fingerprint_matches(a: dict | None, b: dict | None) -> bool:
  """Same corpus content: file names, sizes and hashes (not paths or times) agree."""
  if not a or not b or a.get("kind") != b.get("kind"):
    return False
  if a["kind"] == "files":
    strip = lambda fp: [(f["name"], f["bytes"], f["blake2b"]) for f in fp["files"]]
    return strip(a) == strip(b)
  return a == b
