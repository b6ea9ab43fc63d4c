"""Gradient scale at initialization: xskip λ ∈ {0.5, 1, 2} with and without LN after the
addition (He 2016 eq. 5-8, Liu 2020), and Post-LN vs Pre-LN Transformers (Xiong 2020).

    resnorm-analyze --config=configs/grad_scale.py --workdir=runs/grad_scale
    resnorm-analyze --config=configs/grad_scale.py:conv,paper
    resnorm-analyze --config=configs/grad_scale.py \
        --config.transformer.variants=post_ln,pre_ln,xskip_ln:2,deepnorm

Arguments (comma-separated): at most one scale — ``cpu`` (default: 16 units of width 16;
6+6-layer Transformer of width 64; 4 draws; ~1 min), ``tiny`` (tests), ``paper`` (54 units
of width 64 = ResNet-110's unit count; Transformer base 6+6, d_model 512; 16 draws) — and
optionally ``conv`` or ``transformer`` to run only that part.
"""

from resnorm_jax.analysis import common, grad_scale

SCALES = {
    "tiny": dict(draws=2, conv=dict(units=4, width=8, spatial=4, batch=4),
                 transformer=dict(layers=2, d_model=16, num_heads=2, d_ff=32, vocab=32,
                                  batch=2, length=8)),
    "cpu": dict(),
    "paper": dict(draws=16, conv=dict(units=54, width=64, spatial=8, batch=32),
                  transformer=dict(layers=6, d_model=512, num_heads=8, d_ff=2048,
                                   vocab=8000, batch=16, length=32)),
}
PARTS = ("conv", "transformer")


def get_config(arg=None):
  scale, parts = common.parse_config_arg(arg, SCALES, PARTS, "configs/grad_scale.py")
  c = grad_scale.default_config()
  c.update(SCALES[scale or "cpu"])
  if parts:
    if "conv" not in parts:
      c.conv.variants = ""
    if "transformer" not in parts:
      c.transformer.variants = ""
  return c
