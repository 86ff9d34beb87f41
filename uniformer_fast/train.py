"""``python -m uniformer_fast.train`` (and ``torchrun -m uniformer_fast.train``): the trainer's entry
point. The trainer itself is :mod:`uniformer_fast.apps.train`."""
import sys

from .apps.train import main

if __name__ == "__main__":
    sys.exit(main())
