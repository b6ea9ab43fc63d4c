"""Smoke tests of the ResNet benchmark scripts: tiny settings, end to end, so they can't rot."""

import pytest

from helpers import load_benchmark as load


def test_resnet_step_benchmark_runs_and_counts_the_same_parameters(tmp_path, capsys):
  # PyTorch is the benchmark's optional reference, not a dependency (CI does not install it);
  # the run without it is covered below.
  pytest.importorskip("torch", reason="PyTorch (the optional reference) is not installed")
  out = tmp_path / "r.json"
  result = load("resnet_step").main(["--depth", "8", "--batch", "8", "--warmup", "1",
                                     "--repeats", "1", "--peak_sizes", "128",
                                     "--json", str(out)])
  assert set(result["medians_s"]) == {"framework", "bare jit", "torch channels-last",
                                      "torch nchw"}
  assert result["params"]["jax"] == result["params"]["torch"]  # the same network
  assert result["flops_per_step"] > 0 and result["peak_flops"] > 0
  assert out.exists() and "| framework" in capsys.readouterr().out


@pytest.mark.slow   # a benchmark's smoke run (benchmarks are measured, not tested)
def test_resnet_step_benchmark_without_torch():
  result = load("resnet_step").main(["--depth", "8", "--batch", "8", "--warmup", "1",
                                     "--repeats", "1", "--peak_sizes", "128", "--no_torch"])
  assert set(result["medians_s"]) == {"framework", "bare jit"}


def test_op_breakdown_classifies_both_sides(capsys):
  pytest.importorskip("torch", reason="PyTorch (the optional reference) is not installed")
  result = load("op_breakdown").main(["resnet", "--depth", "8", "--batch", "8", "--steps", "1"])
  classes = {row["op class"]: row for row in result["rows"]}
  for name in ("conv forward", "conv input grad", "conv weight grad", "step (wall)"):
    assert classes[name]["ours ms"] > 0, (name, classes)
  assert classes["conv input + weight grad"]["pytorch ms"] > 0
  assert "| conv weight grad" in capsys.readouterr().out


def test_conv_floor_benchmark_runs(capsys):
  result = load("conv_floor").main(["--batch", "2", "--repeats", "1"])
  assert len(result["rows"]) == 9 and result["totals_s"]["xla"] > 0
  assert "grad kernel" in capsys.readouterr().out


@pytest.mark.slow   # 15 small programs to compile
def test_conv_wgrad_benchmark_runs_and_its_variants_agree():
  # main() asserts that every formulation's weight gradient matches autodiff's.
  result = load("conv_wgrad").main(["--shapes", "2x4x4x2,2x3x5x3", "--rounds", "1"])
  programs = {row["program"] for row in result["rows"]}
  assert programs == {"autodiff", "taps", "flat", "tflat", "im2col_t", "hwn", "conv3d"}
  parts = load("conv_wgrad").main(["--shapes", "2x4x4x2", "--rounds", "1", "--parts"])
  assert len(parts["rows"]) == 5 and all(row["min ms"] > 0 for row in parts["rows"])
