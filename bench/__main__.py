import os
import sys

from mnn.cli import describe

from .run import main

try:
    sys.exit(main())
except (OSError, RuntimeError, ValueError) as error:  # one line, as mnn bench gives, unless MNN_DEBUG asks
    if os.environ.get("MNN_DEBUG", "") not in ("", "0"):
        raise
    sys.exit(f"python -m bench: error: {describe(error)}")
