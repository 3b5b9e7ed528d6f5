"""spark-submit entry point: `spark-submit jobs/segments.py run --as-of T [--conf FILE]`."""

import sys

from microseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["segments", *sys.argv[1:]]))
