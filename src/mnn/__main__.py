"""``python -m mnn`` runs the ``mnn`` command."""
import sys

from .cli import main

sys.exit(main())
