"""Transformer base on WMT'14 English->German (Vaswani et al. 2017, Table 3 "base").

    resnorm-train --config=configs/wmt14_ende_transformer.py:rskip_ln2 \
        --config.data.data_dir=~/tensorflow_datasets --workdir=runs/wmt_rskip2

Variants: post_ln (default, the paper) | pre_ln | xskip_ln<λ> | rskip_ln<λ> (e.g. rskip_ln2).
Data: TFDS wmt14_translate/de-en prepared as ArrayRecord in data.data_dir (README.md).
Recipe: 6+6 layers, d 512, 8 heads, FFN 2048, dropout 0.1, shared SentencePiece vocabulary of
37k pieces, ~25k source + ~25k target tokens per batch (max_tokens 25,000 here counts the
padded rows x length of one side), 100k steps, rsqrt warm-up 4000, beam 4, α 0.6; test:
newstest2014 (published BLEU 27.3: the average of the last 5 checkpoints, tokenized BLEU
with compound splitting -- both are this config's defaults, README "Published recipes").
Batch: 25k tokens fit one device's share on 8 devices; on one device set
--config.train.accumulate_steps (README).
"""

from resnorm_jax.tasks.translation.recipes import apply_variant, vaswani_config


def get_config(arg=None):
  c = vaswani_config()
  c.data.name = "wmt14_ende"
  c.model.preset = "base"
  c.model.vocab_size = 37_000
  c.translation.max_tokens = 25_000
  c.train.steps = 100_000
  c.eval.every_steps = 10_000
  c.checkpoint.every_steps = 2_000
  # Vaswani et al. average the last 5 checkpoints, written every 10 minutes of a 12-hour run
  # (~1,390 steps); here every 1,250 steps (100k / 80), so the last is step 100,000.  The
  # completed run evaluates the average (split "average" in metrics.jsonl).
  c.checkpoint.average_last = 5
  c.checkpoint.average_every_steps = 1_250
  # BLEU as Vaswani et al. report it: tensor2tensor's get_ende_bleu.sh (Moses tokenization,
  # compound splitting, multi-bleu.perl) beside sacreBLEU; the sweep table compares it.
  c.translation.tokenized_bleu = "t2t_compound"
  c.published.bleu = 27.3
  c.published.source = "Vaswani et al. 2017, Transformer base, newstest2014"
  c.published.measure = "bleu_tokenized"
  return apply_variant(c, arg, "configs/wmt14_ende_transformer.py")
