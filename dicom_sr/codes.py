"""Every coded concept the node writes, in one place, with its source.

Sources: DICOM PS3.16 (CID tables as shipped in ``pydicom.sr.codedict``) and SNOMED CT. Where no
standard code exists the comment says so and what was chosen instead.
"""

from __future__ import annotations

from pydicom.sr.coding import Code

# Segmented property categories (CID 7150).
MORPHOLOGICALLY_ABNORMAL_STRUCTURE = Code("49755003", "SCT", "Morphologically Abnormal Structure")
TISSUE = Code("85756007", "SCT", "Tissue")
ANATOMICAL_STRUCTURE = Code("91723000", "SCT", "Anatomical Structure")

# Segmented property types.
NEOPLASM = Code("108369006", "SCT", "Neoplasm")
LIVER = Code("10200004", "SCT", "Liver")
# "Fat" the tissue (CID 7166), not SCT 256674009 (fat, the substance).
ADIPOSE_TISSUE = Code("55603005", "SCT", "Fat")
# No SNOMED CT concept for the *lesser* omentum was found: segment labels and tracking
# identifiers say "lesser omental" and the region is the omentum.
OMENTUM = Code("27398004", "SCT", "Omentum")

# Algorithm family (CID 7162).
ARTIFICIAL_INTELLIGENCE = Code("123110", "DCM", "Artificial Intelligence")

# Contributing Equipment, Purpose of Reference for the algorithm that made an object. IHE AI
# Results (AIR, Rev 1.1, 6.5.x) asks for "Processing Algorithm" and gives it the placeholder
# (Newcode1, 99IHE) pending a DICOM code; MONAI Deploy writes the same. DCM 109103 is *not* this
# concept: in PS3.16 CID 7005 it is "Modifying Equipment".
PROCESSING_ALGORITHM = Code("Newcode1", "99IHE", "Processing Algorithm")
PROCESSING_EQUIPMENT = Code("109102", "DCM", "Processing Equipment")  # the nearest CID 7005 code

# TID 1500 document and its context.
IMAGING_MEASUREMENT_REPORT = Code("126000", "DCM", "Imaging Measurement Report")
# Procedure reported (CID 100 is extensible): the imaging procedure, not the algorithm. LOINC has
# no single code for "CT liver multiphase" that every PACS knows; the generic CT code is used.
CT_UNSPECIFIED_BODY_REGION = Code("25045-6", "LN", "CT unspecified body region")
# TID 1500 row 10 container, for TEXT/CODE evaluations of the whole report (not in pydicom's
# dictionary, defined by PS3.16 TID 1500 itself).
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
COMMENT = Code("121106", "DCM", "Comment")

# Measurements (TID 1410/1411 concept names) and their modifiers.
DIAMETER = Code("81827009", "SCT", "Diameter")
AREA = Code("42798000", "SCT", "Area")
VOLUME = Code("118565006", "SCT", "Volume")
MAXIMUM = Code("56851009", "SCT", "Maximum")  # derivation (CID 3488)

# Risk category: concept name DCM 121153 with values from CID 3118 (no MVI-specific code).
LESION_RISK = Code("121153", "DCM", "Lesion Risk")
HIGH_RISK = Code("15508007", "SCT", "High risk")
LOW_RISK = Code("75976002", "SCT", "Low risk")

# Units (UCUM). Probabilities are written in percent (value x 100, unit "%") because viewers
# print the unit's code value after the number: OHIF shows "83 %" instead of "0.83 1" for UCUM
# "1" or "0.83 {probability}" for an annotation unit.
UNIT_MM = Code("mm", "UCUM", "millimeter")
UNIT_ML = Code("ml", "UCUM", "milliliter")
UNIT_CM2 = Code("cm2", "UCUM", "square centimeter")
UNIT_PERCENT = Code("%", "UCUM", "percent")
UNIT_LESIONS = Code("{lesions}", "UCUM", "lesions")

# Private scheme of this project. No standard code exists for "probability of microvascular
# invasion", and DCM 122157 "Probability" alone would give the DL and the combined model the same
# label in a viewer. CodeMeanings say exactly what each value is; the SR describes the scheme in
# its Coding Scheme Identification Sequence (PRIVATE_SCHEME_* below).
PRIVATE_SCHEME_DESIGNATOR = "99MVINODE"
PRIVATE_SCHEME_NAME = "mvi-node private codes"
PRIVATE_SCHEME_ORGANIZATION = "mvi-node project"
MVI_PROBABILITY_DL = Code(
    "MVIPROBDL", "99MVINODE", "Probability of microvascular invasion (deep learning)"
)
MVI_PROBABILITY_COMBINED = Code(
    "MVIPROBCOMB", "99MVINODE", "Probability of microvascular invasion (combined model)"
)
MVI_RISK_THRESHOLD = Code(
    "MVITHRESH", "99MVINODE", "High-risk threshold of microvascular invasion probability"
)
NUMBER_OF_TUMORS = Code("NTUMORS", "99MVINODE", "Number of tumor components")
MVI_ANALYSIS_STATUS = Code("MVISTATUS", "99MVINODE", "MVI analysis status")
MVI_ANALYSIS_REASON = Code("MVIREASON", "99MVINODE", "Reason MVI was not scored")
# TEXT items of the Qualitative Evaluations container (TID 1500 row 10): one per quality gate of
# the analysis ("registration: passed (metric -0.71, body overlap 0.98)") and one per note the
# reader must see ("Supplied segmentation not used: ..."). No standard concept names a pipeline's
# quality gate; DCM 121106 "Comment" would make them indistinguishable from the model comment.
QUALITY_CHECK = Code("MVIQC", "99MVINODE", "Quality check")
ANALYSIS_NOTE = Code("MVINOTE", "99MVINODE", "Analysis note")

# IHE IOCM rejection note: Key Object Selection document title (CID 7010), as archives match it.
REJECTED_FOR_QUALITY_REASONS = Code("113001", "DCM", "Rejected for Quality Reasons")
