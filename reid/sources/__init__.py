"""Frames and video in, people out: person detectors (and, later, the tracker and frame sources)."""

from reid.sources.detector import (
    DETECTORS,
    Detection,
    PersonDetector,
    SSDLiteDetector,
    find_ssdlite_graph,
    make_detector,
    ssd_text_graph,
)

__all__ = [
    "DETECTORS",
    "Detection",
    "PersonDetector",
    "SSDLiteDetector",
    "find_ssdlite_graph",
    "make_detector",
    "ssd_text_graph",
]
