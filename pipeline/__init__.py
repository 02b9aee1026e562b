"""Stage 1: run the frozen target and encoders once and cache their outputs in feature stores.

Inference too: `python -m pipeline restore`. `python -m pipeline features --help`. Imports `ptgrm`
and `stores`, never `training` (docs/design.md, "Who imports what").
"""

import os

# Offline: a missing hub model must fail in milliseconds, not after network timeouts.
# Set before huggingface_hub is first imported (open_clip imports it). Only `weights get`
# (pipeline/download.py) goes online, unless the user set HF_HUB_OFFLINE themselves.
USER_HF_OFFLINE = os.environ.get("HF_HUB_OFFLINE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
