"""Translation data: corpora, a shared SentencePiece vocabulary, token-count batching.

Sources (``data.name``, registry :data:`TRANSLATION_DATASETS`):

* ``toy_translation``: a deterministic toy language generated offline (no files): a source
  sentence is 3..``toy_max_words`` words ``a0 .. a{V-1}``; its translation is the reversed
  sentence with every word mapped, a_i -> b_{(7i + 3) mod V}.  A Transformer learns it in
  minutes on a CPU (the smoke/benchmark command in README.md).
* ``iwslt15_envi``: IWSLT'15 English->Vietnamese, test tst2013: the TFDS data set prepared
  by the builder in :mod:`resnorm_jax.tasks.translation.iwslt15` (``<data.data_dir>/iwslt15_envi``), or else
  the standard plain files in ``data.data_dir`` (``train.{en,vi}``, ``tst2013.{en,vi}``),
  read offline.  Both paths are tested on generated files.
* ``wmt14_ende``: WMT'14 English->German from TFDS's prepared ArrayRecord data
  (``wmt14_translate/de-en``) in ``data.data_dir``, read with
  ``tfds.builder_from_directory(...).as_data_source`` (no TensorFlow needed to read;
  TensorFlow is needed once, to prepare it).  Tested on a locally prepared stand-in with the
  same name, config and features (``Translation(de, en)``), not on the real data.

Pipeline: a SentencePiece model (unigram, shared source/target vocabulary of
``model.vocab_size`` pieces; pad 0, BOS 1, EOS 2, unk 3 as the Transformer expects) is trained
on the training text and saved as ``<workdir>/spm.model``, which later runs (resume) reuse.
Every sentence becomes its pieces + EOS; pairs longer than ``translation.max_length`` on
either side are dropped from training.  Each training pair goes to the smallest bucket length
L >= max(|x|, |y|) (:func:`bucket_lengths`); a global batch of bucket L has
R(L) = ⌊max_tokens / L⌋ rows rounded down to a multiple of the replicas, so R·L <= max_tokens.

Order (exact resume, as for images): epoch e is a pure function of ``(seed, e)``: each bucket
is permuted and cut into batches of R(L) rows (the last one padded with empty rows), then the
batches of all buckets are permuted.  The number of batches per epoch does not depend on the
seed, so step s is batch ``s mod n`` of epoch ``s div n`` and every pair appears exactly once
per epoch.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable

import numpy as np

from resnorm_jax import storage
from resnorm_jax.registry import ConfigError, Registry
from resnorm_jax.tasks.translation import streams


def _always_present(config) -> None:
  del config


@dataclasses.dataclass(frozen=True)
class CorpusInfo:
  """What is known of a translation data set before reading it, and how to reach it.

  ``target_lang``: the target language (tokenized BLEU's rules depend on it);
  ``sources(config, recorded, splits)``: {"train", "test"}: the splits as
  :class:`streams.PairSource` without reading the text, for the token cache (files are only
  stat-ed; hashed when new or changed since ``recorded``, the fingerprints of an earlier
  preparation; ``splits``: the plain-file splits to fingerprint); ``check_present(config)``:
  the one-line :class:`ConfigError` of a missing corpus, without reading it."""
  target_lang: str
  sources: Callable[[Any, dict, tuple[str, ...]], dict[str, streams.PairSource]]
  check_present: Callable[[Any], None] = _always_present


TRANSLATION_DATASETS = Registry("translation data set", CorpusInfo)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class TextCorpus:
  """Parallel raw text: ``train``/``test`` lists of (source, target) sentences."""
  name: str
  source_lang: str
  target_lang: str
  train: tuple[list[str], list[str]]
  test: tuple[list[str], list[str]]


def check_parallel(source: list[str], target: list[str], where: str) -> None:
  if len(source) != len(target):
    raise ConfigError(f"{where}: {len(source)} source lines but {len(target)} target lines; "
                      "the files are corrupt or do not belong together")
  if not source:
    raise ConfigError(f"{where}: no sentence pairs")


# ----------------------------------------------------------------------------------------
# Sources.
# ----------------------------------------------------------------------------------------
def toy_pair(rng: np.random.Generator, vocab: int, max_words: int) -> tuple[str, str]:
  """One toy pair: target = reverse(source) with a_i -> b_{(7i + 3) mod V}."""
  words = rng.integers(0, vocab, rng.integers(3, max_words + 1))
  source = " ".join(f"a{i}" for i in words)
  target = " ".join(f"b{(7 * i + 3) % vocab}" for i in words[::-1])
  return source, target


def _toy_sources(config, recorded: dict, splits: tuple[str, ...]):
  del recorded, splits
  t = config.translation
  corpus = _toy(None, config)
  key = {"kind": "toy", "sizes": [t.toy_train_size, t.toy_test_size, t.toy_vocab,
                                  t.toy_max_words]}
  return {s: streams.list_source(f"toy_translation ({s})", *pairs, dict(key, split=s))
          for s, pairs in (("train", corpus.train), ("test", corpus.test))}


@TRANSLATION_DATASETS.register(
    "toy_translation", "generated toy language: target = reversed source with a fixed word "
    "mapping (offline; translation.toy_* sizes)",
    info=CorpusInfo(target_lang="en", sources=_toy_sources))
def _toy(arg, config) -> TextCorpus:
  t = config.translation
  draw = lambda n, seed: tuple(map(list, zip(*(
      toy_pair(rng, t.toy_vocab, t.toy_max_words)
      for rng in [np.random.default_rng(seed)] for _ in range(n)))))
  return TextCorpus("toy_translation", "src", "tgt", draw(t.toy_train_size, 0),
                    draw(t.toy_test_size, 1))


def read_lines(path: str) -> list[str]:
  text = storage.read_bytes(path).decode("utf-8")   # a local file or an object
  lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")  # as open() reads
  return [line.strip() for line in (lines[:-1] if lines[-1] == "" else lines)]


IWSLT_FILES = ("train.en", "train.vi", "tst2013.en", "tst2013.vi")


def _iwslt15_prepared(config) -> bool:
  """Whether data.data_dir holds the TFDS data set of resnorm_jax/tasks/translation/
  iwslt15.py's builder (else the plain files are read)."""
  directory = os.path.expanduser(config.data.data_dir or ".")
  return _latest_version_dir(os.path.join(directory, "iwslt15_envi")) is not None


def _iwslt15_present(config) -> None:
  directory = os.path.expanduser(config.data.data_dir or ".")
  if not _iwslt15_prepared(config) and any(
      not os.path.isfile(os.path.join(directory, f)) for f in IWSLT_FILES):
    read_iwslt15(config.data.data_dir)     # raises before reading anything


def _iwslt15_sources(config, recorded: dict, splits: tuple[str, ...]):
  if _iwslt15_prepared(config):
    return _tfds_sources(config.data.data_dir or ".", "iwslt15_envi", "en", "vi")
  _iwslt15_present(config)
  directory = os.path.expanduser(config.data.data_dir or ".")
  return {s: streams.plain_files_source(directory, f, ("en", "vi"), recorded.get(s))
          for s, f in (("train", "train"), ("test", "tst2013")) if s in splits}


@TRANSLATION_DATASETS.register(
    "iwslt15_envi", "IWSLT'15 English->Vietnamese from the standard files train.{en,vi}, "
    "tst2013.{en,vi} in data.data_dir (test: tst2013)",
    info=CorpusInfo(target_lang="vi", sources=_iwslt15_sources,
                    check_present=_iwslt15_present))
def _iwslt15(arg, config) -> TextCorpus:
  if _iwslt15_prepared(config):
    return read_tfds_translation(config.data.data_dir or ".", "iwslt15_envi", "en", "vi")
  return read_iwslt15(config.data.data_dir)


def read_iwslt15(data_dir: str) -> TextCorpus:
  """Reads the Stanford NMT release of IWSLT'15 EN-VI (``train.*``, ``tst2013.*``)."""
  directory = os.path.expanduser(data_dir or ".")
  missing = [f for f in IWSLT_FILES if not storage.isfile(storage.join(directory, f))]
  if missing:
    raise ConfigError(
        f"data.name=iwslt15_envi: {', '.join(missing)} missing in data.data_dir="
        f"{directory!r}. Download train.en, train.vi, tst2013.en, tst2013.vi (and tst2012.*) "
        "from https://nlp.stanford.edu/projects/nmt/ into that directory (or set "
        "--config.data.data_dir=DIR; `python -m resnorm_jax.tasks.translation.iwslt15 --manual_dir=DIR "
        "--data_dir=DIR` also prepares them as a TFDS data set), then rerun")
  splits = []
  for split in ("train", "tst2013"):
    src, tgt = (read_lines(storage.join(directory, f"{split}.{lang}")) for lang in ("en", "vi"))
    check_parallel(src, tgt, storage.join(directory, f"{split}.{{en,vi}}"))
    splits.append((src, tgt))
  return TextCorpus("iwslt15_envi", "en", "vi", splits[0], splits[1])


WMT_NAME = "wmt14_translate/de-en"


def _wmt14_present(config) -> None:
  _tfds_version_dir(config.data.data_dir, WMT_NAME, "en", "de")


def _wmt14_sources(config, recorded: dict, splits: tuple[str, ...]):
  del recorded, splits
  return _tfds_sources(config.data.data_dir, WMT_NAME, "en", "de")


@TRANSLATION_DATASETS.register(
    "wmt14_ende", "WMT'14 English->German from TFDS's prepared wmt14_translate/de-en "
    "(ArrayRecord) in data.data_dir; test: newstest2014",
    info=CorpusInfo(target_lang="de", sources=_wmt14_sources, check_present=_wmt14_present))
def _wmt14(arg, config) -> TextCorpus:
  return read_tfds_translation(config.data.data_dir, WMT_NAME, "en", "de")


def _latest_version_dir(root: str) -> str | None:
  if not storage.isdir(root):
    return None
  versions = [v for v in storage.listdir(root)
              if storage.isfile(storage.join(root, v, "dataset_info.json"))]
  key = lambda v: tuple(int(p) if p.isdigit() else 0 for p in v.split("."))
  return storage.join(root, max(versions, key=key)) if versions else None


def _tfds_version_dir(data_dir: str, name: str, source: str, target: str) -> str:
  """The newest prepared version of TFDS data set ``name`` in ``data_dir`` (default
  ``~/tensorflow_datasets``); :func:`read_tfds_translation`'s one-line error without one."""
  root = os.path.join(os.path.expanduser(data_dir or "~/tensorflow_datasets"), name)
  version_dir = _latest_version_dir(root)
  if version_dir is None:
    read_tfds_translation(data_dir, name, source, target)    # raises its one-line error
  return version_dir


def _tfds_sources(data_dir: str, name: str, source: str, target: str):
  """:func:`streams.tfds_sources` of TFDS data set ``name`` in ``data_dir``; the reader's
  one-line error when it is missing or cannot be read."""
  version_dir = _tfds_version_dir(data_dir, name, source, target)
  sources = streams.tfds_sources(version_dir, name, source, target)
  if sources is None:   # let the reader phrase the error
    read_tfds_translation(data_dir, name, source, target)
    raise ConfigError(f"data.name: the TFDS data set {name} in {version_dir} cannot be read")
  return sources


def read_tfds_translation(data_dir: str, name: str, source: str, target: str) -> TextCorpus:
  """Reads a prepared TFDS translation data set through its ArrayRecord data source."""
  root = storage.join(os.path.expanduser(data_dir or "~/tensorflow_datasets"), name)
  how = (f"Prepare it once on a machine with TensorFlow: `pip install tensorflow "
         f"tensorflow-datasets && python -c \"import tensorflow_datasets as tfds; "
         f"tfds.builder('{name}', data_dir='{data_dir or '~/tensorflow_datasets'}', "
         f"file_format='array_record').download_and_prepare()\"`, then rerun")
  version_dir = _latest_version_dir(root)
  if version_dir is None:
    raise ConfigError(f"data.name: no prepared TFDS data set {name} in {root!r}. {how}")
  import tensorflow_datasets as tfds
  try:
    builder = tfds.builder_from_directory(version_dir)
    sources = {s: builder.as_data_source(split=s) for s in ("train", "test")}
  except Exception as e:  # pylint: disable=broad-except  (any reader failure: one message)
    raise ConfigError(f"cannot read the TFDS data set in {version_dir!r} ({e}); it must be "
                      f"prepared in ArrayRecord format. {how}") from None
  decode = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)
  splits = []
  for split, data in sources.items():
    rows = [row for start in range(0, len(data), 10_000)
            for row in data.__getitems__(list(range(start, min(start + 10_000, len(data)))))]
    splits.append(([decode(r[source]) for r in rows], [decode(r[target]) for r in rows]))
    check_parallel(*splits[-1], f"{version_dir} ({split})")
  return TextCorpus(name, source, target, splits[0], splits[1])


def load_corpus(config) -> TextCorpus:
  return TRANSLATION_DATASETS.build(config.data.name, config=config)


# ----------------------------------------------------------------------------------------
# SentencePiece.
# ----------------------------------------------------------------------------------------
def train_sentencepiece(sentences: list[str], vocab_size: int, model_path: str,
                        max_sentences: int = 10_000_000, num_threads: int = 2) -> None:
  """Trains a unigram SentencePiece model on ``sentences``; writes ``model_path``.

  Ids: pad 0, BOS 1, EOS 2, unk 3.  ``hard_vocab_limit=False`` lets a small corpus (the toy
  language) end with fewer pieces than ``vocab_size``.
  """
  import sentencepiece as spm
  if storage.is_url(model_path):   # trained in a local directory, then copied to the store
    import tempfile  # pylint: disable=import-outside-toplevel
    with tempfile.TemporaryDirectory() as tmp:
      local = os.path.join(tmp, "spm.model")
      train_sentencepiece(sentences, vocab_size, local, max_sentences)
      storage.copy(local[:-len(".model")] + ".vocab", model_path[:-len(".model")] + ".vocab")
      storage.copy(local, model_path)
    return
  os.makedirs(os.path.dirname(model_path) or ".", exist_ok=True)
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_prefix=model_path[:-len(".model")],
      vocab_size=vocab_size, model_type="unigram", character_coverage=1.0,
      pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID, hard_vocab_limit=False,
      input_sentence_size=max_sentences, shuffle_input_sentence=True, num_threads=num_threads,
      minloglevel=2)


def load_or_train_sentencepiece(corpus: TextCorpus, vocab_size: int, workdir: str,
                                is_main: bool = True, barrier: Callable | None = None):
  """``<workdir>/spm.model``: trained on the training text of both sides if absent (by the
  main process; the others wait at ``barrier``), then loaded.  Resumed runs reuse it."""
  import sentencepiece as spm
  path = storage.join(workdir, "spm.model")
  if is_main and not storage.exists(path):
    train_sentencepiece(corpus.train[0] + corpus.train[1], vocab_size, path)
  if barrier is not None:
    barrier()
  processor = spm.SentencePieceProcessor(model_proto=storage.read_bytes(path))
  if processor.get_piece_size() > vocab_size:
    raise ConfigError(f"{path} has {processor.get_piece_size()} pieces, more than "
                      f"model.vocab_size={vocab_size}; use another workdir")
  return processor


def encode(processor, sentences: list[str]) -> list[np.ndarray]:
  """Pieces + EOS, as int32 arrays."""
  return [np.asarray(ids + [EOS_ID], np.int32) for ids in processor.encode(sentences)]


def decode(processor, ids) -> str:
  """Detokenized text of the ids before the first EOS (pad/BOS dropped; ids beyond the
  SentencePiece model, possible when it has fewer pieces than model.vocab_size, are unk)."""
  out, size = [], processor.get_piece_size()
  for i in np.asarray(ids).tolist():
    if i == EOS_ID:
      break
    if i not in (PAD_ID, BOS_ID):
      out.append(i if i < size else UNK_ID)
  return processor.decode(out)


# ----------------------------------------------------------------------------------------
# Length filtering, buckets, token-count batches.
# ----------------------------------------------------------------------------------------
def bucket_lengths(max_length: int, minimum: int = 8, ratio: float = 1.25,
                   multiple: int = 8) -> list[int]:
  """Increasing bucket lengths: L_0 = minimum, L_{k+1} = ⌈ratio·L_k / multiple⌉·multiple,
  capped by (and ending at) ``max_length``."""
  lengths, n = [], min(minimum, max_length)
  while n < max_length:
    lengths.append(n)
    n = max(n + multiple, int(math.ceil(n * ratio / multiple)) * multiple)
  return lengths + [max_length]


def rows_for(length: int, max_tokens: int, replicas: int) -> int:
  """R(L) = ⌊max_tokens / L⌋ rounded down to a multiple of ``replicas`` (at least one row per
  replica), so that R·L <= max_tokens whenever max_tokens >= replicas·L."""
  return max(replicas, (max_tokens // length) // replicas * replicas)


@dataclasses.dataclass
class TokenBatches:
  """Encoded training pairs with a deterministic token-count batch order."""
  sources: list[np.ndarray]
  targets: list[np.ndarray]
  lengths: list[int]        # bucket lengths
  bucket: np.ndarray        # per pair: its bucket's index
  rows: list[int]           # per bucket: rows of a global batch
  seed: int
  _epoch_cache: dict = dataclasses.field(default_factory=dict, repr=False)

  @property
  def batches_per_epoch(self) -> int:
    counts = np.bincount(self.bucket, minlength=len(self.lengths))
    return int(sum(-(-c // r) for c, r in zip(counts, self.rows)))

  def epoch(self, epoch: int) -> list[tuple[int, np.ndarray]]:
    """[(bucket index, pair indices padded with −1)] of ``epoch``: a function of (seed, epoch)."""
    if epoch not in self._epoch_cache:
      rng = np.random.default_rng([self.seed, epoch])
      batches = []
      for b, rows in enumerate(self.rows):
        members = rng.permutation(np.flatnonzero(self.bucket == b))
        for start in range(0, len(members), rows):
          chunk = members[start:start + rows]
          batches.append((b, np.pad(chunk, (0, rows - len(chunk)), constant_values=-1)))
      order = rng.permutation(len(batches))
      self._epoch_cache = {epoch: [batches[i] for i in order]}
    return self._epoch_cache[epoch]

  def indices(self, step: int) -> tuple[int, np.ndarray]:
    epoch, position = divmod(step, self.batches_per_epoch)
    return self.epoch(epoch)[position]

  def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(source, target) int32 arrays (R(L), L) of the global batch at ``step``."""
    b, idx = self.indices(step)
    return (pad_rows([self.sources[i] if i >= 0 else None for i in idx], self.lengths[b]),
            pad_rows([self.targets[i] if i >= 0 else None for i in idx], self.lengths[b]))


def pad_rows(rows: list, length: int) -> np.ndarray:
  out = np.full((len(rows), length), PAD_ID, np.int32)
  for r, ids in enumerate(rows):
    if ids is not None:
      out[r, :len(ids)] = ids
  return out


def make_token_batches(sources, targets, *, max_length: int, max_tokens: int, replicas: int,
                       seed: int) -> TokenBatches:
  """Drops pairs with a side longer than ``max_length`` (EOS included) and buckets the rest."""
  keep = [i for i, (s, t) in enumerate(zip(sources, targets))
          if 1 < len(s) <= max_length and 1 < len(t) <= max_length]
  if not keep:
    raise ConfigError(f"no training pair is within translation.max_length={max_length} "
                      "tokens; raise it")
  sources, targets = [sources[i] for i in keep], [targets[i] for i in keep]
  lengths = bucket_lengths(max_length)
  longest = np.maximum([len(s) for s in sources], [len(t) for t in targets])
  bucket = np.searchsorted(lengths, longest).astype(np.int32)
  rows = [rows_for(n, max_tokens, replicas) for n in lengths]
  return TokenBatches(sources, targets, lengths, bucket, rows, seed)


def eval_batches(sources: list[np.ndarray], batch_size: int, replicas: int,
                 max_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """Test sources sorted by length in batches of ``batch_size`` rows (a multiple of the
  replicas), padded to a bucket length: [(positions in the test set (−1 = padding row),
  (rows, L) source ids)].  Sources longer than ``max_len`` are truncated (EOS kept)."""
  rows = -(-batch_size // replicas) * replicas
  clipped = [s if len(s) <= max_len else np.append(s[:max_len - 1], EOS_ID) for s in sources]
  lengths = bucket_lengths(max_len)
  order = np.argsort([len(s) for s in clipped], kind="stable")
  out = []
  for start in range(0, len(order), rows):
    chunk = order[start:start + rows]
    length = lengths[int(np.searchsorted(lengths, max(len(clipped[i]) for i in chunk)))]
    positions = np.pad(chunk, (0, rows - len(chunk)), constant_values=-1)
    out.append((positions, pad_rows([clipped[i] if i >= 0 else None for i in positions],
                                    length)))
  return out
