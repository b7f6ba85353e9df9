"""Raw videos to training shards, the Kandinsky Video 1.1 way (`tools/prepare_videos.py`).

    config.py    the typed schema (`PrepareConfig`) and `load_prepare_config`
    scan.py      pass 1: PyAV decode -> timestamps, PySceneDetect cuts, black-border profiles
    clips.py     filters, border crop, clip plans; pass 2: cropped, resized, 24 fps frames
    captions.py  captions file / sidecar / captioner plug-ins (`CAPTIONERS`: coca, shapesworld)
    process.py   one source -> encoded clips (H.264, motion score) and rejects, in a worker
    writer.py    shards + journal (exactly once across kills), manifest/rejects/report, merge
    runner.py    inputs, the split across machines, worker processes with time/memory limits

Every input file ends in the manifest (by at least one clip) or in the rejects, with one of
the reasons `process.REASONS`.
"""

from kvideo.data.prepare.config import PrepareConfig, load_prepare_config
from kvideo.data.prepare.runner import expand_inputs, prepare, resolve_part
from kvideo.data.prepare.writer import merge

__all__ = ["PrepareConfig", "load_prepare_config", "prepare", "merge", "expand_inputs", "resolve_part"]
