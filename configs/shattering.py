"""Shattered gradients (Balduzzi et al. 2017): correlation of neighbouring input gradients.

    resnorm-analyze --config=configs/shattering.py --workdir=runs/shattering
    resnorm-analyze --config=configs/shattering.py:paper
    resnorm-analyze --config=configs/shattering.py:plain_bn,resnet_bn --config.depths=1,8,64

Arguments (comma-separated): at most one scale — ``cpu`` (default: width 200, depths 1-32,
20 draws, ~1 min), ``tiny`` (tests), ``paper`` (width 200, 11 depths up to 50, 100 draws) —
and any of the variants ``plain``, ``plain_bn``, ``resnet``, ``resnet_bn`` (default: all
four); ``config.variants`` also takes ``plain/norm`` or ``residual/norm[/skip]`` specs.
"""

from resnorm_jax.analysis import common, shattering

SCALES = {
    "tiny": dict(width=32, depths="1,4,16", grid=64, draws=4, draw_batch=4),
    "cpu": dict(),
    "paper": dict(width=200, depths="1,2,3,4,6,8,12,16,24,32,50", draws=100, draw_batch=25),
}


def get_config(arg=None):
  scale, variants = common.parse_config_arg(arg, SCALES, list(shattering.VARIANTS),
                                            "configs/shattering.py",
                                            custom=True)
  c = shattering.default_config()
  c.variants = "plain,plain_bn,resnet,resnet_bn"
  c.update(SCALES[scale or "cpu"])
  if variants:
    c.variants = ",".join(variants)
  return c
