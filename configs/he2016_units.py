"""He et al. (2016), Table 2: the five unit orderings (and no shortcut) at depths 110 / 164.

    resnorm-train --config=configs/he2016_units.py:full_preact_164
    resnorm-sweep --config=configs/he2016_units.py --variants=all --workdir=runs/table2

Variants ``<unit>_<depth>``: unit in original (a), bn_after_add (b), relu_before_add (c),
relu_preact (d), full_preact (e), plain (no shortcut, the degradation baseline); depth 110
(basic units) or 164 (bottleneck units).  Recipe: configs/cifar_resnet.py on CIFAR-10.
"""

from resnorm_jax import experiments

cifar_resnet = experiments.sibling(__file__, "cifar_resnet")

SOURCE = "He et al. 2016, Table 2"
# unit -> published CIFAR-10 test error % at (ResNet-110, ResNet-164)
PUBLISHED = {
    "original": (6.61, 5.93),
    "bn_after_add": (8.17, 6.50),
    "relu_before_add": (7.84, 6.14),
    "relu_preact": (6.71, 5.91),
    "full_preact": (6.37, 5.46),
    "plain": (None, None),
}
DEPTHS = (110, 164)
VARIANTS = tuple(f"{unit}_{depth}" for unit in PUBLISHED for depth in DEPTHS)
# resnorm-sweep compares each ordering with the original unit (a) of the same depth.
BASELINE = {f"{unit}_{depth}": f"original_{depth}" for unit in PUBLISHED for depth in DEPTHS}


def get_config(arg=None):
  variant = experiments.check_variant(arg, VARIANTS, "configs/he2016_units.py",
                                      "original_110")
  unit, depth = variant.rsplit("_", 1)
  c = cifar_resnet.get_config(f"resnet{depth},cifar10")
  c.model.unit = unit
  error = PUBLISHED[unit][DEPTHS.index(int(depth))]
  note = "no shortcut: the degradation baseline, no published number" if unit == "plain" \
      else ""
  return experiments.set_published(c, error, SOURCE if error is not None else "", note)
