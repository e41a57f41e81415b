"""Representative data: arrays, .npy/.npz files, image folders, TFRecords, tf.data, generators.

    src = open_source("calib.npy", specs)          # specs: [(name, shape, dtype)] of the model inputs
    for batch in src.take(500, batch_size=32):     # a list with one array per model input
        ...
    held_out = src.collect(200)                    # the next 200 samples, in memory

A source is a cursor over samples: `take` streams batches from where the
previous call stopped, so calibration and verification never overlap.
`.npy` files are read from disk batch by batch, never whole.  Each batch
is checked against the model's inputs (rank, shape, numeric dtype, NaN/Inf);
a problem raises `DataError` naming the input, the sample and the fix.

A folder of images (`images.py`) is decoded, converted to the model's channel count,
resized, scaled and normalized as `ImagePreprocessing` says (image_size,
image_resize, image_scale, image_mean, image_std); the source's
`preprocessing` describes what was done in one line, which `open_source`
hands to its `log`.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Optional, Sequence

import numpy as np
from qtoolkit.errors import DataError  # noqa: F401  (raised here; defined with the others)

from qtoolkit.calibrate import records
from qtoolkit.calibrate.images import ImagePreprocessing


Spec = tuple  # (name, shape with batch axis, dtype)


def _check(arrays: list[np.ndarray], specs: Sequence[Spec], where: str, offset: int,
           full_shapes: Optional[list] = None) -> list[np.ndarray]:
    if len(arrays) != len(specs):
        raise DataError(f"{where}: the model has {len(specs)} inputs ({', '.join(s[0] for s in specs)}) "
                        f"but the data gives {len(arrays)}; give an .npz with one array per input name")
    out = []
    for i, (a, (name, shape, dtype)) in enumerate(zip(arrays, specs)):
        a = np.asarray(a)
        shown = full_shapes[i] if full_shapes else a.shape
        if a.dtype.kind not in "fiub" or a.dtype == np.bool_:
            raise DataError(f"{where}: input {name!r} has dtype {a.dtype}; calibration data must be numeric "
                            "(float32, already preprocessed as the model expects)")
        want = tuple(shape[1:])
        if a.ndim != len(want) + 1 or any(w is not None and w != s for w, s in zip(want, a.shape[1:])):
            raise DataError(f"{where}: input {name!r} expects samples of shape "
                            f"{tuple('?' if w is None else w for w in want)} (array shape (N, "
                            f"{', '.join('?' if w is None else str(w) for w in want)})), got array shape "
                            f"{shown}; samples go on axis 0, preprocessed as the model expects")
        if a.dtype.kind == "f":
            bad = ~np.isfinite(a.reshape(a.shape[0], -1)).all(axis=1)
            if bad.any():
                i = int(np.argmax(bad))
                raise DataError(f"{where}: input {name!r} has NaN or Inf in sample {offset + i}; "
                                "remove or repair those samples")
        out.append(a.astype(np.float32) if np.dtype(dtype).kind == "f" else a.astype(dtype))
    return out


class Source:
    """A cursor over samples (see the module docstring)."""

    def __init__(self, specs: Sequence[Spec], description: str, num_samples: Optional[int]):
        self.specs = list(specs)
        self.description = description
        self.num_samples = num_samples
        self.position = 0
        self.preprocessing: Optional[str] = None  # an image folder's decoding, resize and scaling, in words

    def _next(self, n: int) -> Optional[list[np.ndarray]]:
        raise NotImplementedError

    def take(self, n: int, batch_size: int = 32) -> Iterator[list[np.ndarray]]:
        """Yields batches totalling `n` samples; DataError if the data runs out first."""
        remaining = n
        while remaining > 0:
            batch = self._next(min(batch_size, remaining))
            if batch is None or batch[0].shape[0] == 0:
                raise DataError(f"{self.description}: only {self.position} samples available, but "
                                f"{self.position + remaining} were needed; give more data or ask for fewer "
                                "samples (--num_calibration_samples / --num_verification_samples)")
            batch = _check(batch, self.specs, self.description, self.position)
            self.position += batch[0].shape[0]
            remaining -= batch[0].shape[0]
            yield batch

    def skip(self, n: int) -> None:
        """Moves past the next `n` samples (a stream reads and drops them; arrays and files just seek)."""
        for _ in self.take(n, 256):
            pass

    def collect(self, n: int, batch_size: int = 256) -> list[np.ndarray]:
        """The next `n` samples as one array per input."""
        parts = list(self.take(n, batch_size))
        return [np.concatenate([p[i] for p in parts]) for i in range(len(self.specs))]


class ArraySource(Source):
    """Arrays (or memory-mapped .npy files), one per model input."""

    def __init__(self, arrays: list[np.ndarray], specs, description):
        lengths = {len(a) for a in arrays}
        if 0 in lengths:
            raise DataError(f"{description}: no samples (the array is empty)")
        # Shape and dtype of the whole arrays, before anything runs.
        _check([a[:1] for a in arrays], specs, description, 0, [a.shape for a in arrays])
        if len(lengths) != 1:
            raise DataError(f"{description}: inputs have different numbers of samples {sorted(lengths)}")
        n = lengths.pop()
        super().__init__(specs, description, n)
        self.arrays = arrays

    def _next(self, n):
        if self.position >= self.num_samples:
            return None
        return [np.asarray(a[self.position:self.position + n]) for a in self.arrays]

    def skip(self, n: int) -> None:
        if self.position + n > self.num_samples:
            raise DataError(f"{self.description}: {self.num_samples} samples, cannot skip to sample "
                            f"{self.position + n}")
        self.position += n


class IterableSource(Source):
    """A tf.data.Dataset or a generator of batches (or of single samples)."""

    def __init__(self, iterable, specs, description):
        super().__init__(specs, description, None)
        self._it = iter(iterable)
        self._pending: Optional[list[np.ndarray]] = None

    def _pull(self):
        try:
            item = next(self._it)
        except StopIteration:
            return None
        if isinstance(item, dict):
            item = [item[s[0]] for s in self.specs] if all(s[0] in item for s in self.specs) else list(item.values())
        elif isinstance(item, (list, tuple)):
            item = list(item)[:len(self.specs)] if len(self.specs) == 1 and len(item) == 2 and \
                np.ndim(item[1]) <= 1 else list(item)   # (x, y) pairs: keep x
        else:
            item = [item]
        item = [np.asarray(getattr(a, "numpy", lambda a=a: a)()) for a in item]
        # Single samples (no batch axis) get one.
        return [a[None] if a.ndim == len(s[1]) - 1 else a for a, s in zip(item, self.specs)]

    def _next(self, n):
        if self._pending is None:
            self._pending = self._pull()
            if self._pending is None:
                return None
        batch = [a[:n] for a in self._pending]
        rest = [a[n:] for a in self._pending]
        self._pending = rest if rest[0].shape[0] else None
        return batch


class NpyFile:
    """A .npy array read from disk slice by slice (samples on axis 0).

    Unlike a memory map, the pages read are not kept mapped into the process,
    so resident memory stays flat however many samples stream through.
    """

    def __init__(self, path: str):
        mm = np.load(path, mmap_mode="r", allow_pickle=False)
        if not isinstance(mm, np.memmap):
            raise DataError(f"{path}: expected a .npy array")
        self.path, self.shape, self.dtype, self.offset = path, mm.shape, mm.dtype, mm.offset
        self.fortran = mm.flags.f_contiguous and mm.ndim > 1 and not mm.flags.c_contiguous
        self.ndim = mm.ndim
        del mm

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, index):
        if not isinstance(index, slice) or self.fortran:
            return np.load(self.path, mmap_mode="r", allow_pickle=False)[index]
        start, stop, step = index.indices(self.shape[0])
        if step != 1:
            return np.load(self.path, mmap_mode="r", allow_pickle=False)[index]
        per_sample = int(np.prod(self.shape[1:], dtype=np.int64))
        count = max(stop - start, 0) * per_sample
        with open(self.path, "rb") as f:
            f.seek(self.offset + start * per_sample * self.dtype.itemsize)
            data = np.fromfile(f, dtype=self.dtype, count=count)
        return data.reshape((max(stop - start, 0), *self.shape[1:]))


def _load_images(folder: str, spec: Spec, prep: "ImagePreprocessing") -> tuple[np.ndarray, str]:
    return prep.load_folder(folder, spec[1])


def open_source(data: Any, specs: Sequence[Spec], image_size=None, image_scale=(0.0, 1.0), *, image_mean=None,
                image_std=None, image_resize: str = "stretch", log=None) -> Source:
    """Opens calibration data for a model with inputs `specs`.

    Args:
      data: a numpy array; a list/tuple/dict of arrays (one per input); a path
        to a .npy (one input), a .npz (arrays named like the inputs, or a single
        array), a folder of images or TFRecord files (`.tfrecord`, a glob pattern
        allowed: calibrate/records.py); a tf.data.Dataset; or an iterable /
        generator of batches.
      specs: (name, shape, dtype) of each model input.
      image_size: image folders: (height, width) or "HxW" to resize to (default: the model's).
      image_scale: image folders: the real range (low, high) pixel values 0..255 are mapped to.
      image_mean, image_std: image folders: (x - mean) / std after the scaling, per channel (one value or one
        per channel; a number, a sequence or a comma-separated string); default none.
      image_resize: image folders: "stretch" to the size (aspect ratio not kept), "crop" (cover, centre kept)
        or "pad" (fit, aspect ratio kept, black borders).  See `ImagePreprocessing`.
      log: a function that takes progress messages: an image folder's preprocessing is described to it in
        one line (also kept as the source's `preprocessing`).

    Raises:
      DataError: missing, unreadable or mismatched data, or bad image preprocessing values (naming the flag).
    """
    prep = ImagePreprocessing(image_size, image_scale, image_mean, image_std, image_resize)
    source = _open(data, specs, prep)
    if log is not None and source.preprocessing:
        log(source.preprocessing)
    elif log is not None and (image_size is not None or image_mean is not None or image_std is not None
                              or image_resize != "stretch"):
        log(f"note: {source.description} is not a folder of images: --image_size, --image_resize, --image_mean "
            "and --image_std do not apply to it")
    return source


def _open(data: Any, specs: Sequence[Spec], prep: ImagePreprocessing) -> Source:
    if isinstance(data, np.ndarray):
        return ArraySource([data], specs, "calibration array")
    if isinstance(data, dict):
        missing = [s[0] for s in specs if s[0] not in data]
        if missing:
            raise DataError(f"calibration data has no array for input(s) {', '.join(missing)}; "
                            f"keys given: {', '.join(map(str, data))}")
        return ArraySource([np.asarray(data[s[0]]) for s in specs], specs, "calibration arrays")
    if isinstance(data, (list, tuple)) and data and all(isinstance(a, np.ndarray) for a in data):
        return ArraySource(list(data), specs, "calibration arrays")
    if isinstance(data, (str, os.PathLike)):
        path = os.fspath(data)
        if records.is_records(path):
            return IterableSource(records.dataset(path, specs), specs, path)
        if not os.path.exists(path):
            raise DataError(f"calibration data {path!r} does not exist; give a .npy, .npz or a folder of images")
        if os.path.isdir(path):
            images, line = _load_images(path, specs[0], prep)
            source = ArraySource([images], specs, path)
            source.preprocessing = line
            return source
        try:
            if path.endswith(".npz"):
                with np.load(path, allow_pickle=False) as npz:
                    arrays = {k: npz[k] for k in npz.files}
                if len(arrays) == 1 and len(specs) == 1:
                    return ArraySource(list(arrays.values()), specs, path)
                missing = [s[0] for s in specs if s[0] not in arrays]
                if missing:
                    raise DataError(f"{path}: no array named {', '.join(missing)} (the model's input names); "
                                    f"the file has {', '.join(arrays) or 'no arrays'}")
                return ArraySource([arrays[s[0]] for s in specs], specs, path)
            array = NpyFile(path)
        except DataError:
            raise
        except (ValueError, OSError, EOFError) as e:
            raise DataError(f"{path}: not a readable .npy/.npz file ({str(e).splitlines()[0]})") from None
        if array.ndim == 0:
            raise DataError(f"{path}: holds a scalar, expected samples on axis 0")
        return ArraySource([array], specs, path)
    if hasattr(data, "__iter__") or hasattr(data, "__next__"):
        return IterableSource(data, specs, type(data).__name__)
    raise DataError(f"unsupported calibration data of type {type(data).__name__}; give arrays, a .npy/.npz "
                    "path, a folder of images, a tf.data.Dataset or a generator")
