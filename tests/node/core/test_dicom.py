"""node.core.dicom: the statuses mean what PS3.4 says, functional groups resolve per frame,
built objects are written as pydicom writes them."""

from __future__ import annotations

from io import BytesIO

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

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


def _built(syntax: str) -> Dataset:
    """A dataset as a builder leaves it: nested items, ambiguous VRs at the root and deep down,
    a text in a character set other than the default."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = dicom.SEGMENTATION_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    ds.SOPClassUID, ds.SOPInstanceUID = dicom.SEGMENTATION_STORAGE, "1.2.3.4"
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PixelRepresentation = 1
    ds.add_new(0x00280106, "US or SS", -5)  # Smallest Image Pixel Value, signed here
    leaf = Dataset()
    leaf.add_new(0x00280107, "US or SS", -2)  # takes its sign from the root's representation
    leaf.CodeMeaning = "Lebergewebe (gr\u00fcn)"
    middle = Dataset()
    middle.ConceptNameCodeSequence = DicomSequence([leaf])
    ds.ContentSequence = DicomSequence([middle, Dataset()])
    return ds


def _plain(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_file_bytes_are_what_pydicom_writes_with_the_ambiguous_vrs_resolved() -> None:
    for syntax in (ExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian):
        expected = _plain(_built(syntax))
        written = dicom.file_bytes(_built(syntax))
        assert written == expected, syntax
        back = pydicom.dcmread(BytesIO(written))
        assert back.SmallestImagePixelValue == -5
        leaf = back.ContentSequence[0].ConceptNameCodeSequence[0]
        assert leaf.LargestImagePixelValue == -2 and leaf.CodeMeaning.endswith("(gr\u00fcn)")
        if syntax != ImplicitVRLittleEndian:
            assert back["SmallestImagePixelValue"].VR == "SS"


def test_file_bytes_of_a_dataset_read_in_another_encoding() -> None:
    # Raw elements read from an implicit-VR file are decoded and written in the new encoding.
    read = pydicom.dcmread(BytesIO(_plain(_built(ImplicitVRLittleEndian))))
    read.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    expected = _plain(pydicom.dcmread(BytesIO(_plain(_built(ExplicitVRLittleEndian)))))
    assert dicom.file_bytes(read) == expected


def test_file_bytes_copy_the_items_read_from_a_file_as_pydicom_does() -> None:
    # A source header's sequence item copied into an output keeps its raw bytes, padding and
    # all, as pydicom's writer keeps them; decoding it would write "AB" for "AB  ".
    source = _built(ExplicitVRLittleEndian)
    source.ContentSequence[0].ConceptNameCodeSequence[0].CodeMeaning = "AB  "
    read = pydicom.dcmread(BytesIO(_plain(source)))
    item = read.ContentSequence[0]

    def output() -> Dataset:
        ds = _built(ExplicitVRLittleEndian)
        ds.OtherPatientIDsSequence = DicomSequence([item])
        return ds

    assert b"AB  " in dicom.file_bytes(output())
    assert dicom.file_bytes(output()) == _plain(output())
    # A dataset read from a file is pydicom's to write, as it is.
    assert dicom.file_bytes(read) == _plain(pydicom.dcmread(BytesIO(_plain(source))))


def test_every_node_error_has_one_base_and_a_role() -> None:
    assert issubclass(ConfigError, ConfigurationError) and issubclass(TLSConfigError, NodeError)
    assert not issubclass(TLSConfigError, ValueError)  # callers catch the role, not ValueError
    assert exit_code(ConfigurationError("x")) == 2 and exit_code(InputError("x")) == 2
    assert exit_code(WorkFailed("x")) == 1
