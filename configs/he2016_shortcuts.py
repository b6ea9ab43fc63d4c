"""He et al. (2016), Table 1: shortcut variants on ResNet-110 with the original unit (a).

    resnorm-train --config=configs/he2016_shortcuts.py:exclusive_gate
    resnorm-sweep --config=configs/he2016_shortcuts.py --variants=all --workdir=runs/table1

Variants: identity, constant_0.5_1 (shortcut 0.5, F 1), constant_0.5_0.5, exclusive_gate
(1-g(x) / g(x), b_g init -6), shortcut_gate (1-g(x) / 1, b_g init -6), conv1x1, dropout
(p = 0.5).  Recipe: configs/cifar_resnet.py (CIFAR-10, 64k iterations, batch 128).
"""

from resnorm_jax import experiments

cifar_resnet = experiments.sibling(__file__, "cifar_resnet")

SOURCE = "He et al. 2016, Table 1"
FAIL = "fail (error > 20%)"
# variant -> (model.shortcut, published CIFAR-10 test error % or None, note)
SHORTCUTS = {
    "identity": ("identity", 6.61, ""),
    "constant_0.5_1": ("constant:0.5,1", None, FAIL),
    "constant_0.5_0.5": ("constant:0.5,0.5", 12.35, ""),
    "exclusive_gate": ("exclusive_gate:-6", 8.70, ""),
    "shortcut_gate": ("shortcut_gate:-6", 6.91, ""),
    "conv1x1": ("conv1x1", 12.22, ""),
    "dropout": ("dropout:0.5", None, FAIL),
}
VARIANTS = tuple(SHORTCUTS)
BASELINE = "identity"          # resnorm-sweep compares every variant with it


def get_config(arg=None):
  variant = experiments.check_variant(arg, VARIANTS, "configs/he2016_shortcuts.py",
                                      "identity")
  shortcut, error, note = SHORTCUTS[variant]
  c = cifar_resnet.get_config("resnet110,cifar10")
  c.model.unit = "original"
  c.model.shortcut = shortcut
  return experiments.set_published(c, error, SOURCE, note)
