"""Grid checks on the NRRD files exchanged with the child, without numpy, ITK or Slicer.

The module writes the input volume as NRRD and the core must write the label map on exactly that grid.
Before importing, the module compares the two headers (size, spacing x direction, origin) and refuses a
result on another grid with a clear message, instead of silently resampling it: misaligned atrium
segmentations are a known failure of this kind of tool.
"""

import math
import re
from typing import List, Optional, Sequence, Tuple

RAS_NAMES = ("right-anterior-superior", "ras")
LPS_NAMES = ("left-posterior-superior", "lps")
# Slicer/NRRD round trips add ~1e-5-level noise; ITK's 1e-6*spacing would reject those.
DEFAULT_RELATIVE_TOLERANCE = 1e-4

_VECTOR = re.compile(r"\(([^)]*)\)|none")


class GridError(ValueError):
    pass


class Grid:
    """Size, the three axis vectors (columns of spacing x direction) and the origin, in LPS."""

    def __init__(self, size: Sequence[int], axes: Sequence[Sequence[float]], origin: Sequence[float]) -> None:
        self.size = [int(s) for s in size]
        self.axes = [[float(v) for v in axis] for axis in axes]
        self.origin = [float(v) for v in origin]

    @property
    def spacing(self) -> List[float]:
        return [math.sqrt(sum(v * v for v in axis)) for axis in self.axes]

    def __repr__(self) -> str:
        return f"Grid(size={self.size}, spacing={self.spacing}, origin={self.origin})"


def readNrrdHeader(path: str, maxBytes: int = 1 << 16) -> dict:
    """Header fields of an attached-header NRRD file (keys lower-cased)."""
    with open(path, "rb") as f:
        raw = f.read(maxBytes)
    if not raw.startswith(b"NRRD"):
        raise GridError(f"{path} is not an NRRD file")
    end = raw.find(b"\n\n")
    if end < 0:
        end = raw.find(b"\r\n\r\n")
    header = raw[: end if end >= 0 else len(raw)].decode("ascii", errors="replace")
    fields = {}
    for line in header.splitlines()[1:]:
        if not line or line.startswith("#") or ":" not in line:
            continue
        key, value = line.split(":", 1)
        if value.startswith("="):
            continue  # key:=value pairs are metadata, not fields
        fields[key.strip().lower()] = value.strip()
    return fields


def _vectors(text: str) -> List[Optional[List[float]]]:
    result: List[Optional[List[float]]] = []
    for match in _VECTOR.finditer(text):
        if match.group(0) == "none":
            result.append(None)
        else:
            result.append([float(v) for v in match.group(1).split(",")])
    return result


def gridFromNrrd(path: str) -> Grid:
    fields = readNrrdHeader(path)
    try:
        sizes = [int(v) for v in fields["sizes"].split()]
    except (KeyError, ValueError) as exc:
        raise GridError(f"{path}: no usable 'sizes' field") from exc
    space = fields.get("space", "left-posterior-superior").lower()
    if "space directions" in fields:
        vectors = [v for v in _vectors(fields["space directions"]) if v is not None]
    elif "spacings" in fields:
        spacings = [float(v) for v in fields["spacings"].split()]
        vectors = [[s if i == j else 0.0 for j in range(len(spacings))] for i, s in enumerate(spacings)]
    else:
        vectors = [[1.0 if i == j else 0.0 for j in range(3)] for i in range(3)]
    # drop non-spatial axes (e.g. a leading vector axis with direction "none")
    spatialSizes = sizes[-len(vectors):] if vectors else sizes
    origin = [0.0] * (len(vectors[0]) if vectors else 3)
    if "space origin" in fields:
        found = _vectors(fields["space origin"])
        if found and found[0] is not None:
            origin = found[0]
    if space in RAS_NAMES:
        vectors = [[-v[0], -v[1]] + list(v[2:]) for v in vectors]
        origin = [-origin[0], -origin[1]] + list(origin[2:])
    elif space not in LPS_NAMES:
        raise GridError(f"{path}: unsupported NRRD space '{space}'")
    return Grid(spatialSizes, vectors, origin)


def compareGrids(a: Grid, b: Grid, relativeTolerance: float = DEFAULT_RELATIVE_TOLERANCE
                 ) -> Tuple[bool, str]:
    """(same, reason): same size, and axis vectors and origin within tolerance x the largest spacing."""
    if a.size != b.size:
        return False, f"size {b.size} instead of {a.size}"
    scale = max(a.spacing + b.spacing + [1e-12])
    tol = relativeTolerance * scale
    for index, (u, v) in enumerate(zip(a.axes, b.axes)):
        if len(u) != len(v) or any(abs(x - y) > tol for x, y in zip(u, v)):
            return False, f"axis {index} is {_fmt(v)} instead of {_fmt(u)} (spacing x direction)"
    if len(a.origin) != len(b.origin) or any(abs(x - y) > tol for x, y in zip(a.origin, b.origin)):
        return False, f"origin {_fmt(b.origin)} instead of {_fmt(a.origin)}"
    return True, ""


def checkSameGrid(referencePath: str, resultPath: str,
                  relativeTolerance: float = DEFAULT_RELATIVE_TOLERANCE) -> None:
    """Raise GridError (one line) when the result is not on the reference's grid."""
    same, reason = compareGrids(gridFromNrrd(referencePath), gridFromNrrd(resultPath), relativeTolerance)
    if not same:
        raise GridError(f"The result is not on the input's grid ({reason}); it was not imported.")


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"
