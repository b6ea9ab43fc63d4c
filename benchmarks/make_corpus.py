"""A generated parallel corpus of WMT-like sizes in the IWSLT'15 file layout (offline).

    python benchmarks/make_corpus.py --pairs 2000000 --out /work/scratch-data/gen2m

writes ``train.en``, ``train.vi`` (``--pairs`` lines each), ``tst2013.en``, ``tst2013.vi``
(``--test`` lines) into ``--out``: pseudo-words (random syllable strings) drawn from a Zipf
distribution over ``--words`` types, a line length drawn from a log-normal around
``--mean_words`` words (WMT'14 EN-DE averages ~24 words a line), clipped to [1, 150].  The
target line is the source line's words mapped through a fixed random permutation of the
vocabulary, with ~10 % of the words replaced at random, so the two sides correlate like a
translation.  Deterministic in ``--seed``.  Used by the scale probes of issue 15
(benchmarks/RESULTS.md, ``tests/test_prepare.py`` marked slow); it needs no network data.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

SYLLABLES = [c + v for c in "bcdfghklmnprstvz" for v in "aeiou"] + ["qu", "th", "ch", "sh"]


def vocabulary(size: int, rng: np.random.Generator) -> np.ndarray:
  """``size`` distinct pseudo-words of 1-4 syllables (short words are the frequent ones)."""
  words, seen = [], set()
  while len(words) < size:
    n = 1 + min(3, int(rng.geometric(0.45)) - 1 + len(words) // 2000)
    w = "".join(SYLLABLES[i] for i in rng.integers(0, len(SYLLABLES), n))
    if w not in seen:
      seen.add(w)
      words.append(w)
  return np.array(words, dtype=object)


def write_split(directory, split, n, *, words, mapping, mean_words, rng, chunk=100_000,
                log=None):
  paths = [os.path.join(directory, f"{split}.{lang}") for lang in ("en", "vi")]
  tmp = [p + ".tmp" for p in paths]
  with open(tmp[0], "w", encoding="utf-8") as fs, open(tmp[1], "w", encoding="utf-8") as ft:
    for start in range(0, n, chunk):
      m = min(chunk, n - start)
      lengths = np.clip(np.rint(rng.lognormal(np.log(mean_words) - 0.18, 0.6, m)), 1,
                        150).astype(np.int64)
      ids = np.minimum(rng.zipf(1.15, int(lengths.sum())) - 1, len(words) - 1)
      tgt_ids = mapping[ids]
      noise = rng.random(len(ids)) < 0.1
      tgt_ids[noise] = rng.integers(0, len(words), int(noise.sum()))
      src_words, tgt_words = words[ids], words[tgt_ids]
      cuts = np.cumsum(lengths)[:-1]
      fs.write("".join(" ".join(line) + "\n" for line in np.split(src_words, cuts)))
      ft.write("".join(" ".join(line) + "\n" for line in np.split(tgt_words, cuts)))
      if log:
        log(f"{split}: {start + m:,}/{n:,} pairs")
  for t, p in zip(tmp, paths):
    os.replace(t, p)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--pairs", type=int, required=True, help="training pairs")
  parser.add_argument("--test", type=int, default=3000, help="test pairs (tst2013)")
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--words", type=int, default=50_000, help="word types per side")
  parser.add_argument("--mean_words", type=float, default=24.0, help="mean words per line")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  rng = np.random.default_rng(args.seed)
  words = vocabulary(args.words, rng)
  mapping = rng.permutation(args.words)
  t0 = time.time()
  log = lambda s: print(f"[{time.time() - t0:6.1f} s] {s}", file=sys.stderr, flush=True)
  for split, n in (("train", args.pairs), ("tst2013", args.test)):
    write_split(args.out, split, n, words=words, mapping=mapping, mean_words=args.mean_words,
                rng=rng, log=log)
  print(args.out)


if __name__ == "__main__":
  main()
