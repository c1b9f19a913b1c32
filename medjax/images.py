"""Single image files (PNG, JPEG, DICOM) as the uint8 [H, W, C] pixels medjax's models are trained on.

`read_image(path)` returns the pixels (C is 1 or 3) and notes of what was done to them; anything that
cannot be read raises ImageError with one line saying what is wrong. `fit` resizes and converts pixels to
a checkpoint's stored image shape. The rules (see docs/predict.md), the same
for prediction and for the image-folder datasets that models are trained on:

* PNG / JPEG (Pillow): 8-bit gray and RGB as they are; alpha dropped; palette and other colour modes
  converted to RGB; 16-bit gray scaled by its full range (round(x * 255 / 65535)); an EXIF orientation
  applied (the image as a viewer shows it).
* DICOM (pydicom): single-frame only. Monochrome images go through the Modality LUT (rescale slope and
  intercept, or the Modality LUT Sequence), then the VOI LUT Sequence (its output range scaled to 0..255)
  or else the first window center/width (DICOM's LINEAR, LINEAR_EXACT or SIGMOID function, with 0..255 as
  the output range), or else, with neither, a min-max stretch of the image to 0..255; MONOCHROME1 is then
  inverted (255 - y). RGB and YBR images are read as RGB (more than 8 bits: scaled by their full range).
* Images over `max_pixels` (default MAX_PIXELS) are refused from their header, before decoding. Pillow's
  own limit (an error above 2 * Image.MAX_IMAGE_PIXELS) still applies to PNG and JPEG.
"""

import dataclasses
import io
import os
import warnings
from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image, ImageOps

MAX_PIXELS = 8192 * 8192
ORIENTATION = 0x0112  # The EXIF orientation tag.
PIL_EXTENSIONS = (".png", ".jpg", ".jpeg")
DICOM_EXTENSIONS = (".dcm", ".dicom")
EXTENSIONS = PIL_EXTENSIONS + DICOM_EXTENSIONS


class ImageError(ValueError):
    """A file that cannot be read as an image; the message says what is wrong."""


@dataclasses.dataclass(frozen=True)
class Decoded:
    """uint8 [H, W, C] pixels (C is 1 or 3) and notes of what was done to get them."""

    pixels: np.ndarray
    notes: tuple[str, ...] = ()


def find_files(paths: Iterable[str]) -> tuple[list[str], list[str]]:
    """(inputs, skipped): each file path as given, and every file under each folder (recursively, sorted,
    hidden entries ignored) whose name ends in one of EXTENSIONS or has no extension (as DICOM files often
    do). Other files under folders are returned as skipped. A path that does not exist is an input, so that
    it gets its own error."""
    inputs, skipped = [], []
    for path in paths:
        if not os.path.isdir(path):
            inputs.append(path)
            continue
        for root, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(n for n in names if not n.startswith(".")):
                extension = os.path.splitext(name)[1].lower()
                (inputs if extension in EXTENSIONS or not extension else skipped).append(
                    os.path.join(root, name)
                )
    return inputs, skipped


def is_dicom(path: str, data: bytes | None = None) -> bool:
    """Whether the file (`data`, else read from `path`) has the DICOM preamble ('DICM' at byte 128) or
    `path` has a DICOM extension."""
    if data is None:
        with open(path, "rb") as f:
            data = f.read(132)
    return data[128:132] == b"DICM" or os.path.splitext(path)[1].lower() in DICOM_EXTENSIONS


def read_image(path: str, max_pixels: int = MAX_PIXELS, data: bytes | None = None) -> Decoded:
    """The pixels of a PNG, JPEG or DICOM file (see the module docstring); ImageError if unreadable.
    `data`: the file's bytes, when the caller has read them already (`path` then only names the file)."""
    try:
        dicom = is_dicom(path, data)
    except OSError as e:
        raise ImageError(f"cannot read the file: {e.strerror or e}") from e
    source = path if data is None else io.BytesIO(data)
    return _read_dicom(source, max_pixels) if dicom else _read_pil(source, max_pixels)


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageError(
            f"image of {width}x{height} = {width * height} pixels is over the limit of {max_pixels} pixels "
            "(possible decompression bomb); not decoded"
        )


def _full_range(values: np.ndarray, bits: int) -> np.ndarray:
    """Integers of `bits` bits scaled by their full range to 0..255."""
    return values.astype(np.float64) * (255.0 / (2**bits - 1))


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.round(values), 0, 255).astype(np.uint8)


def _read_pil(source, max_pixels: int) -> Decoded:
    notes = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # `max_pixels` decides.
            with Image.open(source, formats=("PNG", "JPEG")) as image:
                _check_size(*image.size, max_pixels)
                if getattr(image, "n_frames", 1) > 1:
                    notes.append(f"first of {image.n_frames} frames")
                image.load()
                orientation = image.getexif().get(ORIENTATION, 1)
                if orientation != 1:
                    notes.append(f"EXIF orientation {orientation} applied")
                    image = ImageOps.exif_transpose(image)
                mode = image.mode
                if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
                    notes.append("16-bit gray scaled to 8 bits (x * 255 / 65535)")
                    return Decoded(_to_uint8(_full_range(np.asarray(image), 16))[:, :, None], tuple(notes))
                if mode in ("LA", "La"):
                    notes.append("alpha channel dropped")
                    image = image.getchannel("L")
                elif mode == "1":
                    image = image.convert("L")
                elif mode in ("RGBA", "RGBa", "RGBX"):
                    notes.append("alpha channel dropped" if mode != "RGBX" else "padding channel dropped")
                    image = image.convert("RGB")
                elif mode not in ("L", "RGB"):
                    if mode in ("I", "F", "I;32"):
                        raise ImageError(f"unsupported pixel mode {mode!r} (32-bit integer or float)")
                    notes.append(f"{mode} converted to RGB")
                    image = image.convert("RGB")
                pixels = np.asarray(image)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"over Pillow's decompression-bomb limit: {e}") from e
    except Image.UnidentifiedImageError as e:
        raise ImageError("not a PNG, JPEG or DICOM image (Pillow cannot identify it)") from e
    except OSError as e:
        raise ImageError(f"cannot decode: {e.strerror or e}") from e
    except Exception as e:  # Pillow's decoders raise many types on bad data.
        raise ImageError(f"cannot decode: {type(e).__name__}: {e}") from e
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return Decoded(np.ascontiguousarray(pixels, np.uint8), tuple(notes))


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 VOI windowing onto 0..255."""
    if function == "SIGMOID":
        return 255.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0) * 255.0
    if width < 1:
        raise ImageError(f"window width {width} < 1 is not valid for the LINEAR VOI function")
    if width == 1:
        return np.where(values < center - 0.5, 0.0, 255.0)
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0) * 255.0


def _first(value) -> float:
    return float(value[0] if isinstance(value, Sequence) and not isinstance(value, str) else value)


def _read_dicom(source, max_pixels: int) -> Decoded:
    import pydicom
    from pydicom import pixels as dicom_pixels

    try:
        ds = pydicom.dcmread(source, force=True)
    except Exception as e:  # pydicom raises many types on damaged files.
        raise ImageError(f"not a readable DICOM file: {type(e).__name__}: {e}") from e
    if "PixelData" not in ds:
        raise ImageError("DICOM file has no pixel data (PixelData); it is not an image")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise ImageError(f"multi-frame DICOM ({frames} frames) is not supported; give one frame per file")
    try:
        _check_size(int(ds.Columns), int(ds.Rows), max_pixels)
        photometric = str(ds.PhotometricInterpretation).strip()
        raw = ds.pixel_array
    except ImageError:
        raise
    except Exception as e:  # Missing attributes, unsupported transfer syntax, truncated pixel data.
        raise ImageError(f"cannot decode the DICOM pixel data: {type(e).__name__}: {e}") from e
    notes = []
    if photometric in ("MONOCHROME1", "MONOCHROME2") and raw.ndim != 2:
        raise ImageError(f"monochrome DICOM pixel data of shape {raw.shape}; expected rows x columns")
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        values = dicom_pixels.apply_modality_lut(raw, ds).astype(np.float64)
        if "ModalityLUTSequence" in ds:
            notes.append("Modality LUT Sequence")
        elif "RescaleSlope" in ds or "RescaleIntercept" in ds:
            notes.append(
                f"rescale slope {ds.get('RescaleSlope', 1)} intercept {ds.get('RescaleIntercept', 0)}"
            )
        if "VOILUTSequence" in ds:
            bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
            values = _full_range(dicom_pixels.apply_voi_lut(values, ds, prefer_lut=True), bits)
            notes.append(f"VOI LUT Sequence ({bits}-bit output scaled to 0..255)")
        elif "WindowCenter" in ds and "WindowWidth" in ds:
            center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
            function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
            values = _window(values, center, width, function)
            notes.append(f"window center {center:g} width {width:g} ({function})")
        else:
            low, high = float(values.min()), float(values.max())
            values = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
            notes.append(f"no VOI LUT or window: range {low:g}..{high:g} stretched to 0..255")
        if photometric == "MONOCHROME1":
            values = 255.0 - values
            notes.append("MONOCHROME1 inverted")
        return Decoded(_to_uint8(values)[:, :, None], tuple(notes))
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420"):
        bits = int(ds.get("BitsStored") or ds.BitsAllocated)
        if photometric != "RGB":
            notes.append(f"{photometric} converted to RGB")
        if bits > 8:
            notes.append(f"{bits}-bit colour scaled to 8 bits")
            return Decoded(_to_uint8(_full_range(raw, bits)), tuple(notes))
        return Decoded(np.ascontiguousarray(raw, np.uint8), tuple(notes))
    raise ImageError(f"DICOM photometric interpretation {photometric!r} is not supported")


def fit(pixels: np.ndarray, image_shape: Sequence[int]) -> tuple[np.ndarray, tuple[str, ...]]:
    """`pixels` as `image_shape` [H, W, C]: gray <-> RGB (repeat / channel mean, as steps.preprocess does)
    and a bilinear resize (antialiased when shrinking; the aspect ratio is not kept). Returns the pixels and
    notes of what changed."""
    height, width, depth = image_shape
    notes = []
    if pixels.shape[2] != depth:
        notes.append(f"converted from {pixels.shape[2]} to {depth} channels")
        if depth == 1:
            pixels = _to_uint8(pixels.astype(np.float64).mean(axis=2, keepdims=True))
        elif pixels.shape[2] == 1:
            pixels = np.repeat(pixels, depth, axis=2)
        else:
            raise ImageError(f"cannot convert {pixels.shape[2]}-channel pixels to {depth} channels")
    if pixels.shape[:2] != (height, width):
        resized = [
            np.asarray(Image.fromarray(pixels[:, :, c]).resize((width, height), Image.Resampling.BILINEAR))
            for c in range(depth)
        ]
        notes.append(f"resized from {pixels.shape[1]}x{pixels.shape[0]} to {width}x{height} (bilinear)")
        pixels = np.stack(resized, axis=2)
    return pixels, tuple(notes)
