"""Image folders as calibration data: decoded, converted to the model's channels, resized, scaled, normalized.

    prep = ImagePreprocessing(size=(224, 224), scale=(-1, 1), resize="crop")
    images, line = prep.load_folder("calib_images/", model_input_shape)   # line: what was done, in words

`data.open_source` uses it for a folder given as calibration data (README: "A folder of images").
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Optional

import numpy as np

from qtoolkit.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


RESIZE_POLICIES = ("stretch", "crop", "pad")
_MODES = {1: "grayscale", 2: "grayscale+alpha", 3: "RGB", 4: "RGBA"}
_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as PIL and libjpeg convert RGB to grayscale
_FLAGS = "--image_size, --image_resize, --image_scale, --image_mean, --image_std"


def _floats(value, flag: str, what: str) -> tuple:
    """A number, a sequence of numbers or a comma-separated string -> a tuple of finite floats."""
    try:
        items = [float(p) for p in value.split(",")] if isinstance(value, str) else \
            [float(v) for v in np.ravel(np.asarray(value, dtype=np.float64))]
    except (TypeError, ValueError):
        items = []
    if not items or not all(np.isfinite(items)):
        raise DataError(f"{flag} must be {what}, got {value!r}")
    return tuple(items)


def _text(values) -> str:
    return ",".join(f"{v:g}" for v in values)


@dataclasses.dataclass(frozen=True)
class ImagePreprocessing:
    """How a folder of images becomes model inputs, in this order:

    1. decode (PNG, JPEG, BMP, GIF: first frame) and convert to the model's channel
       count: grayscale to RGB repeats the channel, RGB to grayscale is
       0.299 R + 0.587 G + 0.114 B, alpha is dropped (or made opaque for 4 channels);
    2. resize (bilinear) to `size`, by default the model's input size: "stretch"
       to it (the aspect ratio is not kept), "crop" (scale so the image covers
       it, keep the centre) or "pad" (scale so the image fits, keep the aspect
       ratio, black borders);
    3. map pixel values 0..255 linearly to `scale` (low, high);
    4. (x - mean) / std, per channel where given (one value, or one per channel).

    Strings are accepted as on the command line: size "224x224", scale "-1,1",
    mean "0.485,0.456,0.406".  Bad values raise DataError naming the flag.

        prep = ImagePreprocessing(resize="crop", scale=(-1, 1))
        x, line = prep.load_folder("calib/", (None, 224, 224, 3))   # line: what was done, in words
    """

    size: Optional[tuple] = None   # (height, width); None: the model's input size
    scale: tuple = (0.0, 1.0)      # the real range 0..255 maps to
    mean: Optional[tuple] = None   # subtracted after scaling, per channel
    std: Optional[tuple] = None    # divides after the mean, per channel
    resize: str = "stretch"        # one of RESIZE_POLICIES

    def __post_init__(self):
        size = self.size
        if size is not None:
            try:
                parts = size.lower().replace("x", ",").split(",") if isinstance(size, str) else list(size)
                h, w = (int(p) for p in parts)
                ok = h >= 1 and w >= 1 and all(float(p) == int(p) for p in parts)
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise DataError(f"--image_size must be HEIGHTxWIDTH with positive integers (e.g. 224x224), "
                                f"got {size!r}")
            object.__setattr__(self, "size", (h, w))
        scale = _floats(self.scale, "--image_scale", "two numbers LOW,HIGH (e.g. -1,1)")
        if len(scale) != 2 or scale[0] == scale[1]:
            raise DataError(f"--image_scale must be two different numbers LOW,HIGH that pixel values 0..255 map "
                            f"to (e.g. -1,1), got {self.scale!r}")
        object.__setattr__(self, "scale", scale)
        if self.mean is not None:
            object.__setattr__(self, "mean", _floats(self.mean, "--image_mean",
                                                     "one number or one per channel (e.g. 0.485,0.456,0.406)"))
        if self.std is not None:
            std = _floats(self.std, "--image_std", "one number or one per channel (e.g. 0.229,0.224,0.225)")
            if min(std) <= 0:
                raise DataError(f"--image_std must be positive (it divides), got {self.std!r}")
            object.__setattr__(self, "std", std)
        if self.resize not in RESIZE_POLICIES:
            raise DataError(f"--image_resize must be one of {', '.join(RESIZE_POLICIES)}, got {self.resize!r}")

    def check(self, channels: int) -> None:
        """DataError unless the mean and std fit a model input with `channels` channels."""
        for flag, values in (("--image_mean", self.mean), ("--image_std", self.std)):
            if values is not None and len(values) not in (1, channels):
                raise DataError(f"{flag} has {len(values)} values ({_text(values)}); give one value or one per "
                                f"channel: the model's image input has {channels} channel(s)")

    def describe(self, size: Optional[tuple] = None, resized: Any = True) -> str:
        """The resize, scaling and mean/std in words: "resized (stretch: ...) to 224x224 (...), 0..255 -> [-1, 1], ...".

        `resized`: False when no image needed resizing, or which ones did (e.g. "3 of 40 images").
        """
        h, w = size or self.size or ("H", "W")
        how = {"stretch": "stretch: aspect ratio not kept", "crop": "crop: scaled to cover, centre kept",
               "pad": "pad: scaled to fit, aspect ratio kept, black borders"}[self.resize]
        if isinstance(resized, str):
            how += f"; {resized}"
        origin = "--image_size" if self.size else "the model's input size"
        text = f"resized ({how}) to {h}x{w} ({origin})" if resized else f"already {h}x{w} ({origin}), not resized"
        lo, hi = self.scale
        text += f", 0..255 -> [{lo:g}, {hi:g}]"
        if self.mean is None and self.std is None:
            return text + ", mean/std none"
        formula = {(True, True): "(x - mean) / std", (True, False): "x - mean", (False, True): "x / std"}[
            (self.mean is not None, self.std is not None)]
        given = [f"{k} {_text(v)}" for k, v in (("mean", self.mean), ("std", self.std)) if v is not None]
        return text + f", then {formula} with {' and '.join(given)}"

    def target(self, shape) -> tuple:
        """(height, width) for a model input of `shape` (N, H, W, C)."""
        h, w = self.size or tuple(shape[1:3])
        if h is None or w is None:
            raise DataError("the model's image input has no fixed size; give --image_size HEIGHTxWIDTH")
        return h, w

    def apply(self, image: np.ndarray, size: tuple) -> np.ndarray:
        """An image (H, W, C) of pixel values 0..255 -> the model input (height, width, C), float32."""
        import tensorflow as tf

        h, w = size
        x = np.asarray(image, np.float32)
        ih, iw = x.shape[:2]
        if (ih, iw) != (h, w):
            if self.resize == "stretch":
                x = tf.image.resize(x, (h, w)).numpy()
            else:
                s = (max if self.resize == "crop" else min)(h / ih, w / iw)
                nh, nw = (max(1, int(np.floor(n * s + 0.5))) for n in (ih, iw))
                nh, nw = (max(nh, h), max(nw, w)) if self.resize == "crop" else (min(nh, h), min(nw, w))
                x = tf.image.resize(x, (nh, nw)).numpy() if (nh, nw) != (ih, iw) else x
                if self.resize == "crop":
                    top, left = (nh - h) // 2, (nw - w) // 2
                    x = x[top:top + h, left:left + w]
                else:
                    top, left = (h - nh) // 2, (w - nw) // 2
                    padded = np.zeros((h, w, x.shape[2]), np.float32)
                    padded[top:top + nh, left:left + nw] = x
                    x = padded
        lo, hi = self.scale
        x = x / 255.0 * (hi - lo) + lo
        if self.mean is not None:
            x = x - np.asarray(self.mean, np.float32)
        if self.std is not None:
            x = x / np.asarray(self.std, np.float32)
        return x.astype(np.float32)

    def load_folder(self, folder: str, shape) -> tuple[np.ndarray, str]:
        """The images of `folder` (sorted by name) for a model input of `shape` (N, H, W, C).

        Returns (array (N, H, W, C) float32, a one-line description of what was done).
        """
        import tensorflow as tf

        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise DataError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) in the folder")
        if len(shape) != 4:
            raise DataError(f"{folder}: a folder of images needs a model with one image input (N, H, W, C), "
                            f"the model's input has shape {shape}")
        channels = shape[3] or 3
        if channels not in (1, 3, 4):
            raise DataError(f"{folder}: the model's input has {channels} channels; a folder of images feeds 1 "
                            "(grayscale), 3 (RGB) or 4 (RGBA) channels: give the data as .npy instead")
        self.check(channels)
        size = self.target(shape)
        out = np.empty((len(files), *size, channels), np.float32)
        modes: dict = {}
        resized = 0
        for i, f in enumerate(files):
            path = os.path.join(folder, f)
            try:
                img = tf.io.decode_image(tf.io.read_file(path), channels=0, expand_animations=False).numpy()
            except Exception as e:  # noqa: BLE001  (TF raises several types)
                detail = re.sub(r"\{\{.*?\}\}|\[Op:.*", "", str(getattr(e, "message", e))).strip().splitlines()
                raise DataError(f"{path}: cannot decode image ({detail[0] if detail else type(e).__name__}); "
                                "remove the file or re-save it as PNG or JPEG") from None
            n = img.shape[2]
            modes[n] = modes.get(n, 0) + 1
            resized += img.shape[:2] != size
            out[i] = self.apply(_to_channels(img, channels), size)
        which = resized > 0 if resized in (0, len(files)) else f"{resized} of {len(files)} images"
        return out, (f"images: {len(files)} files from {folder} decoded as {_MODES[channels]}"
                     f"{_conversions(modes, channels, len(files))}, {self.describe(size, which)} (set with {_FLAGS})")


def _to_channels(img: np.ndarray, channels: int) -> np.ndarray:
    """Pixels (H, W, n) with n = 1, 2 (gray + alpha), 3 or 4 (RGBA) -> (H, W, channels), float32 0..255."""
    x = img.astype(np.float32)
    n = x.shape[2]
    if n == channels:
        return x
    color = x[..., :1] if n <= 2 else x[..., :3]
    if channels == 1:
        return color if n <= 2 else (color @ np.asarray(_LUMA, np.float32))[..., None]
    rgb = np.repeat(color, 3, axis=2) if n <= 2 else color
    if channels == 3:
        return rgb
    alpha = x[..., -1:] if n in (2, 4) else np.full_like(x[..., :1], 255.0)
    return np.concatenate([rgb, alpha], axis=2)


def _conversions(modes: dict, channels: int, total: int) -> str:
    """What the colour conversion did to files of other modes, e.g. " (2 of 40 grayscale: channel repeated)"."""
    notes = []
    for n in sorted(modes):
        if n == channels:
            continue
        steps = []
        if channels == 1 and n >= 3:
            steps.append("converted to grayscale as 0.299 R + 0.587 G + 0.114 B")
        if channels >= 3 and n <= 2:
            steps.append("channel repeated")
        if n in (2, 4) and channels != 4:
            steps.append("alpha dropped")
        if channels == 4 and n in (1, 3):
            steps.append("opaque alpha added")
        count = "all" if modes[n] == total else f"{modes[n]} of {total}"
        notes.append(f"{count} {_MODES[n]}: {', '.join(steps)}")
    return f" ({'; '.join(notes)})" if notes else ""
