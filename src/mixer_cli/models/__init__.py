from mixer_cli.models.checkpoints import load_mixer
from mixer_cli.models.growth import grow_resolution
from mixer_cli.models.mixer import VARIANTS, Mixer, MixerSpec, build_mixer, variant_key

__all__ = ["VARIANTS", "Mixer", "MixerSpec", "build_mixer", "grow_resolution", "load_mixer", "variant_key"]
