"""node.core.dicom: the statuses mean what PS3.4 says, functional groups resolve per frame."""

from __future__ import annotations

import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from node.core import dicom
from node.core.errors import ConfigurationError, InputError, NodeError, WorkFailed, exit_code
from node.core.settings import ConfigError
from node.core.tls import TLSConfigError


def test_store_outcomes_follow_ps3_4() -> None:
    assert {0xB000, 0xB006, 0xB007} == dicom.STORE_WARNINGS
    assert all(dicom.stored(code) for code in (0x0000, 0xB000, 0xB006, 0xB007))
    # A general DIMSE warning is not a storage outcome, and a failure is no delivery.
    assert not any(dicom.stored(code) for code in (0x0107, 0xA700, 0xA900, 0xC000, 0x0122))
    assert dicom.out_of_resources(0xA700) and dicom.out_of_resources(0xA7FF)
    assert not dicom.out_of_resources(0xA900)
    assert dicom.is_pending(0xFF00) and dicom.is_pending(0xFF01)
    assert not dicom.is_pending(0x0000) and not dicom.is_pending(0xFE00)


def test_sop_classes_are_the_standards() -> None:
    assert dicom.CT_IMAGE_STORAGE == "1.2.840.10008.5.1.4.1.1.2"
    assert dicom.ENHANCED_CT_IMAGE_STORAGE == "1.2.840.10008.5.1.4.1.1.2.1"
    assert dicom.SEGMENTATION_STORAGE == "1.2.840.10008.5.1.4.1.1.66.4"
    assert dicom.LABELMAP_SEGMENTATION_STORAGE == "1.2.840.10008.5.1.4.1.1.66.7"
    assert pydicom.uid.UID(dicom.COMPREHENSIVE_3D_SR_STORAGE).name == "Comprehensive 3D SR Storage"


def _group(**items: float) -> Dataset:
    group = Dataset()
    for keyword, value in items.items():
        item = Dataset()
        item.SliceThickness = value
        setattr(group, keyword, DicomSequence([item]))
    return group


def test_functional_group_per_frame_wins_over_shared() -> None:
    ds = Dataset()
    ds.SharedFunctionalGroupsSequence = DicomSequence([_group(PixelMeasuresSequence=1.0)])
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(
        [_group(), _group(PixelMeasuresSequence=2.0)]
    )
    assert dicom.functional_group(ds, 0, "PixelMeasuresSequence").SliceThickness == 1.0
    assert dicom.functional_group(ds, 1, "PixelMeasuresSequence").SliceThickness == 2.0
    assert dicom.functional_group(ds, 0, "PlanePositionSequence") is None
    items = list(dicom.functional_group_items(ds, "PixelMeasuresSequence"))
    assert [i.SliceThickness for i in items] == [1.0, 2.0]


def test_every_node_error_has_one_base_and_a_role() -> None:
    assert issubclass(ConfigError, ConfigurationError) and issubclass(TLSConfigError, NodeError)
    assert not issubclass(TLSConfigError, ValueError)  # callers catch the role, not ValueError
    assert exit_code(ConfigurationError("x")) == 2 and exit_code(InputError("x")) == 2
    assert exit_code(WorkFailed("x")) == 1
