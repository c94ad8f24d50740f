"""What turns a study into a result.

Pairing, DICOM reading, supplied SEGs, the models and the stage chain; run by workers, `analyze`
and the training commands alike.
"""
