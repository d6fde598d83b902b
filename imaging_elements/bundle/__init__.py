"""Class library: bundles and their encryption (bundle.py, crypt.py)."""
