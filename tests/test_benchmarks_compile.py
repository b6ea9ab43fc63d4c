"""Smoke tests of benchmarks/compile_time.py, input_pipeline.py and moments_throughput.py:
each main() runs end to end on tiny settings, so none rots."""

import json
import math

import jax
import pytest

from helpers import load_benchmark as load_script


@pytest.fixture
def fast_compile(monkeypatch):
  """Tiny programs run a few times: XLA code quality traded for compile time (in this
  process and in the benchmark's worker processes, which inherit the environment)."""
  previous = (jax.config.jax_optimization_level,
              jax.config.values.get("jax_disable_most_optimizations", False))
  jax.config.update("jax_optimization_level", "O0")
  jax.config.update("jax_disable_most_optimizations", True)
  monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "true")
  yield
  jax.config.update("jax_optimization_level", previous[0])
  jax.config.update("jax_disable_most_optimizations", previous[1])


@pytest.mark.slow   # the default suite: the in-process case below
def test_compile_time_cold_case_in_a_fresh_process(tmp_path, capsys, fast_compile):
  bench = load_script("compile_time")
  out = tmp_path / "compile.json"
  result = bench.main(["--depths", "20", "--modes", "scanned", "--width", "4", "--data",
                       "digits", "--batch", "16", "--steps", "1", "--json", str(out)])
  (row,) = result["rows"]
  assert "error" not in row, row
  for key in ("init s", "trace s", "lower s", "compile s", "first step s", "step s"):
    assert row[key] > 0, key
  assert math.isclose(row["cold s"], row["init s"] + row["trace s"] + row["lower s"]
                      + row["compile s"])
  assert json.loads(out.read_text())["rows"][0]["mode"] == "scanned"
  assert "Cold start of the CIFAR ResNet train step" in capsys.readouterr().out


def test_compile_time_ratios_and_skipped_steps_in_process(fast_compile):
  bench = load_script("compile_time")
  result = bench.main(["--depths", "8", "--modes", "unrolled,scanned-slowconv", "--width", "2",
                       "--data", "digits", "--batch", "8", "--steps", "0", "--in_process",
                       "--skip_steps", "8:scanned-slowconv"])
  unrolled, slow = result["rows"]
  assert slow["step s"] == "skipped" and unrolled["first step s"] > 0
  (ratio,) = result["ratios"]
  assert ratio["mode"] == "scanned-slowconv / unrolled" and ratio["compile"] > 0


@pytest.mark.slow   # a benchmark's smoke run (benchmarks are measured, not tested)
def test_input_pipeline_runs_end_to_end(capsys, fast_compile):
  bench = load_script("input_pipeline")
  result = bench.main(["--depth", "8", "--width", "2", "--batch", "16", "--examples", "256",
                       "--pairs", "200", "--repeats", "2", "--host_repeats", "3",
                       "--step_repeats", "1"])
  stages = [r["stage"] for r in result["rows"]]
  assert stages[0] == "host indices + transfer" and "train step (Transformer tiny)" in stages
  for row in result["rows"]:
    assert row["items / s"] > 0 and row["x step"] > 0
  assert "Input pipeline vs train step" in capsys.readouterr().out


def test_moments_throughput_runs_end_to_end(fast_compile):
  bench = load_script("moments_throughput")
  result = bench.main(["--width", "4", "--units", "2", "--batch", "4", "--draws", "2",
                       "--repeats", "1"])
  assert [r["row"] for r in result["rows"]] == ["moments draw", "forward", "forward + jvp"]
  assert all(r["draws·layers/s"] > 0 for r in result["rows"])
  assert result["rows"][1]["x forward"] == 1.0
