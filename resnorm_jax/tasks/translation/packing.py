"""Training batches read from the token cache: bucketed (default) or packed rows.

Bucketed (``translation.packing=False``): :class:`CachedTokenBatches` is
:class:`corpora.TokenBatches` (the same filtering, buckets, rows per batch and per-epoch
order, so the same batches at every step as before the cache) whose rows are read from the
memory-mapped :class:`cache.TokenSplit` instead of Python lists.

Packed (``translation.packing=True``, t5x/seqio and MaxText style): several pairs per row.
The side with fewer tokens in the corpus gets rows of L = ``translation.max_length``
tokens, the other side rows of ⌈L·r / 8⌉·8 tokens, r >= 1 the ratio of the two sides'
token counts (so neither side's rows run out of room long before the other's).  Once per
run (a function of ``train.seed`` only) the kept pairs are shuffled and placed first-fit
into up to :data:`OPEN_ROWS` open rows (a pair goes to the first open row where both of its
sides still fit; when none has room the oldest open row is closed and a new one opened).
Each epoch permutes the rows (a function of (seed, epoch)) and cuts them into global
batches of R = ⌊max_tokens / L_max⌋ rows (a multiple of the replicas; the last batch padded
with empty rows), so every pair is seen once per epoch, the number of batches per epoch is fixed and
step s is batch s mod n of epoch s div n (exact resume without iterator state).  A packed
row carries, per side, the tokens, segment ids (1, 2, ... per pair, 0 on padding) and
positions restarting at 0 in every segment; the model masks attention across segments and
the decoder input restarts with BOS in every segment
(:func:`resnorm_jax.models.transformer.shift_right_segments`).

Per-host reads: :func:`global_array` builds a global array from a function of a row
range, called only for the rows this process's devices hold, so a process reads only its
share of every batch.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from resnorm_jax.errors import ConfigError
from resnorm_jax.tasks.translation import corpora
from resnorm_jax.tasks.translation.cache import TokenSplit

OPEN_ROWS = 16


def kept_pairs(split: TokenSplit, max_length: int) -> np.ndarray:
  """Indices of the pairs with 1 < |x|, |y| <= max_length (EOS included), as
  :func:`corpora.make_token_batches` keeps them."""
  src, tgt = split.lengths("src"), split.lengths("tgt")
  keep = np.flatnonzero((src > 1) & (src <= max_length) & (tgt > 1) & (tgt <= max_length))
  if not len(keep):
    raise ConfigError(f"no training pair is within translation.max_length={max_length} "
                      "tokens; raise it")
  return keep


def global_array(shape: tuple[int, ...], sharding, rows_fn) -> jax.Array:
  """A global array of ``shape`` whose rows ``rows_fn(start, stop)`` (a numpy array of
  rows start..stop-1) are computed only for the shards this process's devices hold."""
  cache = {}

  def shard(index):
    rows = index[0]
    start, stop, _ = rows.indices(shape[0])
    if (start, stop) not in cache:
      cache[(start, stop)] = rows_fn(start, stop)
    return cache[(start, stop)][(slice(None),) + tuple(index[1:])]
  return jax.make_array_from_callback(shape, sharding, shard)


# ----------------------------------------------------------------------------------------
# Bucketed batches from the cache.
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class CachedTokenBatches(corpora.TokenBatches):
  """:class:`corpora.TokenBatches` over a memory-mapped split: ``kept[i]`` is the split's
  index of kept pair i (``sources``/``targets`` are unused)."""
  split: TokenSplit | None = None
  kept: np.ndarray | None = None

  def rows_of(self, step: int) -> tuple[int, np.ndarray]:
    """(bucket length, the split's pair index per row, −1 = empty row) at ``step``."""
    b, idx = self.indices(step)
    return self.lengths[b], np.where(idx >= 0, self.kept[np.maximum(idx, 0)], -1)

  def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    length, rows = self.rows_of(step)
    return tuple(self.split.padded(side, rows, length) for side in ("src", "tgt"))

  def global_batch(self, step: int, sharding) -> dict[str, jax.Array]:
    length, rows = self.rows_of(step)
    return {side: global_array((len(rows), length), sharding,
                               lambda a, b, side=side: self.split.padded(side, rows[a:b],
                                                                         length))
            for side in ("src", "tgt")}


def make_cached_batches(split: TokenSplit, *, max_length: int, max_tokens: int,
                        replicas: int, seed: int) -> CachedTokenBatches:
  kept = kept_pairs(split, max_length)
  lengths = corpora.bucket_lengths(max_length)
  longest = np.maximum(split.lengths("src")[kept], split.lengths("tgt")[kept])
  bucket = np.searchsorted(lengths, longest).astype(np.int32)
  rows = [corpora.rows_for(n, max_tokens, replicas) for n in lengths]
  return CachedTokenBatches(None, None, lengths, bucket, rows, seed, split=split, kept=kept)


# ----------------------------------------------------------------------------------------
# Packed batches.
# ----------------------------------------------------------------------------------------
def pack_pairs(src_len: np.ndarray, tgt_len: np.ndarray, length: int | tuple[int, int],
               open_rows: int = OPEN_ROWS) -> tuple[np.ndarray, np.ndarray]:
  """First-fit packing of pairs (in the given order) into rows of ``length`` tokens per
  side (or (source, target) lengths), at most ``open_rows`` rows open at a time.  Returns
  (offsets (rows + 1,), members): row r holds the pairs ``members[offsets[r]:offsets[r + 1]]``
  (positions in the input), rows in the order they were closed."""
  src_len, tgt_len = np.asarray(src_len).tolist(), np.asarray(tgt_len).tolist()
  src_room, tgt_room = (length, length) if isinstance(length, int) else length
  members: list[int] = []
  offsets = [0]
  room_s: list[int] = []
  room_t: list[int] = []
  rows: list[list[int]] = []
  for i, (s, t) in enumerate(zip(src_len, tgt_len)):
    for k in range(len(rows)):
      if room_s[k] >= s and room_t[k] >= t:
        room_s[k] -= s
        room_t[k] -= t
        rows[k].append(i)
        break
    else:
      if len(rows) == open_rows:
        members.extend(rows.pop(0))
        offsets.append(len(members))
        room_s.pop(0)
        room_t.pop(0)
      rows.append([i])
      room_s.append(src_room - s)
      room_t.append(tgt_room - t)
  for row in rows:
    members.extend(row)
    offsets.append(len(members))
  return np.asarray(offsets, np.int64), np.asarray(members, np.int64)


@dataclasses.dataclass
class PackedBatches:
  """Packed rows of the kept pairs and their per-epoch batch order (module docstring)."""
  split: TokenSplit
  lengths: dict[str, int]   # tokens per row, per side ("src", "tgt")
  rows_per_batch: int       # R
  row_offsets: np.ndarray   # (rows + 1,)
  row_members: np.ndarray   # the split's pair indices, row after row
  seed: int
  _epoch_cache: dict = dataclasses.field(default_factory=dict, repr=False)

  @property
  def num_rows(self) -> int:
    return len(self.row_offsets) - 1

  @property
  def batches_per_epoch(self) -> int:
    return -(-self.num_rows // self.rows_per_batch)

  def epoch(self, epoch: int) -> np.ndarray:
    """(batches, R) row indices of ``epoch`` (−1 = empty row): a function of (seed, epoch)."""
    if epoch not in self._epoch_cache:
      order = np.random.default_rng([self.seed, epoch, 1]).permutation(self.num_rows)
      order = np.pad(order, (0, self.batches_per_epoch * self.rows_per_batch - len(order)),
                     constant_values=-1)
      self._epoch_cache = {epoch: order.reshape(self.batches_per_epoch, -1)}
    return self._epoch_cache[epoch]

  def indices(self, step: int) -> np.ndarray:
    epoch, position = divmod(step, self.batches_per_epoch)
    return self.epoch(epoch)[position]

  def side_arrays(self, side: str, rows: np.ndarray) -> dict[str, np.ndarray]:
    """{side, side_segments, side_positions}: (len(rows), L) int32 arrays of packed rows."""
    n, length = len(rows), self.lengths[side]
    tokens = np.full((n, length), corpora.PAD_ID, np.int32)
    segments = np.zeros((n, length), np.int32)
    positions = np.zeros((n, length), np.int32)
    off = self.split.offsets[side]
    for r, row in enumerate(rows):
      if row < 0:
        continue
      pairs = self.row_members[self.row_offsets[row]:self.row_offsets[row + 1]]
      starts, ends = np.asarray(off[pairs]), np.asarray(off[pairs + 1])
      lens = ends - starts
      total = int(lens.sum())
      seg = np.repeat(np.arange(1, len(pairs) + 1, dtype=np.int32), lens)
      first = np.repeat(np.cumsum(lens) - lens, lens)
      pos = np.arange(total) - first
      tokens[r, :total] = self.split.ids[side][np.repeat(starts, lens) + pos]
      segments[r, :total] = seg
      positions[r, :total] = pos
    return {side: tokens, f"{side}_segments": segments, f"{side}_positions": positions}

  def batch(self, step: int) -> dict[str, np.ndarray]:
    rows = self.indices(step)
    return {**self.side_arrays("src", rows), **self.side_arrays("tgt", rows)}

  def global_batch(self, step: int, sharding) -> dict[str, jax.Array]:
    rows = self.indices(step)
    parts: dict = {}

    def part(side, a, b):
      if (side, a, b) not in parts:
        parts[(side, a, b)] = self.side_arrays(side, rows[a:b])
      return parts[(side, a, b)]
    out = {}
    for side in ("src", "tgt"):
      for key in (side, f"{side}_segments", f"{side}_positions"):
        out[key] = global_array((len(rows), self.lengths[side]), sharding,
                                lambda a, b, side=side, key=key: part(side, a, b)[key])
    return out


def make_packed_batches(split: TokenSplit, *, max_length: int, max_tokens: int,
                        replicas: int, seed: int) -> PackedBatches:
  kept = kept_pairs(split, max_length)
  lengths = row_lengths(split, kept, max_length)
  order = np.random.default_rng([seed, 0]).permutation(kept)
  offsets, members = pack_pairs(split.lengths("src")[order], split.lengths("tgt")[order],
                                (lengths["src"], lengths["tgt"]))
  rows = corpora.rows_for(max(lengths.values()), max_tokens, replicas)
  return PackedBatches(split, lengths, rows, offsets, order[members], seed)


def row_lengths(split: TokenSplit, kept: np.ndarray, max_length: int) -> dict[str, int]:
  """Row length per side: ``max_length`` for the side with fewer tokens, ⌈max_length·r / 8⌉·8
  for the other (r = the ratio of the sides' token counts over the kept pairs)."""
  tokens = {side: int(split.lengths(side)[kept].sum()) for side in ("src", "tgt")}
  short, long = sorted(tokens, key=tokens.get)
  ratio = tokens[long] / max(tokens[short], 1)
  return {short: max_length, long: max(max_length, -(-int(max_length * ratio) // 8) * 8)}
