"""Side-by-side timing of mnn against PyTorch (run from the repository root: python -m bench)."""
