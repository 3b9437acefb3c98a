"""The benchmark tool: its pure helpers, and one `:smoke` run checking what it writes.

Tests never judge timings (design.md): only that every number is there and positive.
"""

import json
import math
import os

import pytest

from configs import bench as bench_config
from linearizer.bench import results as bench_results
from linearizer.bench import runner as bench


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


def test_config_args():
  c = bench_config.get_config("teacher=B/16,student=S/16,resolutions=224+448,batch=4")
  assert (c.bench.teacher, c.bench.student, c.bench.batch) == ("B/16", "S/16", 4)
  assert tuple(c.bench.resolutions) == (224, 448) and tuple(c.stages) == ("bench",)
  with pytest.raises(ValueError, match="Unknown config arg"):
    bench_config.get_config("resolution=224")


def test_smoke_run_writes_json_and_plot(tmp_path):
  result = bench.run(bench_config.get_config("smoke"), str(tmp_path))
  out = tmp_path / "bench"
  assert (out / "bench.png").stat().st_size > 0
  data = json.loads((out / "bench.json").read_text())
  assert data["meta"]["jax_version"] and data["meta"]["device_kind"]
  assert len(data["rows"]) == len(result["rows"])

  def positive(row, *keys):
    for k in keys:
      assert isinstance(row[k], (int, float)) and row[k] > 0 and math.isfinite(row[k]), (k, row)

  (matmul,) = [r for r in data["rows"] if r["kind"] == "matmul"]
  assert matmul["n"] == 256 and data["meta"]["matmul_flop_per_s"] == matmul["flop_per_s"]
  positive(matmul, "ms", "flop_per_s")
  peers = [r for r in data["rows"] if r["kind"] == "forward" and "library" in r]
  fwd = [r for r in data["rows"] if r["kind"] == "forward" and "library" not in r]
  assert {(r["role"], r["attention_impl"], r["resolution"]) for r in fwd} == {
    (role, impl, res)
    for role, impl in (("teacher", "xla"), ("teacher", "blocked"), ("student", None))
    for res in (32, 64)
  }
  for r in fwd:
    assert {"device_kind", "jax_version", "dtype", "attention_impl", "batch"} <= set(r)
    assert "peak_bytes" in r  # None on CPU, which reports no memory stats
    positive(r, "img_per_s", "latency_ms", "compile_s", "flops_per_image", "batch", "matmul_pct")
  # Blocked attention does the plain attention's math: its FLOPs are the xla row's (XLA's own
  # count sees the loop's body once).
  by_impl = {(r["attention_impl"], r["resolution"]): r["flops_per_image"] for r in fwd}
  assert all(by_impl["blocked", res] == by_impl["xla", res] for res in (32, 64))
  # The PyTorch peers (torch and transformers are test extras): HF's ViT counts as a teacher,
  # our PyTorch Adventurer as a peer; each has the FLOPs of the JAX model it matches.
  assert {(r["model"], r["role"], r["resolution"]) for r in peers} == {
    (name, role, res)
    for name, role in (("ViT-Ti/16 (PyTorch)", "teacher"), ("Adventurer-Ti/16 (PyTorch)", "peer"))
    for res in (32, 64)
  }
  for r in peers:
    positive(r, "img_per_s", "latency_ms", "flops_per_image", "matmul_pct")
    same = "teacher" if r["role"] == "teacher" else "student"
    jax_row = next(f for f in fwd if (f["role"], f["resolution"]) == (same, r["resolution"]))
    assert r["flops_per_image"] == jax_row["flops_per_image"]
  steps = {r["teacher"]: r for r in data["rows"] if r["kind"] == "train_step"}
  assert set(steps) == {"forward", "cached"}
  for r in steps.values():
    positive(r, "img_per_s", "latency_ms", "flops_per_image")
  # The cached step is the step less the teacher's forward (and the resampling of its
  # tokens to the student's grid, a few FLOPs more): what the forward row counts.
  (teacher_fwd,) = [
    r for r in fwd if (r["role"], r["attention_impl"], r["resolution"]) == ("teacher", "xla", 32)
  ]
  saved = steps["forward"]["flops_per_image"] - steps["cached"]["flops_per_image"]
  assert saved == pytest.approx(teacher_fwd["flops_per_image"], rel=0.1)
  sup = [r for r in data["rows"] if r["kind"] == "supervised_step"]
  # Both resolutions run: the donated step state must not take the model's arrays with it.
  assert {(r["attention_impl"], r["resolution"], r["batch"]) for r in sup} == {
    (impl, res, 2) for impl in ("xla", "blocked", None) for res in (32, 64)
  }
  same_model = lambda f, r: (
    (f["role"], f["attention_impl"], f["resolution"])
    == (
      r["role"],
      r["attention_impl"],
      r["resolution"],
    )
  )
  for r in sup:  # forward + backward + update: more FLOPs than the forward alone
    positive(r, "img_per_s", "latency_ms", "flops_per_image", "compiled_bytes")
    (fwd_row,) = [f for f in fwd if same_model(f, r)]
    assert r["flops_per_image"] > 2 * fwd_row["flops_per_image"]
  seg = [r for r in data["rows"] if r["kind"] == "segment"]
  assert {(r["attention_impl"], r["resolution"]) for r in seg} == {
    (impl, res) for impl in ("xla", "blocked", None) for res in (32, 64)
  }
  for r in seg:  # backbone + UperNet: more FLOPs than the backbone's forward
    positive(r, "img_per_s", "flops_per_image")
    (fwd_row,) = [f for f in fwd if same_model(f, r)]
    assert r["flops_per_image"] > fwd_row["flops_per_image"]
  assert [s["resolution"] for s in data["segment_speedups"]] == [32, 64]
  assert (out / "bench_segment.png").stat().st_size > 0
  ssd = [r for r in data["rows"] if r["kind"] == "ssd"]
  timed = {(r["impl"], r["mode"]) for r in ssd if "skipped" not in r}
  assert timed == {(i, m) for i in ("reference", "xla") for m in ("fwd", "fwd+bwd")}
  for r in ssd:
    if "skipped" in r:
      assert r["impl"].startswith("pallas")
    else:
      positive(r, "ms", "flops", "bytes", "tflop_per_s", "gb_per_s")
  assert [s["resolution"] for s in data["speedups"]] == [32, 64]
  for s in data["speedups"]:
    positive(s, "speedup", "flop_ratio")
    teachers = [
      r for r in fwd + peers if r["role"] == "teacher" and r["resolution"] == s["resolution"]
    ]
    fastest = max(teachers, key=lambda r: r["img_per_s"])
    assert (s["teacher_model"], s["teacher_attention"]) == (
      fastest["model"],
      fastest["attention_impl"],
    )
  assert os.path.isfile(out / "bench.json")


def test_parts_ssd_times_the_kernels_alone(tmp_path):
  """`parts=ssd`: only SSD rows; on this CPU the Pallas impls are skipped with the reason."""
  result = bench.run(bench_config.get_config("smoke,parts=ssd"), str(tmp_path))
  kinds = {r["kind"] for r in result["rows"]}
  assert kinds == {"matmul", "ssd"} and result["speedups"] == []
  skipped = {r["impl"]: r["skipped"] for r in result["rows"] if "skipped" in r}
  assert skipped == {"pallas_tpu": "needs a TPU", "pallas_gpu": "needs a GPU"}
  with pytest.raises(ValueError, match="kernels"):
    bench.run(bench_config.get_config("smoke,parts=kernels"), str(tmp_path))


def test_matmul_fractions_are_shares_of_the_measured_rate():
  rows = [
    dict(kind="forward", flops_per_image=2e9, img_per_s=10.0),  # 20 GFLOP/s
    dict(kind="ssd", tflop_per_s=0.5),
    dict(kind="forward", error="MemoryError"),
  ]
  bench_results.matmul_fractions(rows, 1e12)
  assert rows[0]["matmul_pct"] == pytest.approx(2.0) and rows[1]["matmul_pct"] == 50.0
  assert "matmul_pct" not in rows[2]
