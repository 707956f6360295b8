"""`python -m distilled.train` (the torchrun entry point): the same as `distill train`."""
import sys

from distilled.train.loop.loop import main

sys.exit(main())
