"""The training stages: what each stage learns from a batch (loss, phases, previews, evaluation).

`STAGES` maps a config's `stage` name to its class; the recipe schema of each name is
`kvideo.registry.STAGES`' (a test checks the two name the same stages).
"""

from kvideo.train.stages.interpolation import InterpolationStage
from kvideo.train.stages.keyframe import KeyframeStage
from kvideo.train.stages.movq import MovqStage
from kvideo.train.stages.t2i import T2IStage
from kvideo.train.stages.video_decoder import VideoDecoderStage

STAGES = {
    "movq": MovqStage,
    "t2i": T2IStage,
    "keyframe": KeyframeStage,
    "interpolation": InterpolationStage,
    "video_decoder": VideoDecoderStage,
}
