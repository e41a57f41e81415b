"""Image folders as calibration data: colour mode, resize policies, scaling, mean/std, the description, errors."""

import io

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras
from absl.testing import flagsaver

from qtoolkit import calibrate, convert, prepare

RGB = [("x", (None, 8, 8, 3), np.float32)]
GRAY = [("x", (None, 8, 8, 1), np.float32)]


def _write(folder, name, pixels):
    folder.mkdir(exist_ok=True)
    pixels = tf.constant(np.asarray(pixels, np.uint8))
    data = tf.io.encode_jpeg(pixels, quality=100) if name.endswith(".jpg") else tf.io.encode_png(pixels)
    (folder / name).write_bytes(data.numpy())
    return folder


def _load(folder, specs=RGB, **kwargs):
    lines = []
    source = calibrate.open_source(str(folder), specs, log=lines.append, **kwargs)
    assert len(lines) == 1 and lines[0] == source.preprocessing
    return source.collect(source.num_samples)[0], lines[0]


def _random(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)


def test_stretch_resizes_to_the_model_size_and_maps_0_255_to_the_scale(tmp_path):
    img = _random((8, 16, 3))
    x, line = _load(_write(tmp_path / "a", "a.png", img), image_scale=(-1, 1))
    expected = tf.image.resize(img.astype(np.float32), (8, 8)).numpy() / 255 * 2 - 1
    np.testing.assert_allclose(x[0], expected, atol=1e-6)
    assert "resized (stretch: aspect ratio not kept) to 8x8 (the model's input size)" in line
    assert "0..255 -> [-1, 1], mean/std none" in line
    # The scale mapping itself, on an image of the right size (not resized): 0 -> low, 255 -> high, linear.
    edges = np.zeros((8, 8, 3), np.uint8)
    edges[:, 4:] = 255
    edges[0, 0] = 51
    x, line = _load(_write(tmp_path / "b", "b.png", edges), image_scale="-1,3")
    assert "already 8x8 (the model's input size), not resized, 0..255 -> [-1, 3]" in line
    assert x[0, 1, 0, 0] == -1 and x[0, 0, 7, 0] == 3
    assert x[0, 0, 0, 0] == pytest.approx(-1 + 51 / 255 * 4)


def test_crop_keeps_the_centre(tmp_path):
    img = _random((8, 16, 3))
    # Scale 1 (the short side already fits): exactly the centre 8 columns.
    x, line = _load(_write(tmp_path / "a", "wide.png", img), image_resize="crop")
    np.testing.assert_allclose(x[0], img[:, 4:12] / 255, atol=1e-6)
    assert "resized (crop: scaled to cover, centre kept) to 8x8" in line
    # Scaled down (short side 16 -> 8): the centre of the image, the bands at both ends cut off.
    tall = np.zeros((32, 16, 3), np.uint8)
    tall[:8] = (255, 0, 0)
    tall[8:24] = (0, 255, 0)
    tall[24:] = (0, 0, 255)
    x, _ = _load(_write(tmp_path / "b", "tall.png", tall), image_resize="crop")
    np.testing.assert_allclose(x[0], np.broadcast_to([0.0, 1.0, 0.0], (8, 8, 3)), atol=1e-6)


def test_pad_keeps_the_aspect_ratio_with_black_borders(tmp_path):
    img = _random((4, 8, 3))
    # 4x8 into 8x8 (--image_size 8x8 here, the model's too): fits as is, 2 black rows above and below.
    x, line = _load(_write(tmp_path / "a", "wide.png", img), image_resize="pad", image_size="8x8",
                    image_scale=(-1, 1))
    np.testing.assert_allclose(x[0, 2:6], img / 255 * 2 - 1, atol=1e-6)
    assert (x[0, :2] == -1).all() and (x[0, 6:] == -1).all()
    assert "resized (pad: scaled to fit, aspect ratio kept, black borders) to 8x8 (--image_size)" in line
    # 8x16 scaled by 1/2 to 4x8 (aspect 1:2 kept), centred.
    big = _random((8, 16, 3), seed=1)
    x, _ = _load(_write(tmp_path / "b", "big.png", big), image_resize="pad")
    np.testing.assert_allclose(x[0, 2:6], tf.image.resize(big.astype(np.float32), (4, 8)).numpy() / 255,
                               atol=1e-5)
    assert (x[0, :2] == 0).all() and (x[0, 6:] == 0).all()


def test_mean_and_std_per_channel_after_the_scaling(tmp_path):
    folder = _write(tmp_path / "a", "c.png", np.broadcast_to(np.uint8([10, 100, 200]), (8, 8, 3)))
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)
    x, line = _load(folder, image_mean=mean, image_std="0.5,0.25,0.125")
    expected = (np.array([10, 100, 200]) / 255 - mean) / std
    np.testing.assert_allclose(x[0], np.broadcast_to(expected, (8, 8, 3)), rtol=1e-5)
    assert line.endswith("then (x - mean) / std with mean 0.1,0.2,0.3 and std 0.5,0.25,0.125 "
                         "(set with --image_size, --image_resize, --image_scale, --image_mean, --image_std)")
    # One value applies to every channel; after a scale of [-1, 1].
    x, line = _load(folder, image_scale=(-1, 1), image_mean=0.5)
    np.testing.assert_allclose(x[0, 0, 0], np.array([10, 100, 200]) / 255 * 2 - 1 - 0.5, rtol=1e-5)
    assert "then x - mean with mean 0.5" in line


def test_colour_mode_follows_the_model_and_is_stated(tmp_path):
    folder = _write(tmp_path / "a", "a_rgb.png", np.broadcast_to(np.uint8([30, 60, 90]), (8, 8, 3)))
    _write(folder, "b_gray.png", np.full((8, 8, 1), 77, np.uint8))
    _write(folder, "c_photo.jpg", np.broadcast_to(np.uint8([200, 100, 50]), (8, 8, 3)))
    x, line = _load(folder)  # 3-channel model: the grayscale file's channel repeated
    assert line.startswith(f"images: 3 files from {folder} decoded as RGB (1 of 3 grayscale: channel repeated), "
                           "already 8x8")
    np.testing.assert_allclose(x[1], np.full((8, 8, 3), 77 / 255), atol=1e-6)
    np.testing.assert_allclose(x[2, 4, 4], np.array([200, 100, 50]) / 255, atol=3 / 255)  # JPEG: lossy
    x, line = _load(folder, GRAY)  # 1-channel model: RGB files converted to grayscale
    assert "decoded as grayscale (2 of 3 RGB: converted to grayscale as 0.299 R + 0.587 G + 0.114 B)" in line
    assert x.shape == (3, 8, 8, 1)
    assert x[0, 0, 0, 0] == pytest.approx((0.299 * 30 + 0.587 * 60 + 0.114 * 90) / 255, abs=1e-6)
    assert x[1, 0, 0, 0] == pytest.approx(77 / 255)


def _model():
    inp = keras.Input((8, 8, 3), name="x")
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inp)
    out = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(h))
    return keras.Model(inp, out)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images") / "calib"
    for i in range(12):
        _write(folder, f"{i:02d}.png", _random((10, 16, 3), seed=i))
    model_path = tmp_path_factory.mktemp("model") / "m.keras"
    _model().save(model_path)
    return folder, model_path


def test_prepare_logs_the_preprocessing_once(images):
    folder, model_path = images
    lines = []
    prepared = prepare.prepare(str(model_path), str(folder), "int8", num_calibration_samples=8,
                               num_verification_samples=4, progress=False, image_resize="crop",
                               image_scale=(-1, 1), image_mean=0.5, image_std=0.5, log=lines.append)
    described = [line for line in lines if line.startswith("images:")]
    assert described == [f"images: 12 files from {folder} decoded as RGB, resized (crop: scaled to cover, centre "
                         "kept) to 8x8 (the model's input size), 0..255 -> [-1, 1], then (x - mean) / std with "
                         "mean 0.5 and std 0.5 (set with --image_size, --image_resize, --image_scale, "
                         "--image_mean, --image_std)"]
    # The samples are the crop's: the 10x16 image scaled by 0.8 to 8x13, its centre 8 columns, (x - 0.5) / 0.5.
    first = _random((10, 16, 3), seed=8)  # the 9th file: the first verification sample
    expected = tf.image.resize(first.astype(np.float32), (8, 13)).numpy()[:, 2:10] / 255 * 2 - 1
    np.testing.assert_allclose(prepared.verification_inputs[0][0], (expected - 0.5) / 0.5, atol=1e-5)


def test_non_image_data_notes_that_the_image_flags_do_not_apply():
    lines = []
    calibrate.open_source(np.zeros((4, 8, 8, 3), np.float32), RGB, image_resize="pad", log=lines.append)
    assert lines == ["note: calibration array is not a folder of images: --image_size, --image_resize, "
                     "--image_mean and --image_std do not apply to it"]


BAD = [
    (dict(image_mean="0.5,0.5"), "--image_mean has 2 values (0.5,0.5); give one value or one per channel: the "
                                 "model's image input has 3 channel(s)"),
    (dict(image_std=(0.2, 0.2, 0.2, 0.2)), "--image_std has 4 values"),
    (dict(image_std="0.2,0,0.2"), "--image_std must be positive"),
    (dict(image_mean="0.5,x"), "--image_mean must be one number or one per channel"),
    (dict(image_resize="fit"), "--image_resize must be one of stretch, crop, pad, got 'fit'"),
    (dict(image_size="0x8"), "--image_size must be HEIGHTxWIDTH with positive integers"),
    (dict(image_scale=(1, 1)), "--image_scale must be two different numbers"),
]


@pytest.mark.parametrize("kwargs,fragment", BAD, ids=[b[1][:22] for b in BAD])
def test_bad_values_name_the_flag(tmp_path, kwargs, fragment):
    folder = _write(tmp_path / "a", "a.png", _random((8, 8, 3)))
    with pytest.raises(calibrate.DataError, match="^" + fragment.replace("(", r"\(").replace(")", r"\)")):
        calibrate.open_source(str(folder), RGB, **kwargs)


def test_unreadable_image_names_the_file(tmp_path):
    folder = _write(tmp_path / "a", "a.png", _random((8, 8, 3)))
    (folder / "b.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(calibrate.DataError, match=r"b\.jpg: cannot decode image .*remove the file"):
        calibrate.open_source(str(folder), RGB)


def test_command_line_prints_the_description_and_rejects_bad_values(images, tmp_path, capsys):
    folder, model_path = images
    out = io.StringIO()
    convert.run(str(model_path), None, str(folder), num_calibration_samples=8, num_verification_samples=4,
                image_size="8x8", image_scale="-1,1", image_resize="pad", image_mean="0.5", image_std="0.25",
                out=out)
    described = [line for line in out.getvalue().splitlines() if line.startswith("images:")]
    assert len(described) == 1
    assert "resized (pad: scaled to fit, aspect ratio kept, black borders) to 8x8 (--image_size)" in described[0]
    assert "0..255 -> [-1, 1], then (x - mean) / std with mean 0.5 and std 0.25" in described[0]
    flags = dict(model=str(model_path), output=str(tmp_path / "m.tflite"), calibration_data=str(folder),
                 image_mean="0.4,0.5")
    with flagsaver.flagsaver(**flags):
        rc = convert.main(["convert"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and err[0].startswith("error: --image_mean has 2 values"), err
    assert not (tmp_path / "m.tflite").exists()
