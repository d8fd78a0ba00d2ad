"""``python -m mnn`` runs the ``mnn`` command."""
from .cli import run_command

run_command()
