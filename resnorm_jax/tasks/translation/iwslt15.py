"""A TFDS builder for IWSLT'15 English->Vietnamese (the Stanford NMT release).

Reads the standard files ``train.{en,vi}``, ``tst2012.{en,vi}`` (validation) and
``tst2013.{en,vi}`` (test) from a manual directory, offline, and writes ArrayRecord shards
that ``tfds.builder_from_directory(...).as_data_source`` reads (no TensorFlow needed, to
prepare or to read).  Without a manual directory it downloads the same files from
https://nlp.stanford.edu/projects/nmt/ (declared, but untested here: no internet).

    python -m resnorm_jax.tasks.translation.iwslt15 --manual_dir=DIR_WITH_FILES --data_dir=~/tensorflow_datasets

``data.name=iwslt15_envi`` then reads ``<data.data_dir>/iwslt15_envi/1.0.0``; it reads the
plain files in ``data.data_dir`` directly when no prepared copy is there.
"""

from __future__ import annotations

import os
import sys

import tensorflow_datasets as tfds

from resnorm_jax.errors import ConfigError

URL = "https://nlp.stanford.edu/projects/nmt/data/iwslt15.en-vi/"
SPLITS = {"train": "train", "validation": "tst2012", "test": "tst2013"}


class Iwslt15Envi(tfds.core.GeneratorBasedBuilder):
  """IWSLT'15 EN-VI: ~133k training pairs, tst2012 (validation), tst2013 (test)."""

  VERSION = tfds.core.Version("1.0.0")
  # No checksums file: TFDS would look for one next to the code through importlib_resources,
  # which this environment lacks.
  url_infos = None
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download train.en, train.vi, tst2012.en, tst2012.vi, tst2013.en, tst2013.vi from "
      f"{URL} into the manual directory.")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description="IWSLT'15 English-Vietnamese (TED talks)",
        features=tfds.features.Translation(languages=("en", "vi")),
        supervised_keys=("en", "vi"), homepage="https://nlp.stanford.edu/projects/nmt/")

  def _split_generators(self, dl_manager):
    names = [f"{prefix}.{lang}" for prefix in SPLITS.values() for lang in ("en", "vi")]
    manual = dl_manager._manual_dir  # pylint: disable=protected-access  (None if not given)
    if manual is not None and all(os.path.isfile(os.path.join(manual, n)) for n in names):
      paths = {n: os.path.join(os.fspath(manual), n) for n in names}
    else:
      paths = dl_manager.download({n: URL + n for n in names})
    return {split: self._generate_examples(paths[f"{prefix}.en"], paths[f"{prefix}.vi"])
            for split, prefix in SPLITS.items()}

  def _generate_examples(self, en_path, vi_path):
    en, vi = (read_text(p) for p in (en_path, vi_path))
    if len(en) != len(vi):
      raise ConfigError(f"{en_path}: {len(en)} source lines but {len(vi)} target lines in "
                        f"{vi_path}; the files are corrupt or do not belong together")
    for i, (source, target) in enumerate(zip(en, vi)):
      yield i, {"en": source, "vi": target}


def read_text(path) -> list[str]:
  with open(os.fspath(path), encoding="utf-8") as f:
    return [line.rstrip("\n").strip() for line in f]


def prepare(manual_dir: str, data_dir: str) -> str:
  """Prepares the data set in ArrayRecord format; returns its directory."""
  builder = Iwslt15Envi(data_dir=os.path.expanduser(data_dir), file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=os.path.expanduser(manual_dir)))
  return builder.data_path


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_string("manual_dir", None, "Directory with the IWSLT'15 EN-VI files.")
  flags.DEFINE_string("data_dir", "~/tensorflow_datasets", "TFDS data directory.")

  def main(argv):
    del argv
    print(prepare(flags.FLAGS.manual_dir, flags.FLAGS.data_dir))
  app.run(main)
  sys.exit(0)
