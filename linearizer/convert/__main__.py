"""python -m linearizer.convert --format F --input P --output DIR [--num_heads N ...]

The CLI itself is `linearizer.convert.main` (so tests and scripts can call it in-process;
importing this module from the package would make runpy warn and form a cycle). Bad input
prints one `error: <message>` line on stderr and exits 2.
"""

import sys

from linearizer.convert import main

if __name__ == "__main__":
  main(sys.argv[1:])
