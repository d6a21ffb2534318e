"""Image keys of a LeRobot dataset, encoded and decoded with PyAV: videos, and single frames
(PNG, or JPEG on import) for features of dtype "image".

A video file holds the frames of consecutive episodes back to back at the dataset's fps; an
episode's frames start at its `videos/<key>/from_timestamp` (seconds). Frames are uint8 RGB
`(H, W, 3)`; they are stored as yuv420p, so a decoded frame differs from the original by the codec's
loss (see `lerobot.export.VIDEO_TOLERANCE`). yuv420p needs even sizes: an odd height or width is
padded with one edge row / column and cropped again when read (the feature's `shape` is the
original size, `info["video.height"/"video.width"]` the encoded one).
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from diffpolicy.data.errors import DataFormatError
from diffpolicy.errors import MissingFileError

PIX_FMT = "yuv420p"
CODECS = ("libx264", "mpeg4")  # the first PyAV offers is used


def pick_codec() -> str:
    """The first of `CODECS` this PyAV build can encode."""
    for name in CODECS:
        try:
            av.codec.Codec(name, "w")
            return name
        except ValueError:  # av.codec.codec.UnknownCodecError: not in this FFmpeg build
            continue
    raise DataFormatError(f"PyAV {av.__version__} offers none of the encoders {list(CODECS)}")


def as_fraction(fps: float) -> Fraction:
    """Frame rate as an exact fraction (10.0 -> 10, 29.97 -> 2997/100)."""
    return Fraction(fps).limit_denominator(1001)


class VideoWriter:
    """Append episodes' frames `(T, H, W, 3)` uint8 to one mp4 at `path` (written as `path` +
    `.partial`, renamed by `close`). `frames_written / fps` is where the next episode starts."""

    def __init__(self, path: Path, fps: float, height: int, width: int, codec: str, crf: int):
        self.path = Path(path)
        self.height, self.width = height, width
        self.encoded_height, self.encoded_width = height + height % 2, width + width % 2
        self.frames_written = 0
        self._tmp = self.path.with_name(self.path.name + ".partial")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(str(self._tmp), mode="w", format="mp4")
        self._stream = self._container.add_stream(codec, rate=as_fraction(fps))
        self._stream.width, self._stream.height = self.encoded_width, self.encoded_height
        self._stream.pix_fmt = PIX_FMT
        # A keyframe every 2 frames (as LeRobot encodes) keeps a seek to any episode cheap.
        self._stream.options = {"crf": str(crf), "g": "2"} if codec == "libx264" else {"g": "2"}
        if codec != "libx264":
            self._stream.codec_context.qmin, self._stream.codec_context.qmax = 1, 3
            self._stream.bit_rate = 20_000_000

    def append(self, frames: np.ndarray) -> None:
        """Encode `frames` `(T, H, W, 3)` uint8 after those already written."""
        pad = ((0, 0), (0, self.encoded_height - self.height), (0, self.encoded_width - self.width), (0, 0))
        for image in np.pad(frames, pad, mode="edge"):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts = self.frames_written
            self._container.mux(self._stream.encode(frame))
            self.frames_written += 1

    def close(self) -> None:
        """Flush the encoder and rename the file into place."""
        self._container.mux(self._stream.encode(None))
        self._container.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Drop the partial file (after an error)."""
        try:
            self._container.close()
        finally:
            self._tmp.unlink(missing_ok=True)


def read_frames(path: Path, key: str, start_s: float, timestamps: np.ndarray, fps: float,
                shape: tuple[int, int, int], where: str) -> np.ndarray:
    """Decode the frames at `start_s + timestamps` (seconds) from the video at `path`.

    Each wanted time must have a decoded frame within 0.4 / fps of it (a missing or shifted frame
    is an error naming the file, key and time). Returns `(len(timestamps), *shape)` uint8, cropped
    to `shape` = (H, W, 3). `where` names the episode in messages.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{where}: video file {path} of key {key!r} does not exist")
    wanted = float(start_s) + np.asarray(timestamps, dtype=np.float64)
    tol = 0.4 / float(fps)
    height, width = shape[0], shape[1]
    out = np.empty((len(wanted), *shape), dtype=np.uint8)
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as err:
        raise DataFormatError(f"{where}: {path} (key {key!r}) is not a readable video: {err}") from err
    with container:
        if not container.streams.video:
            raise DataFormatError(f"{where}: {path} (key {key!r}) has no video stream")
        stream = container.streams.video[0]
        first = max(0.0, wanted[0] - tol)
        container.seek(int(first / stream.time_base), stream=stream, backward=True)
        count = 0
        last = None
        for frame in container.decode(stream):
            if count == len(wanted):
                break
            last = float(frame.time)
            if last < wanted[count] - tol:
                continue
            if abs(last - wanted[count]) > tol:
                raise DataFormatError(f"{where}: {path} (key {key!r}) has no frame at {wanted[count]:.4f} s "
                                      f"(frame {count} of the episode); the nearest decoded frame is at {last:.4f} s")
            image = frame.to_ndarray(format="rgb24")
            if image.shape[0] < height or image.shape[1] < width:
                raise DataFormatError(f"{where}: {path} (key {key!r}) frames are {image.shape[:2]}, "
                                      f"the feature's shape is {list(shape)}")
            out[count] = image[:height, :width]
            count += 1
    if count < len(wanted):
        raise DataFormatError(f"{where}: {path} (key {key!r}) ends after {count} of the episode's {len(wanted)} "
                              f"frames (wanted {wanted[count]:.4f} s; last decoded frame at {last} s)")
    return out


def encode_png(image: np.ndarray) -> bytes:
    """One uint8 `(H, W, 3)` frame as PNG bytes (lossless)."""
    encoder = av.CodecContext.create("png", "w")
    encoder.width, encoder.height, encoder.pix_fmt = image.shape[1], image.shape[0], "rgb24"
    packets = encoder.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24"))
    return b"".join(bytes(packet) for packet in packets)


_MAGIC = {b"\x89PNG": "png", b"\xff\xd8\xff": "mjpeg"}


def decode_image(data: bytes, where: str) -> np.ndarray:
    """PNG or JPEG bytes -> uint8 `(H, W, 3)`; `where` names the file, key and row in errors."""
    codec = next((name for magic, name in _MAGIC.items() if data[:len(magic)] == magic), None)
    if codec is None:
        raise DataFormatError(f"{where}: image bytes are neither PNG nor JPEG (starting {data[:8]!r})")
    try:
        frames = av.CodecContext.create(codec, "r").decode(av.Packet(data))
    except av.error.FFmpegError as err:
        raise DataFormatError(f"{where}: cannot decode the {codec} image: {err}") from err
    if not frames:
        raise DataFormatError(f"{where}: the {codec} image decodes to no frame")
    return frames[0].to_ndarray(format="rgb24")
