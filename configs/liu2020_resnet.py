"""Liu et al. (2020), "Rethinking Skip Connection with Layer Normalization": PreAct-ResNet-110
on CIFAR-10 with the skip combinators of SPEC section 3 and their BatchNorm versions.

    resnorm-train --config=configs/liu2020_resnet.py:rskip_ln_2
    resnorm-sweep --config=configs/liu2020_resnet.py --variants=all --workdir=runs/liu2020

Variants: ``skip`` (the baseline y = x + F(x)) and ``<combinator>_<λ>`` for combinator in
xskip, xskip_ln, rskip_ln, xskip_bn, rskip_bn and λ in 1, 2, 3 (``model.skip_lambda``); the
``*_bn`` ones are the ResNet side of the paper's "BN replaces LN" experiment (the Transformer
side: configs/liu2020_bn_for_ln.py).
The paper's numbers are in a table SPEC.md does not transcribe, so ``published.error`` is
left empty (no published number) until someone copies them from the paper.
"""

from resnorm_jax import experiments

cifar_resnet = experiments.sibling(__file__, "cifar_resnet")

SOURCE = "Liu et al. 2020, PreAct-ResNet-110 on CIFAR-10"
NOTE = "published in the paper's table; not transcribed in SPEC.md"
COMBINATORS = ("xskip", "xskip_ln", "rskip_ln", "xskip_bn", "rskip_bn")
LAMBDAS = (1, 2, 3)
VARIANTS = ("skip",) + tuple(f"{name}_{lam}" for name in COMBINATORS for lam in LAMBDAS)
BASELINE = "skip"              # resnorm-sweep compares every combinator with y = x + F(x)


def get_config(arg=None):
  variant = experiments.check_variant(arg, VARIANTS, "configs/liu2020_resnet.py", "skip")
  c = cifar_resnet.get_config("resnet110,cifar10")
  c.model.unit = "full_preact"
  if variant == "skip":
    c.model.skip = "skip"
  else:
    skip, lam = variant.rsplit("_", 1)
    c.model.skip = skip
    c.model.skip_lambda = float(lam)
  return experiments.set_published(c, None, SOURCE, NOTE)
