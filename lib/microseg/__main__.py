import sys

from microseg.cli import main

sys.exit(main())
