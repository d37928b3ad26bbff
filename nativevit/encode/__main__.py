"""``python -m nativevit.encode INPUT --out DIR ...`` (also ``torchrun ... -m nativevit.encode ...``)."""

import sys

from .command import main

if __name__ == "__main__":
    sys.exit(main())
