"""Stage 1: run the frozen target and encoders once and cache their outputs in feature stores.

`python -m pipeline features --help`. May import `training` (inference), never the reverse.
"""
import os

# Offline: a missing hub model must fail in milliseconds, not after network timeouts.
# Set before huggingface_hub is first imported (open_clip imports it).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
