"""Video reading and writing with PyAV (FFmpeg bundled, libx264 included).

torchvision has no video IO in this environment and there is no ffmpeg binary, so every
decode and encode in kvideo goes through this module:

- :func:`probe` reads the container header (fps, size, duration, rotation, streams).
- :func:`read_video` decodes frames to a uint8 ``(f, h, w, 3)`` RGB array, together with
  each frame's presentation time in seconds relative to the start of the video stream.
- :func:`pick_frames_by_time` resamples a clip to a target frame rate by timestamp.
- :func:`write_video` / :func:`encode_video_bytes` write H.264 mp4 files (or bytes, for
  webdataset shards).

Every decode failure (corrupt bytes, no video stream, zero decodable frames) raises
:class:`VideoDecodeError`, which names the source and the reason.
"""

from __future__ import annotations

import io
import os
from fractions import Fraction
from typing import BinaryIO, Union

import av
import numpy as np

VideoSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]

__all__ = [
    "VideoDecodeError",
    "probe",
    "read_video",
    "pick_frames_by_time",
    "write_video",
    "encode_video_bytes",
]


class VideoDecodeError(RuntimeError):
    """A video could not be decoded; ``source`` names it and ``reason`` says why."""

    def __init__(self, source, reason: str):
        self.source = _describe(source)
        self.reason = reason
        super().__init__(f"cannot decode video {self.source}: {reason}")


# ----------------------------------------------------------------------------- helpers


def _describe(src) -> str:
    """A short printable name for a video source (path, or size of in-memory bytes)."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes in memory>"
    if isinstance(src, (str, os.PathLike)):
        return repr(os.fspath(src))
    return f"<{type(src).__name__}>"


def _open_input(src: VideoSource):
    """Open a container for reading; bytes are wrapped in a BytesIO."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise VideoDecodeError(src, "empty input (0 bytes)")
        handle = io.BytesIO(bytes(src))
    elif isinstance(src, (str, os.PathLike)):
        if not os.path.exists(src):
            raise VideoDecodeError(src, "file does not exist")
        handle = os.fspath(src)
    else:
        handle = src  # a file-like object
    try:
        return av.open(handle, mode="r")
    except (av.error.FFmpegError, ValueError, OSError) as e:
        raise VideoDecodeError(src, f"not a readable media container ({e})") from e


def _frame_rate(stream) -> float:
    """Nominal frame rate of a video stream as a float (0.0 when unknown)."""
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and rate > 0:
            return float(rate)
    return 0.0


def _normalise_rotation(degrees: float) -> int:
    """Round a display rotation to a multiple of 90 in [0, 360)."""
    return int(round(degrees / 90.0)) * 90 % 360


# ----------------------------------------------------------------------------- probing


def probe(src: VideoSource) -> dict:
    """Describe a video without decoding it (except its first frame, for the rotation).

    Returns a dict with keys:

    - ``has_video``, ``has_audio`` (bool)
    - ``fps`` (float; nominal average rate of the first video stream)
    - ``num_frames`` (int; the container's count, or ``round(duration * fps)`` when the
      container does not store one, so treat it as an estimate)
    - ``duration_s`` (float), ``width``, ``height`` (int, coded size)
    - ``pix_fmt`` (str): the coded pixel format, e.g. ``yuv420p`` ("" when unknown)
    - ``rotation`` (int, 0/90/180/270): the display rotation in FFmpeg's display-matrix
      convention (PyAV's ``VideoFrame.rotation``): the picture is meant to be shown rotated
      counter-clockwise by this angle. A phone clip tagged ``rotate=90`` reads as 270.

    A container without a video stream is reported with ``has_video=False`` and zeros;
    unreadable input raises :class:`VideoDecodeError`.
    """
    container = _open_input(src)
    try:
        info = {
            "has_video": bool(container.streams.video),
            "has_audio": bool(container.streams.audio),
            "fps": 0.0,
            "num_frames": 0,
            "duration_s": 0.0,
            "width": 0,
            "height": 0,
            "rotation": 0,
            "pix_fmt": "",
        }
        if container.duration is not None:
            info["duration_s"] = container.duration / av.time_base
        if not info["has_video"]:
            return info
        stream = container.streams.video[0]
        info["fps"] = _frame_rate(stream)
        info["width"] = int(stream.codec_context.width)
        info["height"] = int(stream.codec_context.height)
        info["pix_fmt"] = str(stream.codec_context.pix_fmt or "")
        if stream.duration is not None and stream.time_base is not None:
            info["duration_s"] = float(stream.duration * stream.time_base)
        if stream.frames and stream.frames > 0:
            info["num_frames"] = int(stream.frames)
        else:
            info["num_frames"] = int(round(info["duration_s"] * info["fps"]))
        rotation = 0.0
        if "rotate" in stream.metadata:  # legacy clockwise tag
            rotation = -float(stream.metadata["rotate"])
        try:
            first = next(container.decode(stream), None)
            if first is not None:
                rotation = float(getattr(first, "rotation", rotation) or rotation)
        except av.error.FFmpegError as e:
            raise VideoDecodeError(src, f"first frame does not decode ({e})") from e
        info["rotation"] = _normalise_rotation(rotation)
        return info
    finally:
        container.close()


# ----------------------------------------------------------------------------- reading


def read_video(
    src: VideoSource,
    *,
    max_frames: int | None = None,
    start_s: float | None = None,
    end_s: float | None = None,
    apply_rotation: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode the first video stream of ``src`` to RGB frames and their timestamps.

    Args:
        src: a path, the file's bytes, or a binary file-like object.
        max_frames: stop after this many frames.
        start_s, end_s: keep frames whose presentation time ``t`` satisfies
            ``start_s <= t < end_s`` (seconds, relative to the stream start). A non-zero
            ``start_s`` seeks to the preceding keyframe first, so long files are cheap.
        apply_rotation: rotate frames by the container's display rotation (see
            :func:`probe`) so they appear upright; off by default (frames as coded).

    Returns:
        ``(frames, times)``: ``frames`` uint8 ``(f, h, w, 3)`` RGB, ``times`` float64
        ``(f,)`` presentation times in seconds (``pts * time_base`` minus the stream's
        start time), in presentation order.

    Raises:
        VideoDecodeError: corrupt data, no video stream, or no frame in the requested range.
    """
    if max_frames is not None and max_frames <= 0:
        raise ValueError(f"max_frames must be positive, got {max_frames}")
    if start_s is not None and end_s is not None and end_s <= start_s:
        raise ValueError(f"end_s ({end_s}) must be greater than start_s ({start_s})")
    container = _open_input(src)
    try:
        if not container.streams.video:
            raise VideoDecodeError(src, "no video stream in the container")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        time_base = stream.time_base
        stream_start = stream.start_time or 0
        fps = _frame_rate(stream) or 25.0
        if start_s is not None and start_s > 0 and time_base is not None:
            offset = int(start_s / float(time_base)) + stream_start
            try:
                container.seek(offset, stream=stream, backward=True, any_frame=False)
            except av.error.FFmpegError:
                container.seek(0)  # unseekable input: decode from the start and filter

        # Preallocate for the expected frame count (grown by doubling if it is exceeded).
        expected = int(stream.frames or 0) or 64
        if end_s is not None:
            expected = min(expected, int((end_s - (start_s or 0.0)) * fps) + 2)
        capacity = max(min(expected + 2, max_frames or expected + 2), 1)
        frames: np.ndarray | None = None
        times: list[float] = []
        last_t = None
        try:
            for frame in container.decode(stream):
                if frame.pts is not None and time_base is not None:
                    t = float((frame.pts - stream_start) * time_base)
                elif frame.time is not None:
                    t = float(frame.time)
                else:  # no timestamps at all: assume a constant rate
                    t = 0.0 if last_t is None else last_t + 1.0 / fps
                last_t = t
                if start_s is not None and t < start_s - 1e-6:
                    continue
                if end_s is not None and t >= end_s - 1e-6:
                    break
                rgb = frame.to_ndarray(format="rgb24")
                if frames is None:
                    frames = np.empty((capacity, *rgb.shape), dtype=np.uint8)
                elif len(times) == len(frames):  # grow geometrically
                    frames = np.concatenate([frames, np.empty_like(frames)], axis=0)
                frames[len(times)] = rgb
                times.append(t)
                if max_frames is not None and len(times) >= max_frames:
                    break
        except av.error.FFmpegError as e:
            if not times:
                raise VideoDecodeError(src, f"decoding failed ({e})") from e
            # A damaged tail after good frames: keep what decoded.
        if frames is None or not times:
            raise VideoDecodeError(src, "zero frames decoded (in the requested time range)")
        rotation = 0
        if apply_rotation:
            rotation = _normalise_rotation(float(getattr(frame, "rotation", 0) or 0))
    finally:
        container.close()

    out = frames[: len(times)]
    if rotation:
        out = np.ascontiguousarray(np.rot90(out, k=rotation // 90, axes=(1, 2)))
    return out, np.asarray(times, dtype=np.float64)


def pick_frames_by_time(
    times: np.ndarray,
    fps: float,
    num_frames: int | None = None,
    start_s: float | None = None,
) -> np.ndarray:
    """Indices of the frames to show at a new frame rate, chosen by timestamp.

    The target times are ``start_s + i / fps`` for ``i = 0 .. num_frames - 1``; for each,
    the frame whose presentation time is *nearest* is picked (ties go to the earlier frame).
    This resamples 25 -> 24 fps by dropping one frame in 25, 48 -> 24 fps by taking every
    other frame, and 12 -> 24 fps by repeating each frame (indices may repeat).

    Args:
        times: increasing presentation times in seconds (as from :func:`read_video`).
        fps: target frame rate.
        num_frames: number of output frames. ``None`` takes every target time that falls
            within the clip, i.e. ``floor((times[-1] - start_s) * fps) + 1`` frames. Target
            times past the last frame map to the last frame.
        start_s: time of the first output frame; defaults to ``times[0]``.

    Returns:
        int64 array of indices into ``times``.
    """
    times = np.asarray(times, dtype=np.float64)
    if times.ndim != 1 or len(times) == 0:
        raise ValueError(f"times must be a non-empty 1-d array, got shape {times.shape}")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    start = float(times[0]) if start_s is None else float(start_s)
    if num_frames is None:
        num_frames = max(int(np.floor((times[-1] - start) * fps + 1e-6)) + 1, 1)
    targets = start + np.arange(num_frames, dtype=np.float64) / fps
    right = np.clip(np.searchsorted(times, targets, side="left"), 0, len(times) - 1)
    left = np.clip(right - 1, 0, len(times) - 1)
    # Ties (within 1 microsecond, so float rounding cannot flip them) go to the earlier frame.
    take_left = np.abs(targets - times[left]) <= np.abs(times[right] - targets) + 1e-6
    return np.where(take_left, left, right).astype(np.int64)


# ----------------------------------------------------------------------------- writing


def _as_fraction(fps) -> Fraction:
    """Frame rate as a Fraction; floats like 29.97002997 recover 30000/1001."""
    if isinstance(fps, Fraction):
        rate = fps
    elif isinstance(fps, int):
        rate = Fraction(fps)
    else:
        rate = Fraction(float(fps)).limit_denominator(1001)
    if rate <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    return rate


def write_video(
    dst: Union[str, os.PathLike, BinaryIO],
    frames: np.ndarray,
    fps,
    *,
    crf: int = 18,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    preset: str = "medium",
    rotation: int = 0,
) -> None:
    """Encode ``frames`` (uint8 ``(f, h, w, 3)`` RGB) as an mp4 file.

    Args:
        dst: output path, or a writable, seekable binary file-like object (mp4 is used as
            the container format in both cases).
        fps: frame rate; int, float or ``fractions.Fraction`` (29.97... -> 30000/1001).
        crf: x264 constant rate factor (0 lossless luma, 18 visually clean, 23 default).
        codec, pix_fmt, preset: encoder name, pixel format and x264 speed preset.
        rotation: display rotation stored in the container (counter-clockwise degrees, a
            multiple of 90; see :func:`probe`). The frames themselves are not rotated.

    The same frames do not always give the same bytes: x264 (through PyAV) now and then codes a
    frame differently, depending on the state of the process's memory (measured 2026-12-05 on
    32 and 64 px clips: up to a third of encodings in a process that had trained a model, one
    frame 8-14 levels off; x264's threads option made no difference). Compare frames before
    encoding when exact equality matters.

    Raises:
        ValueError: wrong dtype/shape, no frames, or odd width/height with a 4:2:0 pixel
            format (which needs even dimensions; render even sizes or crop first).
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(
            f"frames must be uint8 (f, h, w, 3) RGB, got {frames.dtype} {frames.shape}"
        )
    num, height, width, _ = frames.shape
    if num == 0:
        raise ValueError("cannot write a video with zero frames")
    if pix_fmt.startswith("yuv420") and (height % 2 or width % 2):
        raise ValueError(
            f"{pix_fmt} needs even width and height, got {width}x{height}; "
            "render an even size or crop one row/column"
        )
    if rotation % 90:
        raise ValueError(f"rotation must be a multiple of 90 degrees, got {rotation}")
    rate = _as_fraction(fps)
    if isinstance(dst, (str, os.PathLike)):
        container = av.open(os.fspath(dst), mode="w")
    else:
        container = av.open(dst, mode="w", format="mp4")
    try:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.codec_context.time_base = 1 / rate
        if rotation % 360:
            stream.set_display_rotation(rotation % 360)
        if codec in ("libx264", "libx265"):
            stream.options = {"crf": str(crf), "preset": preset}
        for i in range(num):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[i]), format="rgb24")
            frame.pts = i
            frame.time_base = 1 / rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder
            container.mux(packet)
    finally:
        container.close()


def encode_video_bytes(frames: np.ndarray, fps, **kwargs) -> bytes:
    """Encode frames to mp4 bytes in memory (for webdataset shards); see :func:`write_video`."""
    buffer = io.BytesIO()
    write_video(buffer, frames, fps, **kwargs)
    return buffer.getvalue()
