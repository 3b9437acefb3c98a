"""Draws what a finished run's students learned: similarity maps and SSD mixing matrices.

  python main.py --config configs/visualize.py --workdir /tmp/vis \
      --config.checkpoint=/tmp/demo [--config.images=a.png,b.png | folder/ | mnist]

`checkpoint` is the --workdir of a finished run: its teacher (trained there, or its
`teacher.init`; `--config.teacher=fmt:path` overrides) and the students its stages wrote.
`images`: image files (comma-separated, globs or a folder), a data source name, or '' for
the first images of the run's own evaluation data. PNGs and `am_distance.json` go to
`workdir/visualize/`. See linearizer/visualize.py for what is drawn.
"""
import ml_collections

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, smoke=False)
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stages = ("visualize",)
  c.checkpoint = ""       # the run's workdir (required)
  c.teacher = ""          # '' = the run's teacher
  c.images = ""           # '' = the run's evaluation data
  c.visualize = dict(
      num_images=2,       # images drawn
      am_images=0,        # measure the AM distance on this many images (0 = those drawn)
      num_stages=4,       # K stages of activation matching (method.md §2)
      layer=-1,           # student layer of the mixing matrix (teacher: same relative depth)
      query=(-1, -1),     # (row, col) of the query patch on the student grid; -1 = centre
      # stage -> label: the students drawn, where the run has them
      students={"distill": "distilled", "finetune": "fine-tuned",
                "train_student": "from scratch"},
  )
  if arg.smoke:
    c.visualize.num_stages = 2
  return c.lock()
