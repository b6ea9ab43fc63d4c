"""The prepared token cache: tokenize a translation corpus once, memory-map it everywhere.

Preparation (process 0 only; the other processes wait, then read what it wrote):

1. the corpus is read as a stream (:class:`~resnorm_jax.tasks.translation.streams.PairSource`
   that the data set's registry entry builds: the IWSLT'15 plain files, a prepared TFDS data
   set or the toy language), never held whole as Python strings;
2. ``spm.model`` (unigram, shared vocabulary, :func:`corpora.train_sentencepiece`) is trained
   on a bounded, seeded random sample of ``translation.spm_sample_sentences`` training
   sentences (a random subset of pairs, both sides of each; the whole training text when it
   is smaller, in corpus order, as before this cache existed) and described by ``spm.json``
   (the corpus fingerprint it was trained on, the sample settings, its SHA-256);
3. every split is encoded (pieces + EOS, SentencePiece's C++ encoder on all cores, chunks of
   :data:`CHUNK` pairs, a progress bar on stderr) into flat little-endian int32 files, one
   per side, plus int64 offsets (``tokens/<split>.<side>.ids``, ``.offsets``); the sizes,
   BLAKE2b checksums and counts go into ``tokens/manifest.json``, keyed by the corpus
   fingerprint and the SHA-256 of ``spm.model``.  Files are written under temporary names
   and renamed; the manifest is written last, so a cache is complete or absent.

Later runs, restarts and the other hosts check the manifest against the corpus fingerprint
(file sizes and modification times; a file whose stat changed is hashed again, so a copy
with new times still matches) and ``spm.model``, check the token files' sizes and
checksums, and memory-map them (:class:`TokenSplit`): a batch reads only its rows.

What is checked, and what happens:

* token files missing, truncated or corrupted, or made with another ``spm.model``: rebuilt
  (the tokens are a function of the corpus and ``spm.model``; nothing else is touched);
* ``spm.model`` trained on another corpus (``spm.json``), or with other sample settings: a
  one-line :class:`ConfigError` naming the file and the fix (exit 2; checkpoints in that
  workdir were trained with that vocabulary, so nothing is deleted);
* source and target sides of a split with different line counts, or an empty split: a
  one-line error naming the files.

All file access goes through ``etils.epath`` (local paths here; gs:// later); memory
mapping is used where the path is local, a full read otherwise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import sys
import time

import numpy as np
from etils import epath

from resnorm_jax import storage
from resnorm_jax.errors import ConfigError
from resnorm_jax.tasks.translation import corpora
from resnorm_jax.tasks.translation.streams import (PairSource, fingerprint_matches, hash_file,
                                                   sized)

FORMAT = 1
CHUNK = 50_000            # pairs encoded per call
TOKENS_DIR = "tokens"
MANIFEST = "manifest.json"
SPM_FILE = "spm.model"
SPM_INFO = "spm.json"
SIDES = ("src", "tgt")


# ----------------------------------------------------------------------------------------
# The corpus as streams.
# ----------------------------------------------------------------------------------------
def corpus_sources(config, recorded: dict | None = None,
                   splits: tuple[str, ...] = ("train", "test")) -> dict[str, PairSource]:
  """{"train", "test"}: :class:`PairSource` of ``config.data.name`` without reading the
  text (its registry entry's :attr:`corpora.CorpusInfo.sources`).  ``recorded``: the
  fingerprints of an earlier preparation (its hashes are reused for unchanged files).
  ``splits``: the plain-file splits to fingerprint (the others are left out)."""
  return _corpus_info(config).sources(config, recorded or {}, splits)


def check_corpus_present(config) -> None:
  """The one-line error of a missing data set, without reading the corpus."""
  _corpus_info(config).check_present(config)


def _corpus_info(config) -> corpora.CorpusInfo:
  try:
    return corpora.TRANSLATION_DATASETS.info(config.data.name)
  except ConfigError as e:
    raise ConfigError(f"data.name: {e}") from None


# ----------------------------------------------------------------------------------------
# SentencePiece on a sample.
# ----------------------------------------------------------------------------------------
def sample_sentences(source: PairSource, sample: int, seed: int) -> list[str]:
  """At most ``sample`` training sentences: all of them (sources, then targets, in corpus
  order) when the corpus is that small, else both sides of ⌊sample/2⌋ pairs drawn without
  replacement by ``numpy.random.default_rng(seed)`` (in corpus order)."""
  source = sized(source)
  if 2 * source.size <= sample:
    src, tgt = [], []
    for s, t in source.chunks(CHUNK):
      src.extend(s)
      tgt.extend(t)
    return src + tgt
  chosen = np.sort(np.random.default_rng(seed).choice(source.size, sample // 2,
                                                      replace=False))
  src, tgt, start = [], [], 0
  for s, t in source.chunks(CHUNK):
    lo, hi = np.searchsorted(chosen, [start, start + len(s)])
    for i in chosen[lo:hi] - start:
      src.append(s[i])
      tgt.append(t[i])
    start += len(s)
  return src + tgt


def _sha256(path: epath.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_json(path: epath.Path, obj) -> None:
  storage.write_atomic(os.fspath(path), json.dumps(obj, indent=1, sort_keys=True))


def _read_json(path: epath.Path) -> dict | None:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def ensure_sentencepiece(directory: str, sources: dict[str, PairSource], config,
                         log=print) -> None:
  """``<directory>/spm.model`` (+ ``spm.json``): trained on a sample if absent, else checked
  against the corpus and the sample settings (a one-line error when it belongs to another)."""
  t = config.translation
  root = epath.Path(directory)
  model, info_path = root / SPM_FILE, root / SPM_INFO
  settings = {"vocab_size": config.model.vocab_size, "sample": t.spm_sample_sentences,
              "seed": t.spm_sample_seed}
  if model.exists():
    info = _read_json(info_path)
    if info is not None and not fingerprint_matches(info.get("corpus"),
                                                    sources["train"].fingerprint):
      raise ConfigError(
          f"{model} was trained on another corpus than data.name={config.data.name} in "
          f"data.data_dir={config.data.data_dir!r} ({info_path} records it); the corpus "
          "changed or the workdir belongs to another run: use a new --workdir (or "
          "translation.cache_dir), or restore the original corpus")
    if info is not None and info.get("settings", settings) != settings:
      raise ConfigError(
          f"{model} was trained with {json.dumps(info['settings'], sort_keys=True)}, not "
          f"{json.dumps(settings, sort_keys=True)}; use a new "
          "--workdir (or translation.cache_dir), or the settings it was trained with")
    if info is None:   # an spm.model from before the cache: keep it, record the corpus
      _write_json(info_path, {"corpus": sources["train"].fingerprint, "settings": settings,
                              "sha256": _sha256(model), "trained": "unknown"})
    return
  root.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  log(f"{model} absent: sampling at most {t.spm_sample_sentences:,} training sentences of "
      f"{sources['train'].where} for SentencePiece")
  sentences = sample_sentences(sources["train"], t.spm_sample_sentences, t.spm_sample_seed)
  log(f"training SentencePiece ({config.model.vocab_size} pieces) on {len(sentences):,} "
      f"sentences ({time.perf_counter() - t0:.0f} s so far; about a minute per 500k "
      "sentences on 2 cores)")
  tmp = root / "spm.tmp.model"
  corpora.train_sentencepiece(sentences, config.model.vocab_size, os.fspath(tmp),
                              num_threads=max(2, os.cpu_count() or 2))
  del sentences
  (root / "spm.tmp.vocab").unlink(missing_ok=True)
  tmp.replace(model)
  _write_json(info_path, {"corpus": sources["train"].fingerprint, "settings": settings,
                          "sha256": _sha256(model),
                          "seconds": round(time.perf_counter() - t0, 1)})


# ----------------------------------------------------------------------------------------
# Encoding into the cache.
# ----------------------------------------------------------------------------------------
def _flatten_with_eos(pieces: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
  """(flat int32 ids with EOS after each sentence, int64 lengths with EOS)."""
  lengths = np.fromiter(map(len, pieces), np.int64, len(pieces)) + 1
  out = np.full(int(lengths.sum()), corpora.EOS_ID, np.int32)
  ends = np.cumsum(lengths)
  body = np.ones(len(out), bool)
  body[ends - 1] = False
  out[body] = np.fromiter(itertools.chain.from_iterable(pieces), np.int32,
                          int(lengths.sum()) - len(pieces))
  return out, lengths


def _encode_split(processor, source: PairSource, tokens: epath.Path, split: str,
                  progress: bool) -> dict:
  threads = os.cpu_count() or 1
  files, lengths = {}, {side: [] for side in SIDES}
  handles = {side: (tokens / f"{split}.{side}.ids.tmp").open("wb") for side in SIDES}
  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(total=source.size if source.size >= 0 else None, unit=" pairs",
               desc=f"tokenizing {split}", file=sys.stderr, mininterval=2.0, unit_scale=True)
  try:
    for chunk in source.chunks(CHUNK):
      for side, text in zip(SIDES, chunk):
        ids, n = _flatten_with_eos(processor.encode(text, num_threads=threads))
        handles[side].write(ids.astype("<i4", copy=False).tobytes())
        lengths[side].append(n)
      if bar is not None:
        bar.update(len(chunk[0]))
  finally:
    for h in handles.values():
      h.close()
    if bar is not None:
      bar.close()
  pairs = int(sum(len(n) for n in lengths["src"]))
  if pairs == 0:
    for side in SIDES:
      (tokens / f"{split}.{side}.ids.tmp").unlink(missing_ok=True)
    raise ConfigError(f"{source.where}: no sentence pairs (an empty split); supply the "
                      "corpus files with their sentences, or fix data.data_dir")
  for side in SIDES:
    offsets = np.zeros(pairs + 1, np.int64)
    np.cumsum(np.concatenate(lengths[side]), out=offsets[1:])
    (tokens / f"{split}.{side}.offsets.tmp").write_bytes(offsets.astype("<i8").tobytes())
    for kind in ("ids", "offsets"):
      name = f"{split}.{side}.{kind}"
      (tokens / (name + ".tmp")).replace(tokens / name)
      files[name] = {"bytes": (tokens / name).stat().length, "blake2b": hash_file(
          os.fspath(tokens / name))}
  return {"pairs": pairs, "files": files,
          "tokens": {side: int(sum(n.sum() for n in lengths[side])) for side in SIDES}}


def _verify(tokens: epath.Path, manifest: dict, checksums: bool) -> str | None:
  """None if the token files agree with the manifest, else what is wrong."""
  for split, entry in manifest["splits"].items():
    for name, want in entry["files"].items():
      path = tokens / name
      if not path.exists():
        return f"{path} is missing"
      if path.stat().length != want["bytes"]:
        return f"{path} has {path.stat().length} bytes, not {want['bytes']} (truncated)"
      if checksums and hash_file(os.fspath(path)) != want["blake2b"]:
        return f"{path} does not match its checksum (corrupted)"
  return None


@storage.io_boundary   # a failing store: one line, exit 5
def prepare(directory: str, config, *, progress: bool = True, log=print) -> dict:
  """Makes ``<directory>/spm.model`` and ``<directory>/tokens`` valid for ``config``'s
  corpus (training, checking or rebuilding what is there); returns the manifest."""
  root = epath.Path(directory)
  tokens = root / TOKENS_DIR
  manifest_path = tokens / MANIFEST
  old = _read_json(manifest_path) if manifest_path.exists() else None
  recorded = (old or {}).get("corpus_splits")
  if recorded is None:
    info = _read_json(root / SPM_INFO) if (root / SPM_INFO).exists() else None
    recorded = {"train": (info or {}).get("corpus")}
  sources = corpus_sources(config, recorded)
  ensure_sentencepiece(directory, sources, config, log=log)
  spm_hash = _sha256(root / SPM_FILE)
  fingerprints = {s: src.fingerprint for s, src in sources.items()}
  why = "unreadable manifest" if manifest_path.exists() and old is None else "absent"
  if old is not None:
    if old.get("format") != FORMAT:
      why = "of another format"
    elif old.get("spm_sha256") != spm_hash:
      why = "made with another spm.model"
    elif not all(fingerprint_matches(old.get("corpus_splits", {}).get(s), fp)
                 for s, fp in fingerprints.items()):
      why = "made from another corpus"
    else:
      why = _verify(tokens, old, checksums=True)
      if why is None:
        if old.get("corpus_splits") != fingerprints:   # new stat times of the same files
          old["corpus_splits"] = fingerprints
          _write_json(manifest_path, old)
        return old
  log(f"preparing the token cache {tokens} ({why})")
  manifest_path.unlink(missing_ok=True)
  tokens.mkdir(parents=True, exist_ok=True)
  import sentencepiece as spm
  processor = spm.SentencePieceProcessor(model_proto=(root / SPM_FILE).read_bytes())
  t0 = time.perf_counter()
  splits = {}
  for split, source in sources.items():
    splits[split] = _encode_split(processor, source, tokens, split, progress)
  manifest = {"format": FORMAT, "data": config.data.name, "spm_sha256": spm_hash,
              "corpus_splits": fingerprints, "splits": splits,
              "seconds": round(time.perf_counter() - t0, 1)}
  _write_json(manifest_path, manifest)
  return manifest


# ----------------------------------------------------------------------------------------
# Reading.
# ----------------------------------------------------------------------------------------
def _load_array(path: epath.Path, dtype) -> np.ndarray:
  if "://" not in os.fspath(path):
    size = os.path.getsize(os.fspath(path))
    if size == 0:
      return np.zeros(0, dtype)
    return np.memmap(os.fspath(path), dtype=dtype, mode="r")
  return np.frombuffer(path.read_bytes(), dtype=dtype)


@dataclasses.dataclass
class TokenSplit:
  """One encoded split, memory-mapped: ids of pair i's side s are
  ``ids[s][offsets[s][i]:offsets[s][i + 1]]`` (pieces + EOS)."""
  ids: dict[str, np.ndarray]
  offsets: dict[str, np.ndarray]

  def __len__(self) -> int:
    return len(self.offsets["src"]) - 1

  def lengths(self, side: str) -> np.ndarray:
    return np.diff(self.offsets[side])

  def sentence(self, side: str, i: int) -> np.ndarray:
    return np.asarray(self.ids[side][self.offsets[side][i]:self.offsets[side][i + 1]])

  def padded(self, side: str, rows: np.ndarray, length: int) -> np.ndarray:
    """(len(rows), length) int32: pair ``rows[r]``'s ids padded with PAD (−1: an empty row);
    only these rows are read."""
    rows = np.asarray(rows, np.int64)
    out = np.full((len(rows), length), corpora.PAD_ID, np.int32)
    real = rows >= 0
    if not real.any():
      return out
    off = self.offsets[side]
    starts = np.asarray(off[rows[real]])
    lens = np.asarray(off[rows[real] + 1]) - starts
    cols = np.arange(length)
    valid = cols[None, :] < lens[:, None]
    block = np.zeros((int(real.sum()), length), np.int32)
    block[valid] = self.ids[side][(starts[:, None] + cols[None, :])[valid]]
    out[real] = block
    return out


@storage.io_boundary   # a failing store: one line, exit 5
def open_split(directory: str, split: str, manifest: dict) -> TokenSplit:
  tokens = epath.Path(directory) / TOKENS_DIR
  entry = manifest["splits"][split]
  ids = {s: _load_array(tokens / f"{split}.{s}.ids", "<i4") for s in SIDES}
  offsets = {s: _load_array(tokens / f"{split}.{s}.offsets", "<i8") for s in SIDES}
  for s in SIDES:
    if len(offsets[s]) != entry["pairs"] + 1 or int(offsets[s][-1]) != len(ids[s]):
      raise ConfigError(f"{tokens / f'{split}.{s}.offsets'} does not match "
                        f"{tokens / f'{split}.{s}.ids'}; delete {tokens} and rerun to "
                        "prepare it again")
  return TokenSplit(ids, offsets)


def cache_directory(config, workdir: str) -> str:
  """Where ``spm.model`` and ``tokens/`` live: the workdir, or with
  ``translation.cache_dir`` a subdirectory of it per data set and vocabulary settings
  (shared by the runs that use the same)."""
  t = config.translation
  if not t.cache_dir:
    return workdir
  name = (f"{config.data.name}-v{config.model.vocab_size}-s{t.spm_sample_sentences}"
          f"-r{t.spm_sample_seed}")
  return os.path.join(os.path.expanduser(t.cache_dir), name)


@storage.io_boundary   # a failing store: one line, exit 5
def load_manifest(directory: str) -> dict:
  path = epath.Path(directory) / TOKENS_DIR / MANIFEST
  manifest = _read_json(path) if path.exists() else None
  if manifest is None:
    raise ConfigError(f"{path} is missing or unreadable after preparation; delete "
                      f"{path.parent} and rerun")
  return manifest


@storage.io_boundary   # a failing store: one line, exit 5
def load_sentencepiece(directory: str, vocab_size: int):
  import sentencepiece as spm
  path = epath.Path(directory) / SPM_FILE
  processor = spm.SentencePieceProcessor(model_proto=path.read_bytes())
  if processor.get_piece_size() > vocab_size:
    raise ConfigError(f"{path} has {processor.get_piece_size()} pieces, more than "
                      f"model.vocab_size={vocab_size}; use another workdir")
  return processor


def references(config, manifest: dict, count: int) -> list[str]:
  """The first ``count`` target sentences of the test split, as text (for BLEU)."""
  source = corpus_sources(config, manifest.get("corpus_splits"), splits=("test",))["test"]
  out: list[str] = []
  for _, tgt in source.chunks(CHUNK):
    out.extend(tgt[:count - len(out)])
    if len(out) >= count:
      break
  return out
