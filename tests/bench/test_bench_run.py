"""The benchmark tool end to end: one `:smoke` run checking what it writes, and `parts=`.

Tests never judge timings (design.md): only that every number is there and positive.
"""

import json
import math
import os

import pytest

from configs import bench as bench_config
from linearizer.bench import packed as bench_packed
from linearizer.bench import runner as bench


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


def test_parts_packed_reads_one_workload_padded_and_packed(tmp_path):
  """`parts=packed`: per model, the same mixed-size images as one padded square batch and as
  packed rows, with their token counts checked by hand."""
  config = bench_config.get_config("smoke,parts=packed")
  result = bench.run(config, str(tmp_path))
  rows = [r for r in result["rows"] if r["kind"] == "packed"]
  p = config.bench.packed
  sizes = bench_packed.workload(
    p.workload_images, p.median_side, tuple(p.side_scale), p.max_aspect, 16
  )
  real = sum((h // 16) * (w // 16) for h, w in sizes)
  side = max(max(s) for s in sizes)
  assert len({(h, w) for h, w in sizes}) > 2  # mixed sizes
  for r in rows:
    assert r["patch_tokens"] == real and r["img_per_s"] > 0 and r["batch"] == p.workload_images
    if r["layout"] == "padded":
      assert r["tokens"] == p.workload_images * ((side // 16) ** 2 + 1)  # a CLS each
    else:
      assert r["tokens"] % p.row_tokens == 0 and r["tokens"] < p.workload_images * (side // 16) ** 2
    assert r["padding_share"] == pytest.approx(1 - real / r["tokens"])
  assert {(r["role"], r["layout"]) for r in rows} == {
    (role, layout) for role in ("teacher", "student") for layout in ("padded", "packed")
  }
