"""Figures of the analyses (matplotlib, Agg backend): one line per variant, the band
between the 10th and 90th percentiles over draws."""

from __future__ import annotations

import io

import numpy as np

from resnorm_jax import storage


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _band(ax, x, agg, label, color, *, transform=lambda v: v, **kw):
  mean = transform(np.asarray(agg["mean"]))
  ax.plot(x, mean, label=label, color=color, lw=1.8, **kw)
  if "p10" in agg and len(x) > 1:
    ax.fill_between(x, transform(np.asarray(agg["p10"])), transform(np.asarray(agg["p90"])),
                    color=color, alpha=0.15, lw=0)


def _colors(n):
  plt = _pyplot()
  cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
  return [cmap(i % cmap.N) for i in range(n)]


def _save(fig, workdir, name, title=""):
  """Writes ``fig`` (with ``title`` over its panels, when given) as ``workdir/name``."""
  path = storage.join(workdir, name)
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  buffer = io.BytesIO()      # rendered in memory, then one write: a local file or an object
  fig.savefig(buffer, format="png", dpi=150)
  _pyplot().close(fig)
  storage.write_atomic(path, buffer.getvalue())
  return path


def moments_figures(results: dict, workdir: str, title: str = "") -> list[str]:
  """moments_chi.png (χ vs depth, linear and log depth), moments_reff.png (r_eff of signal
  and noise), moments_kurtosis.png."""
  plt = _pyplot()
  variants = results["variants"]
  colors = _colors(len(variants))
  paths = []

  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for (name, r), color in zip(variants.items(), colors):
    layer = np.asarray(r["layer"], float)
    fit = r["fits"]["log_chi"]
    label = (f"{name} (×{fit['exponential']['factor']:.3f}/layer, "
             f"l^{fit['power']['exponent']:.2f})")
    _band(axes[0], layer, r["log_chi"], label, color)
    keep = layer > 0
    _band(axes[1], layer[keep], {k: np.asarray(v)[keep] for k, v in r["log_chi"].items()},
          name, color)
  axes[0].set(xlabel="depth l (conv layers)", ylabel="log χ^l",
              title="log χ vs l  (exponential growth: a straight line)")
  axes[1].set(xlabel="depth l (conv layers, log scale)", ylabel="log χ^l", xscale="log",
              title="log χ vs log l  (power law: a straight line)")
  axes[0].legend(fontsize=7)
  paths.append(_save(fig, workdir, "moments_chi.png", title))

  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for (name, r), color in zip(variants.items(), colors):
    layer = np.asarray(r["layer"], float)
    _band(axes[0], layer, r["reff_signal"], name, color)
    _band(axes[1], layer, r["reff_noise"], name, color)
  for ax, what in zip(axes, ("signal x", "noise dx")):
    ax.set(xlabel="depth l (conv layers)", ylabel="r_eff = tr C / λ_max", yscale="log",
           title=f"effective rank of the {what}")
    ax.axhline(1.0, color="k", lw=0.6, ls="--")
  axes[0].legend(fontsize=8)
  paths.append(_save(fig, workdir, "moments_reff.png"))

  fig, ax = plt.subplots(figsize=(5.5, 4.2))
  for (name, r), color in zip(variants.items(), colors):
    _band(ax, np.asarray(r["layer"], float), r["kurtosis"], name, color)
  ax.axhline(3.0, color="k", lw=0.6, ls="--")
  ax.set(xlabel="depth l (conv layers)", ylabel="channel kurtosis μ4/μ2²", yscale="log",
         title="kurtosis of the unit outputs (3 = Gaussian)")
  ax.legend(fontsize=8)
  paths.append(_save(fig, workdir, "moments_kurtosis.png"))
  return paths


def shattering_figures(results: dict, workdir: str, title: str = "") -> list[str]:
  """shattering_corr.png (ρ vs depth) and shattering_gradients.png (g(x) of one draw)."""
  plt = _pyplot()
  variants = results["variants"]
  colors = _colors(len(variants))
  paths = []
  fig, ax = plt.subplots(figsize=(6, 4.4))
  for (name, r), color in zip(variants.items(), colors):
    fit = r["fits"]["corr"]
    label = (f"{name} (exp {fit['exponential']['rate']:.3f}/layer, "
             f"pow {fit['power']['exponent']:.2f}; {fit['better']})")
    _band(ax, np.asarray(r["depth"], float), r["corr"], label, color, marker="o", ms=3)
  ax.set(xlabel="depth L (log scale)", ylabel="lag-1 correlation of ∂f/∂x", xscale="log",
         title=title or "shattered gradients: correlation of neighbouring gradients")
  ax.axhline(0.0, color="k", lw=0.6, ls="--")
  ax.legend(fontsize=7)
  paths.append(_save(fig, workdir, "shattering_corr.png"))

  grid = np.asarray(results["grid"])
  fig, axes = plt.subplots(1, len(variants), figsize=(3.6 * len(variants), 3.2),
                           squeeze=False)
  for ax, (name, r) in zip(axes[0], variants.items()):
    examples = r["example_gradients"]
    for depth in (min(examples, key=int), max(examples, key=int)):
      g = np.asarray(examples[depth])
      ax.plot(grid, g / (np.std(g) + 1e-30), lw=0.8, label=f"L={depth}")
    ax.set(title=name, xlabel="input x", ylabel="∂f/∂x (standardized)")
    ax.legend(fontsize=7)
  paths.append(_save(fig, workdir, "shattering_gradients.png"))
  return paths


def grad_scale_figures(results: dict, workdir: str, title: str = "") -> list[str]:
  """grad_scale_conv.png and grad_scale_transformer.png."""
  plt = _pyplot()
  paths = []
  if results["conv"]:
    conv = results["conv"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for (spec, r), color in zip(conv.items(), _colors(len(conv))):
      unit = np.asarray(r["unit"], float)
      label = f"{spec} (×{r['growth_per_unit']:.2f}/unit)"
      _band(axes[0], unit, r["grad_x_rel"], label, color)
      _band(axes[1], unit[:-1], r["grad_w"], spec, color)
    axes[0].set(xlabel="unit l (0 = input)", ylabel="|∂L/∂x_l| / |∂L/∂x_L|", yscale="log",
                title="gradient reaching unit l")
    axes[1].set(xlabel="unit l", ylabel="|∂L/∂θ_l|", yscale="log",
                title="parameter gradient per unit")
    axes[0].legend(fontsize=7)
    paths.append(_save(fig, workdir, "grad_scale_conv.png", title))
  if results["transformer"]:
    tf = results["transformer"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for (spec, r), color in zip(tf.items(), _colors(len(tf))):
      layer = np.asarray(r["layer"], float)
      for ax, stack in zip(axes, ("encoder", "decoder")):
        _band(ax, layer, r[stack]["ffn_w2"], spec, color, marker="o", ms=3)
    for ax, stack in zip(axes, ("encoder", "decoder")):
      ax.set(xlabel="layer", ylabel="|∂L/∂W₂| (FFN)", yscale="log",
             title=f"Transformer {stack} at initialization")
      ax.legend(fontsize=8)
    paths.append(_save(fig, workdir, "grad_scale_transformer.png"))
  return paths


def layer_stats_figures(records: list[dict], workdir: str, title: str = "",
                        max_lines: int = 12) -> list[str]:
  """layer_stats_depth.png: from a training run's ``layer_stats.jsonl`` records, against
  depth (forward order), one line per logged step (at most ``max_lines``, evenly spaced,
  coloured early → late): the gradient norm and the relative update ‖Δθ‖/‖θ‖ of each
  layer, the std and the kurtosis of each residual unit's output."""
  plt = _pyplot()
  if len(records) > max_lines:
    records = [records[i] for i in np.linspace(0, len(records) - 1, max_lines).astype(int)]
  colors = plt.get_cmap("viridis")(np.linspace(0, 1, len(records)))
  as_array = lambda values: np.array(values, dtype=float)   # null (non-finite) -> nan
  panels = [("layers", lambda t: as_array(t["grad_norm"]), "gradient norm ‖g‖", "log"),
            ("layers", lambda t: as_array(t["update_norm"]) / as_array(t["param_norm"]),
             "relative update ‖Δθ‖ / ‖θ‖", "log"),
            ("activations", lambda t: as_array(t["std"]), "std of the unit output", "log"),
            ("activations", lambda t: as_array(t["kurtosis"]), "channel kurtosis μ4/μ2²",
             "linear")]
  fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
  for ax, (section, value, label, scale) in zip(axes.flat, panels):
    for record, color in zip(records, colors):
      ax.plot(value(record[section]), color=color, lw=1.2, label=f"step {record['step']}")
    names = records[-1][section]["names"] if records else []
    ticks = np.unique(np.linspace(0, max(len(names) - 1, 0), min(len(names), 8)).astype(int))
    ax.set_xticks(ticks, [names[i] for i in ticks] if names else [], rotation=30, ha="right",
                  fontsize=7)
    ax.set(ylabel=label, yscale=scale, xlabel="layer" if section == "layers" else "unit")
  axes[1, 1].axhline(3.0, color="k", lw=0.6, ls="--")
  axes[0, 0].legend(fontsize=7)
  return [_save(fig, workdir, "layer_stats_depth.png", title)]


def sweep_figure(rows: list[dict], workdir: str, title: str = "",
                 name: str = "results.png") -> str:
  """results.png of a multi-seed sweep: one line per variant (top to bottom in the table's
  order), each finished run a dot (spread vertically so equal values stay visible), the
  median a black bar and the published number a red diamond; the x axis is the rows'
  metric, named by its label (the task's: test error %, test BLEU, ...).  ``rows``:
  resnorm_jax.sweep.collect_rows."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.42 * len(rows)))
  colors = _colors(len(rows))
  for i, (row, color) in enumerate(zip(rows, colors)):
    y = len(rows) - 1 - i
    values = np.asarray(row["values"], float)
    if len(values):
      offsets = np.linspace(-0.17, 0.17, len(values)) if len(values) > 1 else np.zeros(1)
      ax.plot([row["median"]] * 2, [y - 0.3, y + 0.3], color="black", lw=2.2, zorder=3,
              label="median" if i == 0 else None)
      ax.scatter(values, y + offsets, s=22, color=color, alpha=0.85, edgecolors="none",
                 zorder=4, label="run (one seed)" if i == 0 else None)   # over the bar
    if row.get("published") is not None:
      ax.scatter([row["published"]], [y], marker="D", s=46, facecolors="none",
                 edgecolors="red", linewidths=1.5, zorder=5, label="published")
  handles, labels = ax.get_legend_handles_labels()
  unique = dict(zip(labels, handles))
  ax.legend(unique.values(), unique.keys(), fontsize=8, loc="upper left",
            bbox_to_anchor=(1.01, 1.0), frameon=False)   # outside: never over a dot
  ax.set_yticks(range(len(rows)))
  ax.set_yticklabels([f"{r['variant']}  (n={r['n']})" for r in reversed(rows)], fontsize=8)
  ax.set_ylim(-0.6, len(rows) - 0.4)
  ax.set_xlabel(f"final {rows[0]['label']}" if rows else "final value")
  ax.grid(axis="x", alpha=0.3)
  # Written atomically (a temporary file renamed; on a bucket one upload): array tasks of
  # one sweep may write it at once.
  return _save(fig, workdir, name, title)
