"""The CT writer of the phantom studies: what it writes passes dciodvfy, and bad input is refused.

Round trips through the reader are in tests/node/analysis/test_dicomio.py, which writes its
series with this writer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset

from node.analysis.dicomio import DicomIOError
from tests.conftest import require_tool
from tests.node.analysis.test_dicomio import (
    CORONAL,
    OBLIQUE,
    dciodvfy_errors,
    make_header,
    make_volume,
    write,
)


def test_dciodvfy_classic_enhanced_and_localizer(tmp_path: Path) -> None:
    require_tool("dciodvfy", "dicom3tools")
    classic = write(tmp_path, "classic", direction=OBLIQUE)
    unsigned = write(tmp_path, "unsigned", pixel_representation=0, descending=True)
    minimal = Dataset()  # every Type 1 UID generated, every Type 2 attribute empty
    bare = write(tmp_path, "bare", make_volume((3, 40, 48)), header=minimal)
    enhanced = write(tmp_path, "enhanced", enhanced=True, direction=OBLIQUE)
    bare_enhanced = write(tmp_path, "bare_enh", header=Dataset(), enhanced=True)
    localizer = write(
        tmp_path,
        "loc",
        make_volume((1, 40, 48)),
        header=make_header(ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]),
        direction=CORONAL,
    )
    for path in [*classic, *unsigned, *bare, *enhanced, *bare_enhanced, *localizer]:
        assert dciodvfy_errors(path) == [], path


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pixel_representation": 2}, "pixel_representation"),
        ({"rescale_slope": 0.0}, "rescale_slope"),
        ({"direction": (1, 0, 0, 0, 2, 0, 0, 0, 1)}, "orthonormal"),
        ({"spacing_mm": (0.7, 0.0, 2.5)}, "spacing_mm"),
    ],
)
def test_write_rejects_bad_options(tmp_path: Path, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(DicomIOError, match=match):
        write(tmp_path, "bad", **kwargs)


def test_write_rejects_non_finite_and_non_ct(tmp_path: Path) -> None:
    volume = make_volume()
    volume[1, 2, 3] = np.nan
    with pytest.raises(DicomIOError, match="NaN"):
        write(tmp_path, "nan", volume)
    with pytest.raises(DicomIOError, match="only CT"):
        write(tmp_path, "mr", header=make_header(Modality="MR"))
