"""A captioner for tests/test_prepare.py that misbehaves on purpose, by source file name.

It lives in its own small module because worker processes import it (the class is passed to
them by reference) and should not pay for importing the test module.
"""

import os
import signal
import time

import numpy as np

from kvideo.data.prepare.captions import Captioner


class MisbehavingCaptioner(Captioner):
    """'hang' in the name: sleeps; 'hog': allocates 3 GB; 'crash': the process kills itself."""

    name = "misbehaving"

    def __init__(self, cfg):
        pass

    def caption(self, clip):
        name = os.path.basename(clip.source)
        if "hang" in name:
            time.sleep(600)
        if "hog" in name:
            hog = np.ones(3 * 2**30, dtype=np.uint8)
            return f"allocated {hog.nbytes} bytes"
        if "crash" in name:
            os.kill(os.getpid(), signal.SIGKILL)
        return f"a clip of {name}"
