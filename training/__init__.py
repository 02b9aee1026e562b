"""Stage 2: train and evaluate PTG-RM from feature stores only.

`python -m training --help`. Never imports `pipeline`, open_clip or diffusers: training and
evaluation load no frozen network.
"""
