"""Signal-propagation moments (Labatie 2019): χ, r_eff and kurtosis vs depth.

    resnorm-analyze --config=configs/moments.py --workdir=runs/moments        # 4 archetypes, CPU
    resnorm-analyze --config=configs/moments.py:bn_res,paper                  # Labatie's setting
    resnorm-analyze --config=configs/moments.py:orderings --config.width=64
    resnorm-analyze --config=configs/moments.py \
        --config.variants=bn_res,full_preact/group:8/xskip_ln:2,relu_preact/layer

Arguments (comma-separated): at most one scale and any variant names or groups.
Scales: ``cpu`` (default: width 64, batch 32, 8x8 positions, 100 feed-forward layers / 200
residual layers, 10 draws; under a minute on 2 CPU cores), ``tiny`` (seconds; tests),
``large`` (width 128, batch 64, 16x16, 200 feed-forward layers / 250 residual units, 20
draws: the largest run made on CPU), ``paper`` (Labatie: width 512, batch 64, 16x16, 200
feed-forward layers, 500 residual units, 1000 draws, statistics every 5 units; for one
GPU).  Variants: ``vanilla_ff``, ``bn_ff``, ``vanilla_res``, ``bn_res`` and the groups
``archetypes`` (default), ``orderings`` (He 2016's five units with BN), ``skips`` (xskip λ,
xskip_ln, rskip_ln), ``norms`` (layer/group norm); ``config.variants`` also takes custom
``ordering/norm[/skip[/shortcut]]`` specs.

Inputs (``inputs``): images through Labatie's input layer (standardized per channel over
the batch, one random 3x3 conv of stride image size / spatial): ``photos`` (the default:
crops of 2·spatial pixels of the two photographs that ship with scikit-learn, a natural-image
stand-in that needs no download), ``cifar10`` / ``cifar100`` (the authors' inputs, 32x32 ->
16x16: ``--config.inputs=cifar10 --config.spatial=16 --config.data_dir=DIR``, read like the
training data), ``digits`` (scikit-learn's 8x8 digits); or i.i.d. Gaussian signal and noise
(``gaussian``, any ``spatial``).  Boundaries periodic as in the paper (``boundary=zero`` for
the training models' zero padding).
"""

from resnorm_jax.analysis import common, moments

SCALES = {
    "tiny": dict(width=8, spatial=4, batch=8, ff_units=3, res_units=3, draws=2, fit_start=1,
                 inputs="gaussian"),
    "cpu": dict(),
    "large": dict(width=128, spatial=8, batch=64, ff_units=100, res_units=250, draws=20,
                  tap_every=5),
    "paper": dict(width=512, spatial=8, batch=64, ff_units=100, res_units=500, draws=1000,
                  tap_every=5, eig_iters=100),
}


def get_config(arg=None):
  scale, variants = common.parse_config_arg(
      arg, SCALES, list(moments.ARCHETYPES) + list(moments.GROUPS), "configs/moments.py",
      custom=True)
  c = moments.default_config()
  c.update(SCALES[scale or "cpu"])
  if variants:
    c.variants = ",".join(variants)
  return c
