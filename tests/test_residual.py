"""Residual unit orderings, shortcuts and skip+norm combinators against SPEC.md 2-3."""

import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnorm_jax.layers import (COMBINATORS, REGISTRIES, SHORTCUTS, UNIT_ORDERINGS, ConfigError,
                                ConvUnit, DepthInfo, conv_unit, deepnorm_constants,
                                make_combinator)

EPS = 1e-5
TOL = dict(rtol=1e-4, atol=1e-4)
REPO = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------
# Independent references.
# ----------------------------------------------------------------------------------------
def conv(x, kernel, stride=1):
  """NHWC / HWIO convolution with symmetric (k−1)/2 padding, straight from lax."""
  k = kernel.shape[0]
  pad = (k - 1) // 2
  return np.asarray(jax.lax.conv_general_dilated(
      jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32), (stride, stride),
      ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST), np.float64)


def relu(x):
  return np.maximum(x, 0.0)


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def np_norm(kind, x, p, mask=None):
  """LayerNorm (per image over H,W,C; per token over D) or train-mode BatchNorm."""
  x = np.asarray(x, np.float64)
  if kind == "layer":
    axes = (1, 2, 3) if x.ndim == 4 else (x.ndim - 1,)
    mask = None
  elif kind == "batch":
    axes = tuple(range(x.ndim - 1))
  else:
    raise ValueError(kind)
  if mask is None:
    mean, var = x.mean(axes, keepdims=True), x.var(axes, keepdims=True)
  else:
    m = np.broadcast_to(np.asarray(mask, np.float64)[..., None], x.shape)
    count = m.sum(axes, keepdims=True)
    mean = (x * m).sum(axes, keepdims=True) / count
    var = ((x - mean) ** 2 * m).sum(axes, keepdims=True) / count
  y = (x - mean) / np.sqrt(var + EPS)
  return y * np.asarray(p["scale"], np.float64) + np.asarray(p["bias"], np.float64)


def randomize_params(params, seed=1):
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return jnp.asarray(rng.uniform(0.5, 1.5, size=leaf.shape), leaf.dtype)
    if "bias" in name and "gate" not in name:
      return jnp.asarray(0.5 * rng.normal(size=leaf.shape), leaf.dtype)
    return leaf

  return jax.tree_util.tree_map_with_path(fill, params)


def random_x(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


# ----------------------------------------------------------------------------------------
# Unit orderings (He et al. 2016, Fig. 4).
# ----------------------------------------------------------------------------------------
def ref_unit(ordering, p, x, norm, *, bottleneck, stride=1):
  """SPEC.md section 2, written out per ordering from the unit's own parameters.

  ``norm_i`` is the i-th norm of the branch in execution order, ``conv_i`` the i-th conv;
  the stride sits on the first 3x3 conv.
  """
  x = np.asarray(x, np.float64)
  num_convs = 3 if bottleneck else 2
  strides = [1, stride, 1] if bottleneck else [stride, 1]
  c = lambda i, h: conv(h, p[f"conv_{i}"]["kernel"], strides[i])
  n = lambda name, h: np_norm(norm, h, p[name])
  last = num_convs - 1

  if ordering in ("original", "bn_after_add", "relu_before_add", "plain"):
    # conv -> BN -> ReLU for every conv but the last.
    h = x
    for i in range(last):
      h = relu(n(f"norm_{i}", c(i, h)))
    h = c(last, h)
    if ordering == "original":  # ReLU(x + BN(conv(.)))
      return relu(x + n(f"norm_{last}", h))
    if ordering == "bn_after_add":  # ReLU(BN(x + conv(.)))
      return relu(n("norm_after_add", x + h))
    if ordering == "relu_before_add":  # x + ReLU(BN(conv(.)))
      return x + relu(n(f"norm_{last}", h))
    return relu(n(f"norm_{last}", h))  # plain: no shortcut
  if ordering == "relu_preact":  # x + BN(conv(ReLU(BN(conv(ReLU(x))))))
    h = x
    for i in range(num_convs):
      h = n(f"norm_{i}", c(i, relu(h)))
    return x + h
  if ordering == "full_preact":  # x + conv(ReLU(BN(conv(ReLU(BN(x))))))
    h = x
    for i in range(num_convs):
      h = c(i, relu(n(f"norm_{i}", h)))
    return x + h
  raise ValueError(ordering)


ORDERINGS = ["original", "bn_after_add", "relu_before_add", "relu_preact", "full_preact",
             "plain"]


def test_every_unit_ordering_is_covered():
  assert set(ORDERINGS) == set(UNIT_ORDERINGS.names())


def init_unit(unit, x, seed=0):
  variables = dict(unit.init(jax.random.key(seed), x, train=True))
  variables["params"] = randomize_params(variables["params"], seed + 1)
  return variables


def apply_unit(unit, variables, x, *, train=True, rngs=None):
  y, _ = unit.apply(variables, x, train=train, rngs=rngs, mutable=["batch_stats"])
  return np.asarray(y)


@pytest.mark.parametrize("bottleneck", [False, True], ids=["basic", "bottleneck"])
@pytest.mark.parametrize("norm", ["layer", "batch"])
@pytest.mark.parametrize("ordering", ORDERINGS)
def test_unit_ordering_formula(ordering, norm, bottleneck):
  x = random_x((2, 4, 4, 8))
  unit = conv_unit(8, bottleneck=bottleneck, ordering=ordering, norm=norm)
  variables = init_unit(unit, x)
  p = variables["params"]
  kernels = sorted(k for k in p if k.startswith("conv_"))
  assert len(kernels) == (3 if bottleneck else 2)
  if bottleneck:
    assert [p[k]["kernel"].shape for k in kernels] == [(1, 1, 8, 2), (3, 3, 2, 2), (1, 1, 2, 8)]
  assert "shortcut" not in p or not p["shortcut"]  # identity: no parameters
  y = apply_unit(unit, variables, x)
  np.testing.assert_allclose(y, ref_unit(ordering, p, x, norm, bottleneck=bottleneck), **TOL)


# ----------------------------------------------------------------------------------------
# Shortcut variants (He et al. 2016, Table 1) on unit (a).
# ----------------------------------------------------------------------------------------
def test_every_shortcut_is_covered():
  covered = {"identity", "constant", "exclusive_gate", "shortcut_gate", "conv1x1", "dropout"}
  assert covered == set(SHORTCUTS.names())


def original_branch(p, x):
  """F(x) of unit (a) with LayerNorm: BN(conv(ReLU(BN(conv(x)))))."""
  h = relu(np_norm("layer", conv(x, p["conv_0"]["kernel"]), p["norm_0"]))
  return np_norm("layer", conv(h, p["conv_1"]["kernel"]), p["norm_1"])


@pytest.mark.parametrize("spec,a,b", [("identity", 1.0, 1.0), ("constant", 0.5, 0.5),
                                      ("constant:0.5,1", 0.5, 1.0),
                                      ("constant:2,0.25", 2.0, 0.25)])
def test_constant_and_identity_shortcuts(spec, a, b):
  x = random_x((2, 4, 4, 8))
  unit = conv_unit(8, ordering="original", norm="layer", shortcut=spec)
  variables = init_unit(unit, x)
  p = variables["params"]
  y = apply_unit(unit, variables, x)
  np.testing.assert_allclose(y, relu(a * np.asarray(x) + b * original_branch(p, x)), **TOL)


@pytest.mark.parametrize("kind", ["exclusive_gate", "shortcut_gate"])
def test_gated_shortcuts(kind):
  x = random_x((2, 4, 4, 8))
  unit = conv_unit(8, ordering="original", norm="layer", shortcut=kind)
  variables = init_unit(unit, x)
  gate = variables["params"]["shortcut"]["gate"]
  np.testing.assert_array_equal(gate["bias"], np.full(8, -6.0))  # b_g init -6
  p = variables["params"]
  x64 = np.asarray(x, np.float64)
  g = sigmoid(x64 @ np.asarray(gate["kernel"], np.float64) + np.asarray(gate["bias"]))
  assert g.max() < 0.2  # nearly closed at init: sigmoid(-6 + ...)
  f = original_branch(p, x)
  expected = relu((1 - g) * x64 + (g * f if kind == "exclusive_gate" else f))
  np.testing.assert_allclose(apply_unit(unit, variables, x), expected, **TOL)


def test_gate_bias_argument():
  x = random_x((2, 4, 4, 8))
  unit = conv_unit(8, ordering="original", norm="layer", shortcut="exclusive_gate:-2")
  variables = unit.init(jax.random.key(0), x)
  np.testing.assert_array_equal(variables["params"]["shortcut"]["gate"]["bias"],
                                np.full(8, -2.0))


def test_conv1x1_shortcut():
  x = random_x((2, 4, 4, 8))
  unit = conv_unit(8, ordering="original", norm="layer", shortcut="conv1x1")
  variables = init_unit(unit, x)
  p = variables["params"]
  w = p["shortcut"]["projection"]["kernel"]
  assert w.shape == (1, 1, 8, 8)
  expected = relu(conv(x, w) + original_branch(p, x))
  np.testing.assert_allclose(apply_unit(unit, variables, x), expected, **TOL)


def test_dropout_shortcut_train_vs_eval():
  x = random_x((4, 4, 4, 8))
  unit = conv_unit(8, ordering="full_preact", norm="layer", shortcut="dropout")
  variables = init_unit(unit, x)
  p = variables["params"]
  x64 = np.asarray(x, np.float64)
  f = ref_unit("full_preact", p, x, "layer", bottleneck=False) - x64
  # Eval: the shortcut is the identity.
  np.testing.assert_allclose(apply_unit(unit, variables, x, train=False), x64 + f, **TOL)
  # Train: each shortcut entry is dropped (0) or kept and scaled by 1/(1-p) = 2.
  s = apply_unit(unit, variables, x, rngs={"dropout": jax.random.key(3)}) - f
  dropped = np.isclose(s, 0.0, atol=1e-4)
  kept = np.isclose(s, 2 * x64, atol=1e-4)
  assert np.all(dropped | kept)
  assert 0.3 < dropped.mean() < 0.7
  # A different key drops different entries.
  s2 = apply_unit(unit, variables, x, rngs={"dropout": jax.random.key(4)}) - f
  assert not np.allclose(s, s2)


@pytest.mark.parametrize("strides,features", [(2, 16), (2, 8), (1, 16)])
@pytest.mark.parametrize("ordering", ["original", "relu_preact", "full_preact"])
def test_projection_shortcut(ordering, strides, features):
  x = random_x((2, 4, 4, 8))
  unit = conv_unit(features, strides=strides, ordering=ordering, norm="layer")
  variables = init_unit(unit, x)
  p = variables["params"]
  w = p["shortcut"]["projection"]["kernel"]
  assert w.shape == (1, 1, 8, features)
  y = apply_unit(unit, variables, x)
  assert y.shape == (2, 4 // strides, 4 // strides, features)
  x64 = np.asarray(x, np.float64)
  if ordering == "original":
    h = relu(np_norm("layer", conv(x64, p["conv_0"]["kernel"], strides), p["norm_0"]))
    f = np_norm("layer", conv(h, p["conv_1"]["kernel"]), p["norm_1"])
    expected = relu(conv(x64, w, strides) + f)
  elif ordering == "relu_preact":  # the leading ReLU is shared by projection and branch
    pre = relu(x64)
    h = np_norm("layer", conv(pre, p["conv_0"]["kernel"], strides), p["norm_0"])
    expected = conv(pre, w, strides) + np_norm("layer", conv(relu(h), p["conv_1"]["kernel"]),
                                               p["norm_1"])
  else:  # the pre-activation BN-ReLU is shared by the projection and the branch
    pre = relu(np_norm("layer", x64, p["norm_0"]))
    h = relu(np_norm("layer", conv(pre, p["conv_0"]["kernel"], strides), p["norm_1"]))
    expected = conv(pre, w, strides) + conv(h, p["conv_1"]["kernel"])
  np.testing.assert_allclose(y, expected, **TOL)


def test_unit_with_xskip_combinator():
  x = random_x((2, 4, 4, 8))
  unit = conv_unit(8, ordering="full_preact", norm="layer", skip="xskip", skip_lambda=2.0)
  variables = init_unit(unit, x)
  x64 = np.asarray(x, np.float64)
  f = ref_unit("full_preact", variables["params"], x, "layer", bottleneck=False) - x64
  np.testing.assert_allclose(apply_unit(unit, variables, x), 2 * x64 + f, **TOL)


# ----------------------------------------------------------------------------------------
# Skip + norm combinators (Liu et al. 2020 and related designs) on (B, T, D).
# ----------------------------------------------------------------------------------------
B, T, D = 3, 4, 8
BRANCH_CALLS = []  # one entry per run of the Dense branch


class Block(nn.Module):
  """A combinator around a Dense branch; counts how often the branch runs."""
  spec: str
  lam: float | None = None
  depth: DepthInfo | None = None

  @nn.compact
  def __call__(self, x, *, train=True, mask=None):
    dense = nn.Dense(D, name="branch")

    def branch(h):
      BRANCH_CALLS.append(1)
      return dense(h)

    combinator = make_combinator(self.spec, lam=self.lam, depth=self.depth, name="skip")
    return combinator(x, branch, train=train, mask=mask)


def init_block(block, x, mask=None):
  variables = dict(block.init(jax.random.key(0), x, train=True, mask=mask))
  variables["params"] = randomize_params(variables["params"])
  return variables


def apply_block(block, variables, x, mask=None):
  y, _ = block.apply(variables, x, train=True, mask=mask, mutable=["batch_stats"])
  return np.asarray(y)


def dense(p, h):
  return np.asarray(h, np.float64) @ np.asarray(p["branch"]["kernel"], np.float64) + \
      np.asarray(p["branch"]["bias"], np.float64)


def ref_combinator(name, lam, p, x, mask=None):
  """SPEC.md section 3 formulas; ``p`` is the Block's parameter tree."""
  x = np.asarray(x, np.float64)
  sp = p.get("skip", {})
  norm = lambda kind, i, h: np_norm(kind, h, sp[f"post_norm_{i}"], mask)
  if name == "skip":
    return x + dense(p, x)
  if name == "xskip":
    return lam * x + dense(p, x)
  if name in ("xskip_ln", "xskip_bn"):
    return norm("layer" if name == "xskip_ln" else "batch", 0, lam * x + dense(p, x))
  if name in ("rskip_ln", "rskip_bn"):
    kind = "layer" if name == "rskip_ln" else "batch"
    f = dense(p, x)  # computed once
    g = norm(kind, 0, x + f)
    for k in range(1, int(lam)):
      g = norm(kind, k, x + g)
    return g
  if name == "pre_ln":
    return x + dense(p, np_norm("layer", x, sp["pre_norm"]))
  if name == "post_ln":
    return norm("layer", 0, x + dense(p, x))
  if name in ("rezero", "skipinit"):
    return x + float(sp["branch_gain"]) * dense(p, x)
  if name == "deepnorm":
    return norm("layer", 0, lam * x + dense(p, x))
  raise ValueError(name)


# (spec, lam kwarg, name for the reference, λ for the reference)
COMBINATOR_CASES = [
    ("skip", None, "skip", None),
    ("xskip", 0.5, "xskip", 0.5),
    ("xskip:2", None, "xskip", 2.0),
    ("xskip", None, "xskip", 1.0),
    ("xskip_ln:0.5", None, "xskip_ln", 0.5),
    ("xskip_ln", 2.0, "xskip_ln", 2.0),
    ("xskip_bn:0.5", None, "xskip_bn", 0.5),
    ("xskip_bn", 2.0, "xskip_bn", 2.0),
    ("rskip_ln", 1, "rskip_ln", 1),
    ("rskip_ln:2", None, "rskip_ln", 2),
    ("rskip_ln", 3, "rskip_ln", 3),
    ("rskip_bn:1", None, "rskip_bn", 1),
    ("rskip_bn", 2, "rskip_bn", 2),
    ("rskip_bn:3", 3, "rskip_bn", 3),
    ("pre_ln", None, "pre_ln", None),
    ("post_ln", None, "post_ln", None),
    ("rezero", None, "rezero", None),
    ("skipinit", None, "skipinit", None),
    ("skipinit:0.25", None, "skipinit", None),
]


def test_every_combinator_is_covered():
  covered = {case[2] for case in COMBINATOR_CASES} | {"deepnorm"}
  assert covered == set(COMBINATORS.names())


@pytest.mark.parametrize("spec,lam,name,ref_lam", COMBINATOR_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in COMBINATOR_CASES])
def test_combinator_formula(spec, lam, name, ref_lam):
  x = random_x((B, T, D))
  block = Block(spec, lam=lam)
  variables = init_block(block, x)
  p = variables["params"]
  if name in ("rskip_ln", "rskip_bn"):  # each recursion step has its own norm
    assert sorted(p["skip"]) == [f"post_norm_{k}" for k in range(ref_lam)]
  if name in ("rezero", "skipinit"):
    init = 0.25 if spec == "skipinit:0.25" else 0.0
    assert float(p["skip"]["branch_gain"]) == init
    p["skip"]["branch_gain"] = jnp.asarray(0.7, jnp.float32)
  del BRANCH_CALLS[:]
  y = apply_block(block, variables, x)
  assert len(BRANCH_CALLS) == 1  # F is computed once
  np.testing.assert_allclose(y, ref_combinator(name, ref_lam, p, x), **TOL)


def test_rskip_steps_use_distinct_norm_parameters():
  """Swapping two recursion steps' parameters changes the output of rskip_ln:2."""
  x = random_x((B, T, D))
  block = Block("rskip_ln:2")
  variables = init_block(block, x)
  y = apply_block(block, variables, x)
  swapped = jax.tree.map(lambda a: a, variables)
  skip = swapped["params"]["skip"]
  skip["post_norm_0"], skip["post_norm_1"] = skip["post_norm_1"], skip["post_norm_0"]
  assert not np.allclose(y, apply_block(block, swapped, x), atol=1e-3)


@pytest.mark.parametrize("spec", ["rezero", "skipinit"])
def test_zero_init_gain_is_identity_at_init(spec):
  x = random_x((B, T, D))
  block = Block(spec)
  variables = block.init(jax.random.key(0), x)
  np.testing.assert_array_equal(apply_block(block, variables, x), np.asarray(x))


@pytest.mark.parametrize("depth", [DepthInfo("encoder_only", 6),
                                   DepthInfo("encoder", 6, 6),
                                   DepthInfo("decoder", 6, 6)])
def test_deepnorm(depth):
  alpha, beta = deepnorm_constants(depth)
  n, m = depth.num_encoder, depth.num_decoder
  if depth.stack == "encoder_only":  # DeepNet Table 1
    expected = ((2 * n) ** 0.25, (8 * n) ** -0.25)
  elif depth.stack == "encoder":
    expected = (0.81 * (n ** 4 * m) ** (1 / 16), 0.87 * (n ** 4 * m) ** (-1 / 16))
  else:
    expected = ((3 * m) ** 0.25, (12 * m) ** -0.25)
  np.testing.assert_allclose((alpha, beta), expected, rtol=1e-12)
  assert alpha > 1 and beta < 1
  assert make_combinator("deepnorm", depth=depth).init_scale == pytest.approx(beta)
  x = random_x((B, T, D))
  block = Block("deepnorm", depth=depth)
  variables = init_block(block, x)
  y = apply_block(block, variables, x)
  np.testing.assert_allclose(y, ref_combinator("deepnorm", alpha, variables["params"], x), **TOL)


def test_deepnorm_scales_unit_branch_init():
  """ConvUnit multiplies every branch conv's init by DeepNorm's β."""
  x = random_x((2, 4, 4, 8))
  depth = DepthInfo("encoder_only", 50)
  _, beta = deepnorm_constants(depth)
  plain = conv_unit(8, ordering="full_preact", norm="layer", skip="skip")
  deep = conv_unit(8, ordering="full_preact", norm="layer", skip="deepnorm", depth=depth)
  k_plain = plain.init(jax.random.key(0), x)["params"]["conv_0"]["kernel"]
  k_deep = deep.init(jax.random.key(0), x)["params"]["conv_0"]["kernel"]
  np.testing.assert_allclose(k_deep, beta * np.asarray(k_plain), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("a,b", [("rskip_ln:1", "post_ln"), ("xskip:1", "skip"),
                                 ("xskip_ln:1", "post_ln"), ("rskip_bn:1", "xskip_bn:1")])
def test_combinator_identities(a, b):
  x = random_x((B, T, D))
  block_a, block_b = Block(a), Block(b)
  variables = init_block(block_a, x)
  assert (jax.tree.structure(block_a.init(jax.random.key(0), x)) ==
          jax.tree.structure(block_b.init(jax.random.key(0), x)))
  np.testing.assert_allclose(apply_block(block_a, variables, x),
                             apply_block(block_b, variables, x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("spec,lam", [("rskip_ln", 0), ("rskip_ln", 1.5), ("rskip_ln:0", None),
                                      ("rskip_ln:1.5", None), ("rskip_bn", -1),
                                      ("xskip", -0.5), ("xskip:abc", None)])
def test_bad_lambda(spec, lam):
  with pytest.raises(ConfigError, match="lambda"):
    make_combinator(spec, lam=lam)


@pytest.mark.parametrize("spec,lam", [("skip", 2.0), ("pre_ln", 2.0), ("post_ln", 0.5),
                                      ("rezero", 1.0), ("deepnorm", 2.0), ("skipinit", 1.0),
                                      ("skip:2", None), ("pre_ln:2", None)])
def test_lambda_rejected_where_it_does_not_apply(spec, lam):
  with pytest.raises(ConfigError, match=spec.split(":")[0]):
    make_combinator(spec, lam=lam)


def test_spec_and_lambda_must_agree():
  with pytest.raises(ConfigError, match="twice"):
    make_combinator("xskip:2", lam=3.0)
  with pytest.raises(ConfigError):
    make_combinator("rskip_ln:2", lam=3)
  assert make_combinator("xskip:2", lam=2.0).x_scale == 2.0
  assert make_combinator("rskip_ln:3", lam=3).repeats == 3


def test_unknown_combinator_lists_choices():
  with pytest.raises(ConfigError) as info:
    make_combinator("rskip_lm:2")
  assert "rskip_lm" in str(info.value)
  for name in COMBINATORS.names():
    assert name in str(info.value)


@pytest.mark.parametrize("spec,name,lam", [("xskip_bn:2", "xskip_bn", 2.0),
                                           ("rskip_bn:2", "rskip_bn", 2)])
def test_padding_mask_reaches_bn_in_combinators(spec, name, lam):
  x = np.asarray(random_x((B, 6, D), seed=4))
  mask = np.arange(6)[None, :] < np.array([6, 3, 1])[:, None]
  huge = x.copy()
  huge[~mask] = 1e6
  block = Block(spec)
  variables = init_block(block, jnp.asarray(x), jnp.asarray(mask))
  p = variables["params"]
  expected = ref_combinator(name, lam, p, x, mask)
  for inp in (x, huge):
    y = apply_block(block, variables, jnp.asarray(inp), jnp.asarray(mask))
    np.testing.assert_allclose(y[mask], expected[mask], **TOL)
  # Without the mask the padding changes the statistics.
  y = apply_block(block, variables, jnp.asarray(x))
  assert not np.allclose(y[mask], expected[mask], atol=1e-3)


# ----------------------------------------------------------------------------------------
# README lists every registry name.
# ----------------------------------------------------------------------------------------
def test_readme_lists_every_registry_name():
  text = (REPO / "README.md").read_text(encoding="utf-8")
  from resnorm_jax.layers import registry_markdown
  assert registry_markdown() in text, (
      "README.md's variant table is stale: paste the output of `python -m resnorm_jax.layers`")
  missing = []
  for registry in REGISTRIES:
    for name in registry.names():
      if not re.search(r"`" + re.escape(name) + r"(\[:[^`\]]*\])?`", text):
        missing.append(f"{registry.kind} {name}")
  assert not missing, f"README.md does not list: {', '.join(missing)}"


@pytest.mark.parametrize("spec,field", [("post_ln", "post_norm"), ("pre_ln", "pre_norm"),
                                        ("xskip_ln:2", "post_norm"), ("rskip_ln:2", "post_norm"),
                                        ("deepnorm", "post_norm")])
def test_layer_norm_of_ln_combinators_can_be_replaced(spec, field):
  assert getattr(make_combinator(spec), field).spec.name == "layer"
  assert getattr(make_combinator(spec, layer_norm="rms"), field).spec.name == "rms"
  # BatchNorm variants keep their BatchNorm.
  assert make_combinator("rskip_bn:2", layer_norm="rms").post_norm.spec.name == "batch"


# ----------------------------------------------------------------------------------------
# Residual-stream gradient materialization.
# ----------------------------------------------------------------------------------------
def test_materialize_grad_is_the_identity_in_value_and_gradient():
  from resnorm_jax.cpu_workarounds import materialize_grad
  x = jnp.array([[1.0, -2.0], [jnp.nan, jnp.inf]])
  f = lambda x: jnp.sum(jnp.where(jnp.isfinite(x), materialize_grad(x * 3.0) ** 2, 0.0))
  g_ref = jax.grad(lambda x: jnp.sum(jnp.where(jnp.isfinite(x), (x * 3.0) ** 2, 0.0)))(x)
  np.testing.assert_array_equal(jax.jit(materialize_grad)(x), x)
  np.testing.assert_array_equal(jax.jit(jax.grad(f))(x), g_ref)


def test_unit_gradients_are_materialized_once_per_unit_on_cpu():
  """The compiled CPU backward pass of a residual stack keeps one buffer per unit for the
  stream's gradient (a conditional each) instead of re-fusing the running sum into every
  consumer (see materialize_grad)."""
  units = 3

  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
      for i in range(units):
        x = ConvUnit(4, name=f"unit{i}")(x, train=True)
      return x

  x = jnp.ones((2, 4, 4, 4))
  model = Stack()
  variables = model.init(jax.random.key(0), x)
  loss = lambda p: jnp.sum(model.apply({**variables, "params": p}, x,
                                       mutable=["batch_stats"])[0] ** 2)
  hlo = jax.jit(jax.grad(loss)).lower(variables["params"]).compile().as_text()
  if jax.default_backend() == "cpu":
    assert hlo.count("conditional(") == units
  else:
    assert "conditional(" not in hlo
