"""One package per venue; each has the same shape (see `base.py`)."""
