"""pipeline/names.py answers what a name means without importing the networks: its lists must be
the registries' own."""

from pipeline import names
from pipeline.encoders import MODULE_ENCODERS
from pipeline.networks import BUILTINS


def test_the_torch_free_names_match_the_registries():
    assert set(names.BUILTIN_TARGETS) == set(BUILTINS)
    assert set(names.MODULE_ENCODER_NAMES) == set(MODULE_ENCODERS)


def test_names_are_classified_as_the_builders_read_them():
    assert names.is_network_target("mprnet-deblur:n_feat=8") and not names.is_user_target(
        "mprnet-deblur:n_feat=8"
    )
    assert names.is_user_target("mypkg.nets:make") and names.is_network_target("mypkg.nets:make")
    assert not names.is_network_target("wiener")
    assert names.is_user_encoder("mypkg.enc:make") and names.is_module_encoder("effnet-lite0")
    assert not names.is_user_encoder("openclip:ViT-B-32:openai") and not names.is_user_encoder(
        "sd-vae:size=256"
    )
    assert names.weights_arg("sd-unet", "clip.pt", "sd/") == "sd/"
    assert names.weights_arg("clip-vit-b32", "clip.pt", "sd/") == "clip.pt"
    assert names.weights_arg("effnet-lite0", "clip.pt", "sd/") is None
