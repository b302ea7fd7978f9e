"""Triton kernels for the KIVI pages: write path (store.py) and read path (attention.py)."""
