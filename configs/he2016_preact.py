"""He et al. (2016): pre-activation ResNet-164 / ResNet-1001 on CIFAR-10 and CIFAR-100.

    resnorm-train --config=configs/he2016_preact.py:resnet1001_cifar100
    resnorm-sweep --config=configs/he2016_preact.py --variants=all --workdir=runs/preact

Variants ``resnet{164,1001}_{cifar10,cifar100}``: full pre-activation (e) bottleneck units,
identity shortcuts, recipe of configs/cifar_resnet.py.
"""

from resnorm_jax import experiments

cifar_resnet = experiments.sibling(__file__, "cifar_resnet")

SOURCE = "He et al. 2016, pre-activation ResNet results"
# (depth, data set) -> published test error %
PUBLISHED = {
    (164, "cifar10"): 5.46,
    (1001, "cifar10"): 4.92,
    (164, "cifar100"): 24.33,
    (1001, "cifar100"): 22.71,
}
VARIANTS = tuple(f"resnet{depth}_{data}" for depth, data in PUBLISHED)
# resnorm-sweep compares each depth with ResNet-164 on the same data set.
BASELINE = {f"resnet{depth}_{data}": f"resnet164_{data}" for depth, data in PUBLISHED}


def get_config(arg=None):
  variant = experiments.check_variant(arg, VARIANTS, "configs/he2016_preact.py",
                                      "resnet164_cifar10")
  preset, data = variant.split("_")
  c = cifar_resnet.get_config(f"{preset},{data}")
  c.model.unit = "full_preact"
  c.model.shortcut = "identity"
  return experiments.set_published(c, PUBLISHED[(c.model.depth, data)], SOURCE)
