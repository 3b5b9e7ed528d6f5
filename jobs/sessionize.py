"""spark-submit entry point: `spark-submit jobs/sessionize.py [--conf FILE] [--full]`."""

import sys

from microseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["sessionize", *sys.argv[1:]]))
