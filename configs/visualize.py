"""Draws what a finished run's students learned: similarity maps and SSD mixing matrices.

  python main.py --config configs/visualize.py --workdir /tmp/vis \
      --config.run_dir=/tmp/demo [--config.images=a.png,b.png | folder/ | mnist]

`run_dir` is the --workdir of a finished run: its teacher (trained there, or its
`teacher.init`; `--config.teacher_init=fmt:path` overrides) and the students its stages
wrote.
`images`: image files (comma-separated, globs or a folder), a data source name, or '' for
the first images of the run's own evaluation data. PNGs and `am_distance.json` go to
`workdir/visualize/`. See linearizer/visualize.py for what is drawn.
"""

from configs import common, tool_blocks


def get_config(arg=None):
  arg = common.parse_arg(arg, smoke=False)
  c = tool_blocks.visualize_run()
  if arg.smoke:
    c.visualize.num_stages = 2
  return c.lock()
