"""The ablation's summary: per row the top-1 of every seed (and with `ablation.dense` the
dense toy's mIoU), mean and std, the paper's checks, a table in the paper's layout and a bar
plot (linearizer/ablation.py runs the rows).
"""

import json
import os
import textwrap

import numpy as np

from linearizer import files, plots
from linearizer.ablation_variants import PAPER, dense_path, runs_of, scope_row, variant_dir


# ---------------------------------------------------------------------------------------
# The summary: numbers, a table in the paper's layout, a bar plot.
# ---------------------------------------------------------------------------------------
def mean_std(values) -> dict:
  """{'mean', 'std'} of a row's seeds (std with ddof=1; 0 for one seed)."""
  std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
  return dict(mean=float(np.mean(values)), std=std)


def summarize(config, root, teacher_top1, gflops=None):
  """Per variant the top-1 of every seed, mean and std (in %), the checks, the table;
  `gflops` ({variant: {'train', 'inference'}}) adds two columns."""
  variants = {}
  for variant in config.ablation.variants:
    accs = []
    for k in range(config.ablation.seeds):
      path = os.path.join(variant_dir(root, runs_of(config, variant), k), "result.json")
      with open(path, encoding="utf-8") as f:
        accs.append(100 * json.load(f)["top1"])
    variants[variant] = dict(
      top1=accs,
      **mean_std(accs),
      **({"gflops": gflops[variant]} if gflops else {}),
    )
    if config.ablation.dense:  # the dense toy's mIoU of the same runs
      mious = []
      for k in range(config.ablation.seeds):
        with open(dense_path(root, runs_of(config, variant), k), encoding="utf-8") as f:
          mious.append(100 * json.load(f)["miou"])
      variants[variant]["dense"] = dict(miou=mious, **mean_std(mious))
  out = dict(
    teacher_top1=100 * teacher_top1,
    seeds=config.ablation.seeds,
    data=config.data.source,
    scope=config.distill.loss.scope,
    variants=variants,
    checks=checks(variants),
  )
  out["table"] = table(out)
  return out


def checks(variants):
  """The issue's claims, as numbers: does AM+MP beat supervised by > 2 std, and do MP-only
  and AM-only sit between them? 'std' is the larger of the two rows' seed std."""
  if "supervised" not in variants or "am_mp" not in variants:
    return {}
  sup, both = variants["supervised"], variants["am_mp"]
  spread = max(sup["std"], both["std"])
  out = dict(
    gap=both["mean"] - sup["mean"],
    spread=spread,
    am_mp_beats_supervised_by_2_std=both["mean"] - sup["mean"] > 2 * spread,
  )
  for v in ("mp", "am"):
    if v in variants:
      out[f"{v}_between"] = sup["mean"] <= variants[v]["mean"] <= both["mean"]
  return out


def table(summary):
  """Markdown in the paper's layout: objective rows, then AM-scope rows, then the rows
  beyond the paper; with the dense toy's mIoU and the GFLOPs where the summary has them."""
  variants, n = summary["variants"], summary["seeds"]
  costs_on = any("gflops" in v for v in variants.values())
  dense_on = any("dense" in v for v in variants.values())
  mean_std = lambda r: f"{r['mean']:.2f} ± {r['std']:.2f}"
  header = ["", f"top-1 (%), mean ± std over {n} seed{'s' * (n > 1)}"]
  header += ["dense toy mIoU (%)"] * dense_on + ["paper, ImageNet-1k"]
  header += ["train GFLOPs", "inference GFLOPs"] * costs_on
  row = lambda cells: "|" + "".join(f" {c} |" if c else " |" for c in cells)
  blanks = lambda k: [""] * (len(header) - k)
  lines = [
    row(header),
    "|" + "---|" * len(header),
    row(["teacher", f"{summary['teacher_top1']:.2f}", *[""] * dense_on, "84.7 (CLIP ViT-B/16)"])
    + " |" * (2 * costs_on),
  ]
  for section, rows in PAPER.items():
    rows = [r for r in rows if r[1] in variants]
    if rows:  # (a section none of whose rows was run is left out)
      lines.append(row([f"**{section}**", *blanks(1)]))
    for label, variant, paper in rows:
      v = variants[variant]
      label += " (= AM + MP)" * (variant == scope_row(summary["scope"]))
      cells = [label, mean_std(v)] + [mean_std(v["dense"]) if "dense" in v else "—"] * dense_on
      cells.append("—" if paper is None else str(paper))  # a row the paper does not report
      if costs_on:
        cells += [f"{v['gflops']['train']:,.0f}", f"{v['gflops']['inference']:.4f}"]
      lines.append(row(cells))
  c = summary["checks"]
  if c:
    lines.append("")
    beats = "yes" if c["am_mp_beats_supervised_by_2_std"] else "no"
    spread = (
      f"larger seed std {c['spread']:.2f}; > 2 std: {beats}"
      if n > 1
      else "one seed: no spread to hold it against (seeds >= 2)"
    )
    lines.append(f"AM + MP − supervised: {c['gap']:+.2f} points; {spread}.")
    for v, label in (("mp", "MP only"), ("am", "AM only")):
      if f"{v}_between" in c:
        lines.append(
          f"{label} between supervised and AM + MP: {'yes' if c[f'{v}_between'] else 'no'}."
        )
  return "\n".join(lines)


def write_summary(summary, directory):
  os.makedirs(directory, exist_ok=True)
  files.write_json(os.path.join(directory, "ablation.json"), summary)
  files.write_text(os.path.join(directory, "ablation.md"), summary["table"] + "\n")
  bar_plot(summary, os.path.join(directory, "ablation.png"))


def bar_plot(summary, path):
  """Two panels like the paper's tables: objectives, AM scope; error bars = seed std."""
  plt = plots.plt
  variants = summary["variants"]
  panels = [(s, [r for r in rows if r[1] in variants]) for s, rows in PAPER.items()]
  panels = [(s, rows) for s, rows in panels if rows]
  counts = [len(rows) for _, rows in panels]  # a panel's width follows its bars
  fig, axes = plt.subplots(
    1,
    len(panels),
    figsize=(2 + 1.5 * sum(counts), 4),
    squeeze=False,
    gridspec_kw=dict(width_ratios=[max(2, n) for n in counts]),
  )
  for ax, (section, rows) in zip(axes[0], panels):
    means = [variants[v]["mean"] for _, v, _ in rows]
    stds = [variants[v]["std"] for _, v, _ in rows]
    ax.bar(range(len(rows)), means, yerr=stds, capsize=4, color="tab:blue", alpha=0.8)
    for i, (_, v, _) in enumerate(rows):  # every seed as a dot
      ax.plot([i] * len(variants[v]["top1"]), variants[v]["top1"], "k.", ms=4)
    ax.axhline(summary["teacher_top1"], color="tab:red", ls="--", label="teacher")
    ax.set_xticks(range(len(rows)), [textwrap.fill(label, 16) for label, _, _ in rows], fontsize=8)
    low = min(min(variants[v]["top1"]) for _, v, _ in rows)
    ax.set_ylim(max(0, low - 3), max(summary["teacher_top1"], max(means)) + 1.5)
    ax.set_ylabel("top-1 (%)")
    ax.set_title(section)
    ax.legend(loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
