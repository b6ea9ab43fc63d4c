"""Transformer on IWSLT'15 English->Vietnamese (test: tst2013).

    resnorm-train --config=configs/iwslt15_envi_transformer.py:pre_ln \
        --config.data.data_dir=data/iwslt15_envi --workdir=runs/iwslt_pre_ln

Variants: post_ln (default) | pre_ln | xskip_ln<λ> | rskip_ln<λ> (e.g. rskip_ln2).
Data: train.{en,vi}, tst2013.{en,vi} from https://nlp.stanford.edu/projects/nmt/ in
data.data_dir.  Recipe: Vaswani's optimizer, schedule, label smoothing and beam with the
common IWSLT model size (preset ``iwslt``: 6+6 layers, d 512, 4 heads, FFN 1024, dropout 0.3).
Vocabulary: a shared SentencePiece model of 16k pieces -- the corpus (133k pairs) is ~30x
smaller than WMT'14, so a smaller vocabulary than WMT's 37k keeps pieces frequent; 8k-16k is
the range used in the literature for IWSLT-sized corpora (16k is our pick, not tuned).
"""

from resnorm_jax.tasks.translation.recipes import apply_variant, vaswani_config


def get_config(arg=None):
  c = vaswani_config()
  c.data.name = "iwslt15_envi"
  c.model.preset = "iwslt"
  c.model.vocab_size = 16_000
  c.translation.max_tokens = 8_192
  c.train.steps = 50_000
  c.eval.every_steps = 5_000
  c.checkpoint.every_steps = 2_000
  # Vaswani's averaging of the last 5 checkpoints, every 1,000 steps here (50 per run).
  c.checkpoint.average_last = 5
  c.checkpoint.average_every_steps = 1_000
  # The Stanford files are tokenized; the literature's tst2013 BLEU is multi-bleu.perl on
  # them as they are (no published number is transcribed: SPEC section 4 gives a range).
  c.translation.tokenized_bleu = "tokens"
  c.published.measure = "bleu_tokenized"
  return apply_variant(c, arg, "configs/iwslt15_envi_transformer.py")
