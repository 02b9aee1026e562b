"""What a target or encoder name means, without importing torch or any network code.

The no-op re-run of `make features` (a complete store answered from the stat cache) decides from
names alone, so it must not pay for importing torch, open_clip or scipy (seconds on a small
machine). pipeline/networks.py, encoders.py and sd_encoders.py build what these names name;
tests/test_names.py checks that their registries and these names agree.
"""

from __future__ import annotations

from stores.names import BUILTIN_TARGETS, SD_NAMES, is_user_encoder, is_user_target  # noqa: F401 (the user-code

# names are decided in stores, which `stores repair` reads without importing the pipeline)

MODULE_ENCODER_NAMES = ("effnet-lite0",)  # built-in torch backbones that bring their own weights


def is_network_target(name: str) -> bool:
    """A built-in network (`mprnet-deblur[:option=value...]`) or a user's `module.path:factory`."""
    return name.split(":")[0] in BUILTIN_TARGETS or ":" in name


def dtype_suffix(dtype: str) -> str:
    """What an --encoder-dtype adds to the encoder's member name: '' for fp32, '-bf16' for bf16
    (`osf/clip-vit-b32-<key>` and `osf/clip-vit-b32-bf16-<key>` side by side)."""
    return "" if dtype == "fp32" else f"-{dtype}"


def is_sd_encoder(name: str) -> bool:
    return name.split(":")[0] in SD_NAMES


def is_module_encoder(name: str) -> bool:
    """A torch backbone run as `ModuleEncoder` that brings its own weights (`effnet-lite0` from its
    package, a user's `module.path:factory`): no --clip-weights, no architecture to parse."""
    return name in MODULE_ENCODER_NAMES or is_user_encoder(name)


def weights_arg(name: str, clip_weights: str | None, sd_weights: str | None) -> str | None:
    """The weights flag that applies to an encoder: SD_WEIGHTS for sd-*, CLIP_WEIGHTS for OpenCLIP
    models, none for effnet-lite0 (weights from its package) and user factories (their own)."""
    if is_sd_encoder(name):
        return sd_weights
    return None if is_module_encoder(name) else clip_weights
