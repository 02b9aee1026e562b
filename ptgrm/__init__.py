"""PTG-RM itself and what both stages use to run it: the model, the safe checkpoint reader, the
tiling of large images, image conversions and the flip encoding, the distilled OSF predictor.

`pipeline` (extraction and `restore`) and `training` both import this package; it imports neither of
them, only `stores` (docs/design.md, "Who imports what"; tests/test_imports.py checks it).
"""
