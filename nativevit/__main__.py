"""``python -m nativevit ...`` and ``torchrun --nproc_per_node=K -m nativevit encode ...``: the
``nativevit`` command line (``nativevit.cli``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
