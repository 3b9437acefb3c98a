"""The benchmark's arithmetic (linearizer/bench/results.py): pure functions of numbers and
rows, tested without timing anything.
"""

import pytest

from linearizer.bench import results as bench_results


def test_ssd_flops_matches_the_chunked_matmuls():
  # b=2, L=100, H=4, P=8, N=16, Q=32: Lp = 128 (4 chunks), one group.
  lp, q = 128, 32
  want = 2 * 2 * lp * (q * 16 + 4 * q * 8 + 2 * 4 * 16 * 8)
  assert bench_results.ssd_flops(2, 100, 4, 8, 16, 32) == want
  # A sequence shorter than a chunk is one chunk of its own length (no padding).
  assert bench_results.ssd_flops(1, 10, 1, 1, 1, 64) == 2 * 10 * (10 + 10 + 2)


def test_ssd_bytes_forward_and_backward():
  # x, y: 2·3·4·5 elements; B, C: 2·3·6 each; Δ: 2·3·4 in float32.
  inputs = 2 * 3 * ((4 * 5 + 2 * 6) * 2 + 4 * 4)
  output = 2 * 3 * 4 * 5 * 2
  assert bench_results.ssd_bytes(2, 3, 4, 5, 6, itemsize=2) == inputs + output
  assert (
    bench_results.ssd_bytes(2, 3, 4, 5, 6, itemsize=2, backward=True) == 3 * inputs + 2 * output
  )


def test_mfu_and_peaks():
  assert bench_results.mfu(1e9, 100.0, 1e12) == pytest.approx(10.0)
  assert (
    bench_results.mfu(None, 100.0, 1e12) is None and bench_results.mfu(1e9, 100.0, None) is None
  )
  assert bench_results.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
  assert bench_results.peak_flops("NVIDIA H200", "bfloat16") == 989e12
  assert bench_results.peak_flops("TPU v5 lite", "bfloat16") == 197e12
  assert bench_results.peak_flops("cpu", "float32") is None
  assert bench_results.peak_flops("NVIDIA H100", "float32") is None  # bf16 table only
  assert bench_results.peak_flops("cpu", "float32", override=5e11) == 5e11


def test_roofline_fraction_takes_the_binding_limit():
  # 1 TFLOP at 10 TFLOP/s = 0.1 s; 1 GB at 100 GB/s = 0.01 s: compute bound, 0.2 s measured.
  assert bench_results.roofline_fraction(1e12, 1e9, 0.2, 1e13, 1e11) == pytest.approx(50.0)
  assert bench_results.roofline_fraction(1e12, 1e9, 0.2, None, None) is None


def test_flops_from_cost_dict_or_list():
  assert bench_results.flops_from_cost({"flops": 12.0}) == 12.0
  assert bench_results.flops_from_cost([{"flops": 7.0}]) == 7.0
  assert bench_results.flops_from_cost({}) is None and bench_results.flops_from_cost(None) is None


def test_speedups_against_the_fastest_attention():
  def row(role, impl, res, img_s, flops):
    return dict(
      kind="forward",
      role=role,
      attention_impl=impl,
      resolution=res,
      img_per_s=img_s,
      flops_per_image=flops,
      mfu=None,
    )

  rows = [
    row("teacher", "xla", 448, 50.0, 30.0),
    row("teacher", "cudnn", 448, 100.0, None),
    row("student", None, 448, 210.0, 20.0),
    row("teacher", "xla", 224, 10.0, 9.0),
  ]
  (sp,) = bench_results.speedups(rows)  # 224 has no student: left out
  assert sp["resolution"] == 448 and sp["teacher_attention"] == "cudnn"
  assert sp["speedup"] == pytest.approx(2.1) and sp["flop_ratio"] == pytest.approx(1.5)
  assert sp["paper_speedup"] == 2.1
  bench_results.attention_speedups(rows)
  assert rows[0]["slowdown_vs_fastest_attention"] == pytest.approx(2.0)
  assert rows[1]["slowdown_vs_fastest_attention"] == pytest.approx(1.0)


def test_matmul_fractions_are_shares_of_the_measured_rate():
  rows = [
    dict(kind="forward", flops_per_image=2e9, img_per_s=10.0),  # 20 GFLOP/s
    dict(kind="ssd", tflop_per_s=0.5),
    dict(kind="forward", error="MemoryError"),
  ]
  bench_results.matmul_fractions(rows, 1e12)
  assert rows[0]["matmul_pct"] == pytest.approx(2.0) and rows[1]["matmul_pct"] == 50.0
  assert "matmul_pct" not in rows[2]
