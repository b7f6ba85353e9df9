"""The released Kandinsky Video 1.1 (and Kandinsky 3 / MoVQGAN) checkpoints in kvideo.

    keys.py       renaming rules (`Rename`, `KeyMap`) and `convert`, which reports what is left over
    maps.py       the released models' key maps and the transformations a rename cannot express
    convert.py    the release's files -> kvideo stage checkpoints and a pipeline config; the
                  coverage table of the full-size models (`tools/convert_release.py`)

docs/RELEASE.md says how to get the files, convert them and sample, and lists where kvideo's
defaults differ from the release, each with the config key that reproduces the release.
"""

from kvideo.release.keys import Conversion, Fields, KeyMap, Rename, convert, fit_shape, to_release_names
from kvideo.release.maps import (
    K3_UNET, MOVQ, T2V_UNET, INTERPOLATION_UNET, VIDEO_MOVQ, first_frame_to_kvideo, interpolation_to_kvideo,
    interpolation_to_release, k3_unet_to_kvideo, movq_to_kvideo, t2v_to_kvideo, t2v_to_release,
    video_movq_to_kvideo, video_movq_to_release,
)

__all__ = [
    "Conversion", "Fields", "KeyMap", "Rename", "convert", "fit_shape", "to_release_names",
    "K3_UNET", "MOVQ", "T2V_UNET", "INTERPOLATION_UNET", "VIDEO_MOVQ", "first_frame_to_kvideo",
    "interpolation_to_kvideo", "interpolation_to_release", "k3_unet_to_kvideo", "movq_to_kvideo",
    "t2v_to_kvideo", "t2v_to_release", "video_movq_to_kvideo", "video_movq_to_release",
]
