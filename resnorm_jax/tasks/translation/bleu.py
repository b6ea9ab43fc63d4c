"""BLEU as the papers compute it: sacreBLEU, and tokenized BLEU (multi-bleu.perl).

Two measures of the same output differ by up to ~1.5 BLEU (tensor2tensor#317), so each
config's ``published.measure`` names the one its paper's number is, and evaluation reports
it beside sacreBLEU:

* ``bleu`` -- sacreBLEU on detokenized text (13a tokenization, exp smoothing), with its
  signature (``bleu_signature``);
* ``bleu_tokenized`` -- Moses' ``multi-bleu.perl`` (:func:`multi_bleu`: corpus BLEU over
  whitespace tokens, no smoothing, brevity penalty from the closest reference length) on
  text prepared per ``translation.tokenized_bleu``:

  - ``tokens``: the text as it is, for corpora released tokenized (the Stanford IWSLT'15
    EN-VI files, whose tst2013 BLEU the literature reports with multi-bleu.perl);
  - ``t2t_compound``: tensor2tensor's ``get_ende_bleu.sh``, the measure of Vaswani et al.
    (2017)'s WMT'14 EN-DE numbers: the output through Moses' ``replace-unicode-punctuation
    .perl`` and ``tokenizer.perl -l <target language>`` (both from the maintained
    ``sacremoses`` port), the reference through the same tokenizer (t2t reads the Stanford
    ``newstest2014.tok.de``, made by that tokenizer), then on both the compound split
    ``perl -ple 's{(\\S)-(\\S)}{$1 ##AT##-##AT## $2}g'`` (:func:`split_compounds`), then
    multi-bleu.perl.
"""

from __future__ import annotations

import collections
import math
import re
from typing import Sequence

TOKENIZED = ("none", "tokens", "t2t_compound")

_COMPOUND = re.compile(rb"(\S)-(\S)")


def sacrebleu_score(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[float, str]:
  """(sacreBLEU, its signature) with sacreBLEU's defaults (13a, exp smoothing)."""
  import sacrebleu
  metric = sacrebleu.BLEU()
  score = metric.corpus_score(list(hypotheses), [list(references)])
  return float(score.score), str(metric.get_signature())


def split_compounds(line: str) -> str:
  """``perl -ple 's{(\\S)-(\\S)}{$1 ##AT##-##AT## $2}g'`` on one line: Perl reads bytes
  (no ``-C``), so the pattern runs on UTF-8 bytes with ASCII ``\\S``, and ``/g`` resumes
  after each match (``a-b-c`` -> ``a ##AT##-##AT## b-c``, as Perl leaves it)."""
  return _COMPOUND.sub(rb"\1 ##AT##-##AT## \2", line.encode("utf-8")).decode("utf-8")


def _moses(lang: str):
  from sacremoses import MosesPunctNormalizer, MosesTokenizer
  return MosesPunctNormalizer(lang=lang), MosesTokenizer(lang=lang)


def t2t_compound(hypotheses: Sequence[str], references: Sequence[str],
                 lang: str) -> tuple[list[str], list[str]]:
  """Both sides as ``get_ende_bleu.sh`` hands them to multi-bleu.perl (module docstring)."""
  normalizer, tokenizer = _moses(lang)
  tok = lambda s: tokenizer.tokenize(s, escape=True, return_str=True)
  hyp = [split_compounds(tok(normalizer.replace_unicode_punct(h))) for h in hypotheses]
  ref = [split_compounds(tok(r)) for r in references]
  return hyp, ref


def multi_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
  """Moses' ``multi-bleu.perl`` (one reference): n-gram counts n = 1..4 over whitespace
  tokens clipped by the reference's, summed over the corpus; BLEU = BP · exp(mean_n log p_n)
  with log 0 taken as −9999999999 (so a zero precision gives 0) and BP = exp(1 − r/c) when
  the hypotheses are shorter (c < r); × 100, unrounded."""
  if len(hypotheses) != len(references):
    raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
  correct, total = [0] * 5, [0] * 5
  hyp_len = ref_len = 0
  for hyp, ref in zip(hypotheses, references):
    h, r = hyp.split(), ref.split()
    hyp_len += len(h)
    ref_len += len(r)
    for n in range(1, 5):
      hyp_ngrams = collections.Counter(tuple(h[i:i + n]) for i in range(len(h) - n + 1))
      ref_ngrams = collections.Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
      total[n] += sum(hyp_ngrams.values())
      correct[n] += sum(min(c, ref_ngrams[g]) for g, c in hyp_ngrams.items())
  if ref_len == 0 or hyp_len == 0:
    return 0.0
  log = lambda p: math.log(p) if p else -9999999999.0
  precisions = [correct[n] / total[n] if total[n] else 0.0 for n in range(1, 5)]
  brevity = math.exp(1 - ref_len / hyp_len) if hyp_len < ref_len else 1.0
  return 100.0 * brevity * math.exp(sum(log(p) for p in precisions) / 4)


def tokenized_bleu(hypotheses: Sequence[str], references: Sequence[str], how: str,
                   lang: str) -> float:
  """``bleu_tokenized`` per ``translation.tokenized_bleu`` (module docstring)."""
  if how == "tokens":
    return multi_bleu(hypotheses, references)
  if how == "t2t_compound":
    return multi_bleu(*t2t_compound(hypotheses, references, lang))
  raise ValueError(f"translation.tokenized_bleu={how!r}; valid choices: {', '.join(TOKENIZED)}")


def scores(hypotheses: Sequence[str], references: Sequence[str], tokenized: str,
           lang: str) -> dict:
  """The evaluation's BLEU entries: ``bleu``, ``bleu_signature`` and, unless ``tokenized``
  is ``none``, ``bleu_tokenized``."""
  bleu, signature = sacrebleu_score(hypotheses, references)
  out = {"bleu": bleu, "bleu_signature": signature}
  if tokenized != "none":
    out["bleu_tokenized"] = tokenized_bleu(hypotheses, references, tokenized, lang)
  return out
