"""Minimal DNG files for tests, written with tifffile: IFD0 holds an 8-bit RGB preview (NewSubFileType 1, as
cameras store it), a SubIFD the 16-bit Bayer (CFA) sensor data; LibRaw (rawpy) reads both."""

import numpy as np

DNG_TAGS = [
    (50706, "B", 4, (1, 4, 0, 0), True),  # DNGVersion
    (50707, "B", 4, (1, 1, 0, 0), True),  # DNGBackwardVersion
    (50708, "s", 0, "mlx-blip2 test camera", True),  # UniqueCameraModel
    (271, "s", 0, "mlx-blip2", True),  # Make
    (272, "s", 0, "test", True),  # Model
]
CFA_TAGS = [
    (33421, "H", 2, (2, 2), True),  # CFARepeatPatternDim
    (33422, "B", 4, (0, 1, 1, 2), True),  # CFAPattern: RGGB
    (50710, "B", 3, (0, 1, 2), True),  # CFAPlaneColor
    (50717, "I", 1, 4095, True),  # WhiteLevel
]


def write_dng(path, preview: np.ndarray | None, seed: int = 0) -> None:
    """A DNG whose embedded preview is ``preview`` ((H, W, 3) uint8), or one without a preview when None."""
    import tifffile

    h, w = (preview.shape[:2] if preview is not None else (32, 48))
    sensor = np.random.default_rng(seed).integers(0, 4000, (h * 2, w * 2)).astype(np.uint16)
    with tifffile.TiffWriter(path) as tif:
        if preview is not None:
            tif.write(preview, photometric="rgb", subfiletype=1, subifds=1, extratags=DNG_TAGS)
            tif.write(sensor, photometric=32803, subfiletype=0, extratags=CFA_TAGS)
        else:
            tif.write(sensor, photometric=32803, subfiletype=0, extratags=DNG_TAGS + CFA_TAGS)
