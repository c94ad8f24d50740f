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
