import sys

from distilled.cli import main

sys.exit(main())
