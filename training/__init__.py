"""Stage 2: train and evaluate PTG-RM from feature stores only.

`python -m training --help`. Imports `ptgrm` and `stores`; never `pipeline`, open_clip or
diffusers: training and evaluation load no frozen network (docs/design.md, "Who imports what").
"""
