"""spark-submit entry point: `spark-submit jobs/generate.py [--conf FILE] [--set k=v] ...`."""

import sys

from microseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
