"""Liu et al. (2020), "Rethinking Skip Connection with Layer Normalization": the Transformer
experiments, IWSLT'15 EN-VI and WMT'14 EN-DE, with the skip combinators of SPEC section 3.

    resnorm-train --config=configs/liu2020_translation.py:iwslt15_rskip_ln_2
    resnorm-sweep --config=configs/liu2020_translation.py --variants=all --seeds=3 \
        --workdir=runs/liu2020_mt

Variants ``<data>_<combinator>``: data ``iwslt15`` (configs/iwslt15_envi_transformer.py) or
``wmt14`` (configs/wmt14_ende_transformer.py, Transformer base), combinator ``post_ln``
(Vaswani's block, y = LN(x + F(x)); also xskip_ln and rskip_ln at λ = 1), ``pre_ln``,
``xskip_ln_<λ>`` and ``rskip_ln_<λ>`` for λ in 2, 3.  Everything else is the recipe of the
data set's config, which is the published one (README "Published recipes"): ~25k source and
target tokens per step (on fewer than 8 devices set ``train.accumulate_steps``), 100k steps
(WMT) / 50k (IWSLT), the average of the last 5 checkpoints evaluated at the end, beam 4,
α 0.6, and the BLEU measure of the literature (``published.measure = bleu_tokenized``:
tensor2tensor's compound-split tokenized BLEU for WMT'14 EN-DE, multi-bleu.perl on the
tokenized IWSLT'15 files).  Published BLEU: Transformer base on newstest2014, 27.3 (Vaswani
et al. 2017, that measure); Liu et al.'s own numbers are in a table SPEC.md does not
transcribe, so those variants have none until someone copies them from the paper.
"""

from resnorm_jax import experiments

RECIPES = {"iwslt15": "iwslt15_envi_transformer", "wmt14": "wmt14_ende_transformer"}
COMBINATORS = ("post_ln", "pre_ln", "xskip_ln_2", "xskip_ln_3", "rskip_ln_2", "rskip_ln_3")
VARIANTS = tuple(f"{data}_{name}" for data in RECIPES for name in COMBINATORS)
# resnorm-sweep compares each combinator with the Post-LN Transformer on the same data.
BASELINE = {f"{data}_{name}": f"{data}_post_ln" for data in RECIPES for name in COMBINATORS}
NOT_TRANSCRIBED = "Liu et al. 2020 report this BLEU; not transcribed in SPEC.md"
# variant -> (published BLEU, source, note)
PUBLISHED = {
    "wmt14_post_ln": (27.3, "Vaswani et al. 2017, Transformer base, newstest2014", ""),
    "iwslt15_post_ln": (None, "", "Transformers reach about 28-33 BLEU on tst2013 in the "
                        "literature (SPEC section 4); no single published number"),
}


def get_config(arg=None):
  variant = experiments.check_variant(arg, VARIANTS, "configs/liu2020_translation.py",
                                      "iwslt15_post_ln")
  data, name = variant.split("_", 1)
  recipe = experiments.sibling(__file__, RECIPES[data])
  c = recipe.get_config(name.replace("_ln_", "_ln"))   # xskip_ln_2 -> the recipe's xskip_ln2
  bleu, source, note = PUBLISHED.get(variant, (None, "", NOT_TRANSCRIBED))
  return experiments.set_published_bleu(c, bleu, source, note)
