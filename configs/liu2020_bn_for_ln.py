"""Liu et al. (2020)'s "BatchNorm replaces LayerNorm" experiment on the Transformer: every
xskip_ln / rskip_ln combinator next to its BatchNorm twin (xskip_bn / rskip_bn, statistics
over the real tokens only).  The ResNet side of the experiment is in
configs/liu2020_resnet.py (its xskip_bn_<λ> and rskip_bn_<λ> variants).

    resnorm-train --config=configs/liu2020_bn_for_ln.py:iwslt15_rskip_bn_2
    resnorm-sweep --config=configs/liu2020_bn_for_ln.py --variants=all --seeds=3 \
        --workdir=runs/liu2020_bn

Variants ``<data>_<combinator>_<norm>_<λ>``: data ``iwslt15`` or ``wmt14`` (the recipes of
configs/liu2020_translation.py), combinator ``xskip`` (y = N(λx + F(x))) or ``rskip``
(G_k = N(x + G_{k−1}), y = G_λ), norm ``ln`` or ``bn``, λ in 1, 2, 3.  resnorm-sweep compares
each BN variant with its LN twin.  Liu et al.'s BLEU for these is in a table SPEC.md does
not transcribe: no published numbers.
"""

from resnorm_jax import experiments

RECIPES = {"iwslt15": "iwslt15_envi_transformer", "wmt14": "wmt14_ende_transformer"}
COMBINATORS = ("xskip", "rskip")
NORMS = ("ln", "bn")
LAMBDAS = (1, 2, 3)
VARIANTS = tuple(f"{data}_{comb}_{norm}_{lam}" for data in RECIPES for comb in COMBINATORS
                 for norm in NORMS for lam in LAMBDAS)
BASELINE = {v: v.replace("_bn_", "_ln_") for v in VARIANTS}   # LN variants: their own
NOTE = "Liu et al. 2020 report this BLEU; not transcribed in SPEC.md"


def get_config(arg=None):
  variant = experiments.check_variant(arg, VARIANTS, "configs/liu2020_bn_for_ln.py",
                                      "iwslt15_xskip_bn_1")
  data, comb, norm, lam = variant.split("_")
  recipe = experiments.sibling(__file__, RECIPES[data])
  c = recipe.get_config(f"{comb}_ln{lam}")      # the recipe and λ of the LN combinator
  c.model.skip = f"{comb}_{norm}"
  return experiments.set_published_bleu(c, None, "Liu et al. 2020, BatchNorm for "
                                        "LayerNorm", NOTE)
