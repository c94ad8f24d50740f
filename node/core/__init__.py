"""Shared by every process: settings, logging without PHI, pseudonyms, TLS, DICOM plumbing."""
