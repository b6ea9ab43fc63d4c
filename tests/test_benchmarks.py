"""Smoke tests of the benchmark scripts: each runs end to end on tiny shapes, so none rots."""

import importlib.util
import json

import jax
import pytest

from helpers import fast_compile_options, load_benchmark as load_script


@pytest.fixture
def fast_compile():
  with fast_compile_options():
    yield


TINY = ["--preset", "tiny", "--layers", "1", "--vocab", "40", "--batch", "2", "--src_len", "6",
        "--tgt_len", "5", "--repeats", "1", "--warmup", "1", "--peak_sizes", "64"]


@pytest.mark.slow   # a benchmark's smoke run (benchmarks are measured, not tested)
def test_transformer_step_benchmark_runs_end_to_end(tmp_path, capsys, fast_compile):
  """One run of main(); the PyTorch rows when torch is installed, else --no_torch."""
  with_torch = importlib.util.find_spec("torch") is not None
  bench = load_script("transformer_step")
  out = tmp_path / "out.json"
  result = bench.main(TINY + ["--json", str(out)] + ([] if with_torch else ["--no_torch"]))
  names = [row["implementation"] for row in result["rows"]]
  assert names == (["pytorch eager"] if with_torch else []) + ["framework", "bare jit"]
  for row in result["rows"]:
    assert row["median ms"] > 0 and row["tokens/s"] > 0 and row["MFU %"] > 0
  assert result["rows"][names.index("framework")]["time / bare"] > 0
  params = result["params"]
  if with_torch:   # same architecture: same parameter count and, same weights, same loss
    assert params["pytorch"] == params["jax"]
    assert abs(result["initial_loss"]["pytorch"] - result["initial_loss"]["jax"]) < 1e-4
    assert result["rows"][0]["time / pytorch"] == 1.0
  written = json.loads(out.read_text())
  assert written["shape"]["batch"] == 2 and "environment" in written
  table = capsys.readouterr().out
  assert "| framework" in table and "time / bare" in table and "## Environment" in table


def test_transformer_flops_match_the_summary():
  """For S = T the benchmark's FLOPs are resnorm-summary's (summary.summary_inputs)."""
  from resnorm_jax import summary
  from resnorm_jax.summary import model_summary
  bench = load_script("transformer_step")
  args = bench.parse_args(["--preset", "tiny", "--vocab", "40", "--src_len", "12",
                           "--tgt_len", "12"])
  config = bench.make_config(args)
  model, inputs, kwargs, extra = summary.summary_inputs(config)
  _, _, summary_flops = model_summary(model, inputs, init_kwargs=kwargs,
                                      apply_kwargs=kwargs, extra_flops=extra)
  assert bench.forward_flops(model, 12, 12) == summary_flops
  # Attention terms with S != T: encoder S², decoder T² and T·S per layer.
  cfg = model.config
  delta = bench.forward_flops(model, 12, 7) - bench.forward_flops(model, 11, 7)
  dense_per_src_token = 2 * cfg.num_encoder_layers * (4 * cfg.d_model ** 2
                                                      + 2 * cfg.d_model * cfg.d_ff)
  dense_per_src_token += 2 * cfg.num_decoder_layers * 2 * cfg.d_model ** 2   # cross K, V
  attention = 4 * cfg.d_model * (cfg.num_encoder_layers * (12 ** 2 - 11 ** 2)
                                 + cfg.num_decoder_layers * 7 * (12 - 11))
  assert delta == dense_per_src_token + attention
