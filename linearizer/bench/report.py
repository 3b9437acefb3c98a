"""The benchmark's report: bench.json, the printed table and the figures (bench.png and,
with segmentation rows, bench_segment.png), all from the result dict `runner.run` builds.
"""

import os

from linearizer import files, plots
from linearizer.bench import results
from linearizer.log import log, main_process


def write(result, out_dir):
  """On the main process: out_dir/bench.json, the figures, the table and the closing line."""
  if not main_process():
    return
  files.write_json(os.path.join(out_dir, "bench.json"), result, default=str)
  plot(result, os.path.join(out_dir, "bench.png"))
  if result["segment_speedups"]:
    plot_segment(result, os.path.join(out_dir, "bench_segment.png"))
  log(table(result))
  log(f"[bench] wrote {out_dir}/bench.json and bench.png ({result['meta']['wall_s']:.0f} s)")


def fmt(value, spec):
  """`value` formatted by `spec`, or a '-' of the same width when it is None."""
  if value is None:
    return format("-", spec.split(".")[0].rstrip("fegd"))
  return format(value, spec)


def table(result):
  """The printed summary: forward rows, speedups, the train step and the SSD rows."""
  rows = result["rows"]
  meta = result["meta"]
  lines = [
    f"device {meta['device_kind']} ({meta['backend']}), {meta['dtype']}, jax {meta['jax_version']}",
  ]
  for r in rows:
    if r["kind"] == "matmul":
      lines.append(
        f"matmul {r['n']}² {meta['dtype']}: {r['flop_per_s'] / 1e9:.0f} GFLOP/s "
        "(mm%: a row's FLOP/s as a share of it)"
      )
  head = (
    f"{'model':<28} {'attn':<7} {'res':>5} {'batch':>5} {'img/s':>10} {'ms/batch':>10} "
    f"{'GFLOP/img':>10} {'MFU%':>6} {'mm%':>5} {'compile s':>9}"
  )
  lines += ["", head, "-" * len(head)]
  for r in rows:
    if r["kind"] == "forward" and "img_per_s" in r:
      flops = r["flops_per_image"] / 1e9 if r["flops_per_image"] else None
      lines.append(
        f"{r['model']:<28} {r['attention_impl'] or '':<7} {r['resolution']:>5} "
        f"{r['batch']:>5} {r['img_per_s']:>10.2f} {r['latency_ms']:>10.1f} "
        f"{fmt(flops, '>10.4g')} {fmt(r['mfu'], '>6.1f')} {fmt(r.get('matmul_pct'), '>5.0f')} "
        f"{fmt(r['compile_s'], '>9.1f')}"
      )
  lines += [
    "",
    f"{'res':>5} {'speedup':>8} {'FLOP ratio':>10} {'paper speedup':>14} "
    f"{'paper FLOP ratio':>17}   fastest ViT (speedup: student img/s over its)",
  ]
  for sp in result["speedups"]:
    lines.append(
      f"{sp['resolution']:>5} {sp['speedup']:>7.2f}x {fmt(sp['flop_ratio'], '>10.2f')} "
      f"{fmt(sp['paper_speedup'], '>14.1f')} {fmt(sp['paper_flop_ratio'], '>17.1f')}   "
      f"{sp.get('teacher_model', '')} {sp.get('teacher_attention') or ''}"
    )
  for r in rows:
    if r["kind"] == "train_step":
      lines += [
        "",
        f"distill train step ({r['model']}) @{r['resolution']}, batch {r['batch']}: "
        f"{r['img_per_s']:.2f} img/s, {r['latency_ms']:.0f} ms/step, "
        f"{fmt(r['flops_per_image'] and r['flops_per_image'] / 1e9, '.4g')} GFLOP/img, "
        f"MFU {fmt(r['mfu'], '.1f')}",
      ]
  sup = [r for r in rows if r["kind"] == "supervised_step" and "img_per_s" in r]
  if sup:
    head = (
      f"{'supervised step':<20} {'attn':<6} {'res':>5} {'batch':>5} {'img/s':>10} "
      f"{'ms/step':>10} {'compiled GB':>11} {'process peak GB':>15}"
    )
    lines += ["", head, "-" * len(head)]
    gb = lambda v: v and v / 1e9
    for r in sup:
      lines.append(
        f"{r['model']:<20} {r['attention_impl'] or '':<6} {r['resolution']:>5} {r['batch']:>5} "
        f"{r['img_per_s']:>10.2f} {r['latency_ms']:>10.1f} "
        f"{fmt(gb(r['compiled_bytes']), '>11.2f')} {fmt(gb(r['peak_bytes']), '>15.2f')}"
      )
  seg = [r for r in rows if r["kind"] == "segment" and "img_per_s" in r]
  if seg:
    head = (
      f"{'backbone + UperNet':<20} {'attn':<6} {'res':>5} {'batch':>5} {'img/s':>10} "
      f"{'GFLOP/img':>10} {'compiled GB':>11}"
    )
    lines += ["", head, "-" * len(head)]
    for r in seg:
      flops, nbytes = r["flops_per_image"], r["compiled_bytes"]
      lines.append(
        f"{r['model']:<20} {r['attention_impl'] or '':<6} {r['resolution']:>5} {r['batch']:>5} "
        f"{r['img_per_s']:>10.2f} {fmt(flops and flops / 1e9, '>10.4g')} "
        f"{fmt(nbytes and nbytes / 1e9, '>11.2f')}"
      )
    for sp in result.get("segment_speedups", ()):
      lines.append(
        f"  @{sp['resolution']}: student {sp['speedup']:.2f}x the fastest teacher, FLOP ratio "
        f"{fmt(sp['flop_ratio'], '.2f')} (paper: {fmt(sp['paper_speedup'], '.2f')})"
      )
  if any(r["kind"] == "ssd" for r in rows):
    lines += [
      "",
      f"{'ssd impl':<11} {'mode':<8} {'L':>6} {'ms':>10} {'TFLOP/s':>8} {'GB/s':>8} "
      f"{'roofline%':>9}",
    ]
  for r in rows:
    if r["kind"] == "ssd":
      if "skipped" in r:
        lines.append(f"{r['impl']:<11} skipped: {r['skipped']}")
      else:
        lines.append(
          f"{r['impl']:<11} {r['mode']:<8} {r['length']:>6} {r['ms']:>10.2f} "
          f"{r['tflop_per_s']:>8.3f} {r['gb_per_s']:>8.2f} "
          f"{fmt(r['roofline_pct'], '>9.1f')}"
        )
  mixed = [r for r in rows if r["kind"] == "packed" and "img_per_s" in r]
  if mixed:
    head = (
      f"{'mixed sizes':<20} {'attn':<7} {'layout':<6} {'tokens':>7} {'padding%':>8} {'img/s':>10}"
    )
    lines += ["", head, "-" * len(head)]
    for r in mixed:
      lines.append(
        f"{r['model']:<20} {r['attention_impl'] or '':<7} {r['layout']:<6} {r['tokens']:>7} "
        f"{100 * r['padding_share']:>8.1f} {r['img_per_s']:>10.2f}"
      )
  return "\n".join(lines)


def plot(result, path):
  """Left: throughput vs resolution per model (log). Right: speedup, FLOP ratio, paper."""
  plt = plots.plt

  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
  for kind, style, what in (("forward", "-", ""), ("supervised_step", "--", ", training step")):
    timed = [r for r in result["rows"] if r["kind"] == kind and "img_per_s" in r]
    for key in dict.fromkeys((r["model"], r["attention_impl"]) for r in timed):
      pts = sorted(
        (r["resolution"], r["img_per_s"]) for r in timed if (r["model"], r["attention_impl"]) == key
      )
      label = key[0] + (f" ({key[1]} attention)" if key[1] else "") + what
      left.plot(*zip(*pts), marker="o", linestyle=style, label=label)
  left.set(
    xlabel="resolution (px)",
    ylabel="images / s",
    yscale="log",
    title=f"Throughput (solid: inference), {result['meta']['device_kind']}",
  )
  if left.get_legend_handles_labels()[0]:
    left.legend(fontsize=8)
  left.grid(alpha=0.3)

  sp = result["speedups"]
  if sp:
    right.plot(
      [x["resolution"] for x in sp],
      [x["speedup"] for x in sp],
      marker="o",
      label="measured speedup (student / fastest teacher)",
    )
    ratio = [(x["resolution"], x["flop_ratio"]) for x in sp if x["flop_ratio"]]
    if ratio:
      right.plot(*zip(*ratio), linestyle="--", label="measured FLOP ratio (teacher / student)")
  right.scatter(
    list(results.PAPER_FLOP_RATIO),
    list(results.PAPER_FLOP_RATIO.values()),
    marker="s",
    color="gray",
    label="paper: FLOP ratio ViT-B / Adventurer-B",
  )
  right.scatter(
    list(results.PAPER_SPEEDUP),
    list(results.PAPER_SPEEDUP.values()),
    marker="*",
    s=150,
    color="red",
    label="paper: 2.1× Adventurer-B vs CLIP ViT-B/16 @448²",
  )
  right.axhline(1.0, color="black", linewidth=0.5)
  right.set(xlabel="resolution (px)", ylabel="× faster", title="Student / teacher")
  right.legend(fontsize=8)
  right.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def plot_segment(result, path):
  """Student/teacher speed-up of backbone + UperNet against resolution, beside the paper's."""
  rows, plt = result["segment_speedups"], plots.plt
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  ax.plot([r["resolution"] for r in rows], [r["speedup"] for r in rows], "o-", label="measured")
  flops = [(r["resolution"], r["flop_ratio"]) for r in rows if r["flop_ratio"]]
  if flops:
    ax.plot(*zip(*flops), "s--", alpha=0.6, label="FLOP ratio (teacher / student)")
  for (res, value), name in zip(results.PAPER_SEGMENT_SPEEDUP.items(), ("ADE20K", "Cityscapes")):
    ax.plot([res], [value], "r*", markersize=12)
    ax.annotate(f"paper {name} {value}×", (res, value), textcoords="offset points", xytext=(6, 4))
  ax.axhline(1.0, color="grey", lw=0.8)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("input side (pixels)")
  ax.set_ylabel("student img/s ÷ teacher img/s")
  meta = result["meta"]
  ax.set_title(f"UperNet segmentation, {meta['device_kind']}, {meta['dtype']}", fontsize=10)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
