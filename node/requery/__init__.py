"""Retrospective Query/Retrieve against the PACS (`mvi-node requery`, the nightly safety net)."""
