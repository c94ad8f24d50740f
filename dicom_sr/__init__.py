"""The DICOM objects the node produces (SEG, SR, Secondary Capture), one module per IOD."""
