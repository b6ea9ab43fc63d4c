"""BLEU as published (resnorm_jax/tasks/translation/bleu.py): multi-bleu.perl's arithmetic
on hand-counted n-grams, tensor2tensor's compound split, sacreBLEU's signature, and the
sweep table's choice of measure."""

import math
import os

import pytest

from resnorm_jax import config as config_lib, sweep
from resnorm_jax import validation
from resnorm_jax.errors import ConfigError
from resnorm_jax.experiments import load_config_module
from resnorm_jax.tasks.translation import bleu

from helpers import REPO


def test_multi_bleu_on_hand_counted_ngrams():
  # "the cat sat on the mat" vs "the cat is on the mat": matched 1-grams the, the, cat, on,
  # mat = 5/6; 2-grams "the cat", "on the", "the mat" = 3/5; 3-grams "on the mat" = 1/4;
  # 4-grams 0/3 -> multi-bleu takes log 0 as -9999999999: BLEU 0 (no smoothing).
  assert bleu.multi_bleu(["the cat sat on the mat"], ["the cat is on the mat"]) == 0.0
  # "a dog runs in the park today" vs "a dog runs in the big park": 6/7, 4/6, 3/5, 2/4.
  # Corpus of both: 11/13, 7/11, 4/9, 2/7, lengths 13 = 13 (BP 1):
  # BLEU = 100 (11·7·4·2 / (13·11·9·7))^(1/4) = 100 (8/117)^(1/4) = 51.14.
  corpus = bleu.multi_bleu(["the cat sat on the mat", "a dog runs in the park today"],
                           ["the cat is on the mat", "a dog runs in the big park"])
  assert corpus == pytest.approx(100 * (8 / 117) ** 0.25, rel=1e-12)
  assert round(corpus, 2) == 51.14
  # Shorter hypothesis: "a dog runs in the park" (6) vs the 7-token reference: 6/6, 4/5,
  # 3/4, 2/3 -> (2/5)^(1/4), brevity penalty exp(1 - 7/6): 67.32.
  short = bleu.multi_bleu(["a dog runs in the park"], ["a dog runs in the big park"])
  assert short == pytest.approx(100 * math.exp(1 - 7 / 6) * 0.4 ** 0.25, rel=1e-12)
  assert round(short, 2) == 67.32
  # Clipping: "the the the the" vs "the cat the": 1-grams clipped to 2/4, no 2-gram: 0.
  assert bleu.multi_bleu(["the the the the"], ["the cat the"]) == 0.0
  assert bleu.multi_bleu(["a b c d"], ["a b c d"]) == pytest.approx(100.0)


def test_compound_split_is_perls_non_overlapping_substitution():
  assert bleu.split_compounds("Rich-Text-Format") == \
      "Rich ##AT##-##AT## Text ##AT##-##AT## Format"
  # /g resumes after "a-b": the "-" of "b-c" has no unconsumed character before it.
  assert bleu.split_compounds("a-b-c d-e") == "a ##AT##-##AT## b-c d ##AT##-##AT## e"
  assert bleu.split_compounds("x - y -5 5- über-all") == \
      "x - y -5 5- über ##AT##-##AT## all"


def test_t2t_ende_pipeline_on_fixed_pairs():
  hyp, ref = bleu.t2t_compound(["Das Rich-Text-Format ist gut.",
                                "Er sagte: „Das kostet 5 €“ – a-b."],
                               ["Das Rich-Text-Format ist schlecht.", "x"], "de")
  # Moses tokenization (escaping, no aggressive dash splitting), then the compound split;
  # replace-unicode-punctuation turns the hypothesis' “ into ", escaped as &quot;.
  assert hyp == ["Das Rich ##AT##-##AT## Text ##AT##-##AT## Format ist gut .",
                 "Er sagte : „ Das kostet 5 € &quot; – a ##AT##-##AT## b ."]
  assert ref[0] == "Das Rich ##AT##-##AT## Text ##AT##-##AT## Format ist schlecht ."
  # The first pair, 9 tokens each after splitting (Das Rich ##AT##-##AT## Text
  # ##AT##-##AT## Format ist gut/schlecht .): 1-grams 8/9 (gut), 2-grams 6/8 ("ist gut",
  # "gut ."), 3-grams 5/7, 4-grams 4/6 -> 100 (8·6·5·4 / (9·8·7·6))^(1/4)
  # = 100 (20/63)^(1/4) = 75.06.
  score = bleu.tokenized_bleu(["Das Rich-Text-Format ist gut."],
                              ["Das Rich-Text-Format ist schlecht."], "t2t_compound", "de")
  assert score == pytest.approx(100 * (20 / 63) ** 0.25, rel=1e-12)
  assert round(score, 2) == 75.06
  # Not the same measure as sacreBLEU on the same pair (13a keeps the compound whole).
  sacre, signature = bleu.sacrebleu_score(["Das Rich-Text-Format ist gut."],
                                          ["Das Rich-Text-Format ist schlecht."])
  assert abs(sacre - score) > 1.0
  assert signature.startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")


def test_scores_and_the_sweep_table_use_the_published_measure():
  out = bleu.scores(["a b c d"], ["a b c d"], "tokens", "en")
  assert set(out) == {"bleu", "bleu_signature", "bleu_tokenized"}
  assert set(bleu.scores(["a b"], ["a b"], "none", "en")) == {"bleu", "bleu_signature"}
  c = load_config_module(os.path.join(REPO, "configs", "wmt14_ende_transformer.py")).get_config()
  assert (c.translation.tokenized_bleu, c.published.measure) == ("t2t_compound",
                                                                 "bleu_tokenized")
  metric = sweep.metric_of(c)
  assert metric["key"] == "bleu_tokenized" and metric["published"] == 27.3
  assert metric["label"] == "test BLEU (tokenized, compound-split)"
  assert sweep.metric_value({"bleu": 26.0, "bleu_tokenized": 27.1}, metric) == 27.1
  liu = load_config_module(os.path.join(REPO, "configs", "liu2020_translation.py"))
  for variant in liu.VARIANTS:
    v = liu.get_config(variant)
    assert sweep.metric_of(v)["key"] == "bleu_tokenized" and v.checkpoint.average_last == 5
  assert sweep.metric_of(liu.get_config("wmt14_post_ln"))["published"] == 27.3
  c.translation.tokenized_bleu = "none"
  with pytest.raises(ConfigError, match="published.measure='bleu_tokenized' needs "
                     "translation.tokenized_bleu"):
    validation.validate(c, 8)
