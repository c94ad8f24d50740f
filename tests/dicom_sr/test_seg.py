"""The SEG: validity, masks read back, segments, equipment and references."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from dicom_sr.common import AlgorithmInfo, allocate_uids, slice_references
from dicom_sr.seg import LOAT_SEGMENT, TUMOR_SEGMENT, build_seg
from tests.conftest import require_tool, run_tool
from tests.dicom_sr.conftest import (
    ALGORITHM,
    Case,
    assert_study_attributes,
    dciodvfy,
    referenced_uids,
)


def _read_masks(case: Case, path_key: str) -> np.ndarray:
    """The SEG's segments 1 and 2 as ``[k, j, i, segment]`` in the arterial grid's order."""
    seg = hd.seg.segread(case.paths[path_key])
    references = slice_references(case.sources)
    if references[0].frame_number is None:
        pixels = seg.get_pixels_by_source_instance(
            [ref.sop_instance_uid for ref in references],
            segment_numbers=[TUMOR_SEGMENT, LOAT_SEGMENT],
        )
    else:
        pixels = seg.get_pixels_by_source_frame(
            references[0].sop_instance_uid,
            [int(ref.frame_number or 0) for ref in references],
            segment_numbers=[TUMOR_SEGMENT, LOAT_SEGMENT],
        )
    return np.asarray(pixels).astype(bool)


@pytest.mark.parametrize("key", ["seg", "seg_empty"])
def test_dciodvfy_clean(case: Case, key: str) -> None:
    errors, warnings = dciodvfy(case.paths[key])
    assert errors == []
    assert warnings == []


def test_masks_read_back_equal(case: Case) -> None:
    pixels = _read_masks(case, "seg")
    assert np.array_equal(pixels[..., 0], case.tumor)
    assert np.array_equal(pixels[..., 1], case.loat)


def test_empty_tumor_still_two_segments(case: Case) -> None:
    ds = pydicom.dcmread(case.paths["seg_empty"])
    assert [int(item.SegmentNumber) for item in ds.SegmentSequence] == [1, 2]
    # Every frame is written (omit_empty_frames=False): 2 segments x all slices.
    assert int(ds.NumberOfFrames) == 2 * case.tumor.shape[0]
    pixels = _read_masks(case, "seg_empty")
    assert not pixels[..., 0].any()
    assert np.array_equal(pixels[..., 1], case.loat)


def test_segments_and_attributes(case: Case) -> None:
    ds = pydicom.dcmread(case.paths["seg"])
    assert ds.SegmentationType == "BINARY"
    tumor, loat = ds.SegmentSequence
    assert tumor.SegmentLabel == "Liver tumor"
    assert tumor.SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"
    assert tumor.AnatomicRegionSequence[0].CodeValue == "10200004"
    assert loat.SegmentLabel == "Lesser omental adipose tissue"
    assert loat.SegmentedPropertyTypeCodeSequence[0].CodeValue == "55603005"
    assert loat.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "85756007"
    assert loat.AnatomicRegionSequence[0].CodeValue == "27398004"
    for item, tracking in (
        (tumor, case.uids.tumor_tracking_uid),
        (loat, case.uids.loat_tracking_uid),
    ):
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == ALGORITHM.name
        assert algorithm.AlgorithmVersion == ALGORITHM.version
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
        assert item.TrackingUID == tracking
        assert len(item.RecommendedDisplayCIELabValue) == 3
    assert ds.SeriesNumber == 9001
    assert ds.SeriesInstanceUID == case.uids.seg_series_uid
    assert_study_attributes(ds, case.sources[0])
    assert referenced_uids(ds) <= case.source_uids
    assert referenced_uids(ds) == case.source_uids


def test_manual_has_no_algorithm_identification(classic: Case) -> None:
    seg = build_seg(
        classic.sources,
        classic.tumor,
        classic.loat,
        algorithm=ALGORITHM,
        uids=allocate_uids(),
        manual=True,
    )
    for item in seg.SegmentSequence:
        assert item.SegmentAlgorithmType == "MANUAL"
        assert "SegmentationAlgorithmIdentificationSequence" not in item


def test_rejects_mismatched_masks(classic: Case) -> None:
    uids = allocate_uids()
    with pytest.raises(ValueError, match="slices"):
        build_seg(
            classic.sources, classic.tumor[1:], classic.loat[1:], algorithm=ALGORITHM, uids=uids
        )
    with pytest.raises(ValueError, match="shape"):
        build_seg(
            classic.sources, classic.tumor, classic.loat[:, 1:], algorithm=ALGORITHM, uids=uids
        )
    with pytest.raises(ValueError, match="binary"):
        build_seg(
            classic.sources,
            classic.tumor.astype(np.uint8) * 3,
            classic.loat,
            algorithm=ALGORITHM,
            uids=uids,
        )
    with pytest.raises(ValueError):
        AlgorithmInfo("x", "1", "", "m", "v", demo=False)


def test_dcmqi_reads_masks_back(case: Case, tmp_path_factory: pytest.TempPathFactory) -> None:
    tool = require_tool("segimage2itkimage", "dcmqi (pip install dcmqi)", venv=True)
    out = tmp_path_factory.mktemp(f"dcmqi_{case.kind}")
    run_tool(tool, "--inputDICOM", case.paths["seg"], "--outputDirectory", out, "-t", "nrrd")
    for number, mask in ((TUMOR_SEGMENT, case.tumor), (LOAT_SEGMENT, case.loat)):
        image = sitk.ReadImage(str(out / f"{number}.nrrd"))
        # dcmqi writes the volume of the frames present, in the source's grid (same spacing and
        # orientation); place it in the full arterial grid by its origin.
        array = sitk.GetArrayFromImage(image).astype(bool)
        k0 = round((image.GetOrigin()[2] - _origin_z(case)) / case.spacing[2])
        full = np.zeros_like(mask)
        full[k0 : k0 + array.shape[0]] = array
        assert np.array_equal(full, mask), number


def _origin_z(case: Case) -> float:
    reference = slice_references(case.sources)[0]
    if reference.frame_number is None:
        return float(reference.dataset.ImagePositionPatient[2])
    frame = reference.dataset.PerFrameFunctionalGroupsSequence[reference.frame_number - 1]
    return float(frame.PlanePositionSequence[0].ImagePositionPatient[2])


def test_overlapping_masks_keep_both_segments(classic: Case) -> None:
    """Masks that do not overlap go to highdicom as a label map (for speed); overlapping ones
    (a supplied SEG may overlap) as a stack, so that each segment keeps every pixel."""
    assert pydicom.dcmread(classic.paths["seg"]).SegmentsOverlap == "NO"
    loat = classic.loat | classic.tumor
    seg = build_seg(
        classic.sources,
        classic.tumor.astype(np.uint8),  # the segmenter's dtype
        loat,
        algorithm=ALGORITHM,
        uids=allocate_uids(),
    )
    assert seg.SegmentsOverlap == "YES"
    pixels = seg.get_pixels_by_source_instance(
        [ref.sop_instance_uid for ref in slice_references(classic.sources)],
        segment_numbers=[TUMOR_SEGMENT, LOAT_SEGMENT],
    )
    assert np.array_equal(np.asarray(pixels[..., 0], dtype=bool), classic.tumor)
    assert np.array_equal(np.asarray(pixels[..., 1], dtype=bool), loat)
