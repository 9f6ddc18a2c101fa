"""The person detector: the packaged SSDLite graph run by OpenCV DNN on real photographs.

The images are real ones that scikit-image ships (``astronaut``: one person, Eileen Collins, from the
waist up; ``chelsea``, ``coffee``: no person). Nothing is fetched from the network.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util

import numpy as np
import pytest

from reid.errors import DetectorError, InputError, ReidError
from reid.sources import detector as det
from reid.sources import Detection, SSDLiteDetector, find_ssdlite_graph, make_detector, ssd_text_graph

skimage_data = pytest.importorskip("skimage.data")

needs_ssdlite = pytest.mark.skipif(
    importlib.util.find_spec(det.SSDLITE_PACKAGE) is None,
    reason=f"pip install --no-deps {det.SSDLITE_PIP}",
)


@pytest.fixture(scope="module")
def detector() -> SSDLiteDetector:
    return SSDLiteDetector(score_threshold=0.5, min_height=0, min_width=0)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage_data.astronaut()  # 512x512 RGB uint8


@needs_ssdlite
def test_finds_the_one_person_in_astronaut(detector, astronaut):
    found = detector.detect(astronaut)
    assert len(found) == 1
    d = found[0]
    assert d.score > 0.8
    # She fills the left two thirds of the picture from near the top to the bottom edge.
    assert d.x1 < 60 and 300 < d.x2 < 420 and d.y1 < 80 and d.y2 > 440
    assert 0 <= d.x1 < d.x2 <= 512 and 0 <= d.y1 < d.y2 <= 512
    x1, y1, x2, y2 = d.box()
    assert astronaut[y1:y2, x1:x2].shape[:2] == (y2 - y1, x2 - x1)


@needs_ssdlite
def test_no_person_in_a_cat_a_coffee_or_a_blank_frame(detector):
    for img in (skimage_data.chelsea(), skimage_data.coffee(), np.full((300, 400, 3), 128, np.uint8)):
        assert detector.detect(img) == []


@needs_ssdlite
def test_mirrored_frame_gives_the_mirrored_box(detector, astronaut):
    a = detector.detect(astronaut)[0]
    b = detector.detect(np.ascontiguousarray(astronaut[:, ::-1]))[0]
    w = astronaut.shape[1]
    assert abs((w - b.x2) - a.x1) < 40 and abs((w - b.x1) - a.x2) < 40
    assert abs(b.y1 - a.y1) < 30 and abs(b.y2 - a.y2) < 30


@needs_ssdlite
def test_batch_equals_one_by_one_and_frames_may_differ_in_size(detector, astronaut):
    frames = [astronaut, skimage_data.chelsea(), astronaut[:400, :300].copy()]
    batch = detector.detect_batch(frames)
    single = [detector.detect(f) for f in frames]
    assert [len(b) for b in batch] == [len(s) for s in single]
    for bs, ss in zip(batch, single, strict=True):
        for b, s in zip(bs, ss, strict=True):
            assert np.allclose([b.x1, b.y1, b.x2, b.y2], [s.x1, s.y1, s.x2, s.y2], atol=0.5)
            assert abs(b.score - s.score) < 5e-3  # batched convolutions round a little differently
    assert detector.detect_batch([]) == []


@needs_ssdlite
def test_score_threshold_and_min_size_filter(astronaut):
    score = SSDLiteDetector(score_threshold=0.5, min_height=0, min_width=0).detect(astronaut)[0].score
    assert SSDLiteDetector(score_threshold=min(1.0, score + 0.02)).detect(astronaut) == []
    low = SSDLiteDetector(score_threshold=0.02, min_height=0, min_width=0).detect(astronaut)
    assert len(low) >= 1 and low[0].score == pytest.approx(score, abs=1e-3)
    assert all(a.score >= b.score for a, b in zip(low, low[1:], strict=False))  # neighbouring pairs
    assert SSDLiteDetector(score_threshold=0.5, min_height=500).detect(astronaut) == []
    assert SSDLiteDetector(score_threshold=0.5, min_width=400).detect(astronaut) == []
    assert len(SSDLiteDetector(score_threshold=0.5, min_height=400, min_width=300).detect(astronaut)) == 1


@pytest.mark.parametrize("options", [{"score_threshold": 0.0}, {"score_threshold": 1.5}, {"min_height": -1}])
def test_bad_thresholds_are_input_errors(options):
    with pytest.raises(InputError):
        SSDLiteDetector(**options)


@needs_ssdlite
@pytest.mark.parametrize("frame", [np.zeros((64, 64, 3), np.float32), np.zeros((64, 64), np.uint8),
                                   np.zeros((4, 64, 3), np.uint8)])
def test_bad_frames_are_input_errors(detector, frame):
    with pytest.raises(InputError):
        detector.detect(frame)


def test_missing_package_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(det.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(DetectorError) as e:
        find_ssdlite_graph()
    msg = str(e.value)
    assert "\n" not in msg and f"pip install --no-deps {det.SSDLITE_PIP}" in msg
    assert isinstance(e.value, ReidError)
    with pytest.raises(DetectorError):
        make_detector("ssdlite")


def test_package_without_its_graph_file(monkeypatch, tmp_path):
    spec = importlib.machinery.ModuleSpec(det.SSDLITE_PACKAGE, None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(det.importlib.util, "find_spec", lambda name, *a: spec)
    with pytest.raises(DetectorError, match="missing from the installed package"):
        find_ssdlite_graph()


def test_graph_that_is_not_a_graph(tmp_path):
    bad = tmp_path / "frozen_inference_graph.pb"
    bad.write_bytes(b"not a protobuf at all" * 10)
    with pytest.raises(DetectorError):
        SSDLiteDetector(graph=bad)


def test_unknown_detector_name():
    with pytest.raises(InputError, match="unknown detector 'yolo'"):
        make_detector("yolo")


@needs_ssdlite
def test_locates_the_graph_without_importing_the_package():
    import sys

    path = find_ssdlite_graph()
    assert path.name == "frozen_inference_graph.pb" and path.stat().st_size > 10_000_000
    assert det.SSDLITE_PACKAGE not in sys.modules and "tensorflow" not in sys.modules


@needs_ssdlite
def test_text_graph_replaces_postprocessing_with_opencv_layers():
    text = ssd_text_graph(find_ssdlite_graph())
    assert text.startswith('node {\n  name: "image_tensor"\n  op: "Placeholder"')
    assert text.count('op: "PriorBox"') == 6 and text.count('op: "DetectionOutput"') == 1
    assert "Postprocessor/" not in text and "Preprocessor/" not in text and "MultipleGridAnchorGenerator" not in text
    assert 'key: "num_classes"\n    value {\n      i: 2' in text  # person + background, read from the graph
    # every input is defined before it is used (or is a weight constant held by the binary graph)
    defined: set[str] = set()
    for node in det._parse_text_graph(text):
        for i in node.inputs:
            assert i in defined or not i.startswith(("BoxPredictor_", "ClassPredictor", "BoxEncoding", "PriorBox")) \
                or i.endswith(("weights", "biases", "gamma", "beta", "moving_mean", "moving_variance")), i
        defined.add(node.name)


def test_detection_geometry():
    d = Detection(10.2, 20.7, 30.5, 80.0, 0.9)
    assert d.width == pytest.approx(20.3) and d.height == pytest.approx(59.3)
    assert d.box() == (10, 20, 31, 80)
    assert Detection(5, 5, 4, 9, 0.5).area == 0.0
