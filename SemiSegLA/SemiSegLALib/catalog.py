"""The model list as the module shows it: parsing ``semiseg-la models list --json``, display strings,
lineage, what may be removed, and which model "Revert to base" selects.

The core owns the catalog (bundled models are immutable and checksum-verified there); this module only
reads what the core reports and never edits model files itself.
"""

import json
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

SOURCES_ORDER = {"bundled": 0, "site": 1, "local": 2}
DEFAULT_METHOD_PRESETS = ("supervised", "mean_teacher")
METHOD_LABELS = {
    "supervised": "Supervised",
    "mean_teacher": "Mean Teacher",
    "caml": "CAML",
    "crln": "CRLN",
    "semicml": "Semi-CML (PReL)",
    "semi_cml": "Semi-CML (PReL)",
    "site_adapter": "Site adapter (intensity curve)",
}


class CatalogError(ValueError):
    """The core's model list could not be read; the message names where."""


class ModelEntry:
    def __init__(self, record: Dict[str, Any]) -> None:
        self.record = dict(record)
        self.id = str(record.get("id") or "")
        self.source = str(record.get("source") or "local")
        self.path = record.get("path") or ""
        self.method = record.get("method") or ""
        self.labeledCases = _int_or_none(record.get("labeled_cases"))
        self.unlabeledCases = _int_or_none(record.get("unlabeled_cases"))
        self.dice = _float_or_none(record.get("dice"))
        # what the Dice was measured on: "validation", "site hold-out", "training fit" (optimistic) or "none"
        self.diceKind = str(record.get("dice_kind") or ("validation" if self.dice is not None else "none"))
        parent = record.get("parent")
        self.parent = str(parent) if parent else None
        self.created = record.get("created") or ""
        self.error = record.get("error") or None
        self.description = record.get("description") or ""
        # "localiser": the core's whole-scan atrium finder (used by Region: Automatic), not a model to choose
        self.role = str(record.get("role") or "segmenter")

    @property
    def isBundled(self) -> bool:
        return self.source == "bundled"

    @property
    def isLocal(self) -> bool:
        return self.source == "local"

    @property
    def isBroken(self) -> bool:
        return bool(self.error)

    def __repr__(self) -> str:
        return f"ModelEntry({self.id!r}, source={self.source!r})"


def diceText(entry: ModelEntry) -> str:
    """The Dice with what it was measured on, so a fit on training cases never reads as validation."""
    if entry.dice is None:
        return "Dice: n/a"
    if entry.diceKind == "training fit":
        return f"Dice {entry.dice:.3f} on its own training cases (optimistic)"
    return f"{entry.diceKind} Dice {entry.dice:.3f}"


def _guardFigures(guard: Dict[str, Any], parentId: str) -> Tuple[str, str]:
    """(" (Dice child vs parent)" or "", the parent's id) from the core's check."""
    child, parent = _float_or_none(guard.get("child_dice")), _float_or_none(guard.get("parent_dice"))
    figures = f" (Dice {child:.3f} vs {parent:.3f})" if child is not None and parent is not None else ""
    return figures, str(guard.get("parent") or parentId)


def guardWarning(guard: Optional[Dict[str, Any]], parentId: str) -> Optional[str]:
    """The message when the core's parent/child check found the fine-tuned model worse, else None."""
    if not isinstance(guard, dict) or guard.get("verdict") != "worse":
        return None
    figures, parentId = _guardFigures(guard, parentId)
    count = guard.get("held_out_cases")
    cases = f"{count} held-out cases" if isinstance(count, int) and count > 1 else "held-out case"
    return (f"The fine-tuned model is worse than its parent {parentId} on your {cases}{figures}, so "
            f"{parentId} stays selected. The new model is kept in the list. Check the labels, or annotate more "
            "cases, and fine-tune again.")


def guardNote(guard: Optional[Dict[str, Any]], parentId: str) -> Optional[str]:
    """When the fine-tuned model was not checked against its parent (fewer than 3 labelled cases), or beat it
    on a single held-out case: how little that says. In the fine-tune benchmark at a simulated scanner one
    held-out whole scan called the child better in 12 of 12 runs (six training seeds) where it was 0.2-2.0 Dice
    points worse on 8 other whole scans: better on the six the site left segmentable, worse on the two its parent
    segmented worst (docs/results.md); hence where to look first."""
    if not isinstance(guard, dict):
        return None
    verdict = str(guard.get("verdict", ""))
    figures, parentId = _guardFigures(guard, parentId)
    compare = (f"compare it with {parentId} on scans you did not annotate, first those {parentId} segmented worst "
               "(Revert to base selects the parent again).")
    if verdict.startswith("unchecked"):
        return (f"It was not checked against its parent {parentId}: with fewer than 3 labelled cases none is held "
                f"out. Before relying on it, {compare}")
    if not verdict.startswith("better") or guard.get("held_out_cases", 1) != 1:
        return None
    return (f"It is better than its parent {parentId} on your one held-out case{figures}. One case is little "
            f"evidence: before relying on it, {compare}")


def comparisonNames(volumeName: str, newId: str, parentId: str) -> Tuple[str, str]:
    """The names of the two segmentations a fine-tune adds beside a volume where the new model and its parent
    disagree most: each model's id, so that a later fine-tune's pair is told apart."""
    return f"{volumeName}: {newId} (new)", f"{volumeName}: {parentId} (parent)"


def agreementNote(guard: Optional[Dict[str, Any]], volumeNames: Optional[Dict[str, str]] = None,
                  shown: Sequence[str] = (), newId: str = "", parentId: str = "") -> Optional[str]:
    """Where the new model and its parent disagree most on the unlabelled scans (the core segments up to 16 of them
    with both after a fine-tune, in what is left of the budget): the scans to look at first. There one of the two is
    wrong, and it may be either: at a simulated scanner the lowest agreement fell on the scans the parent segmented
    worst, where the new model gained on some and lost on others, and the one held-out case saw none of them
    (docs/results.md). ``volumeNames`` maps the core's case ids back to the volumes' names; ``shown``: the volumes
    whose two results were added to the scene (``agreementLabels``, named by ``comparisonNames``)."""
    agreement = guard.get("agreement") if isinstance(guard, dict) else None
    if not isinstance(agreement, dict):
        return None
    cases = [c for c in agreement.get("cases") or [] if isinstance(c, (list, tuple)) and len(c) == 2]
    if not cases:
        return None
    names = volumeNames or {}
    lowest = ", ".join(f"'{names.get(str(case), case)}' ({float(value):.2f})" for case, value in cases[:3])
    text = (f"Of {len(cases)} unlabelled volume(s), the new model and its parent disagree most on {lowest} (Dice "
            "between their results): look at those first")
    if not shown:
        return (text + ", segmented with each model; where their results differ, one of them is wrong, and it may "
                "be either.")
    new, parent = comparisonNames("<volume>", newId, parentId)
    return (text + f"; where their results differ, one of them is wrong, and it may be either. Each model's result on "
            f"{', '.join(repr(name) for name in shown)} is in the scene as '{new}' and '{parent}' (one network "
            "pass each; Segment atrium also averages flips).")


def agreementLabels(guard: Optional[Dict[str, Any]]) -> List[Tuple[str, str, str]]:
    """(case id, the new model's label file, the parent's) of the unlabelled scans where the two disagree most, lowest
    agreement first: the core keeps both labels of a few of them in its run folder (cli/export.py AGREEMENT_SHOWN)."""
    agreement = guard.get("agreement") if isinstance(guard, dict) else None
    labels = agreement.get("labels") if isinstance(agreement, dict) else None
    if not isinstance(labels, dict):
        return []
    return [(str(case), str(files["new"]), str(files["parent"])) for case, files in labels.items()
            if isinstance(files, dict) and files.get("new") and files.get("parent")]


def methodLabel(method: str) -> str:
    if not method:
        return "unknown method"
    return METHOD_LABELS.get(method.lower(), method)


def parseModelsJson(text: str, origin: str = "semiseg-la models list --json") -> List[ModelEntry]:
    """Entries of the core's JSON array; malformed output raises CatalogError naming the position."""
    stripped = text.strip()
    if not stripped:
        raise CatalogError(f"{origin} printed nothing")
    try:
        data = json.loads(stripped)
    except ValueError as exc:
        # warnings printed before the JSON: take the last line that starts the array
        data = _json_from_tail(stripped)
        if data is None:
            line = getattr(exc, "lineno", "?")
            col = getattr(exc, "colno", "?")
            msg = getattr(exc, "msg", str(exc))
            raise CatalogError(f"{origin}: invalid JSON at line {line}, column {col}: {msg}") from None
    if not isinstance(data, list):
        raise CatalogError(f"{origin}: expected a JSON array of models, got {type(data).__name__}")
    entries = []
    for index, record in enumerate(data):
        if not isinstance(record, dict) or not record.get("id"):
            raise CatalogError(f"{origin}: entry {index} has no 'id'")
        entries.append(ModelEntry(record))
    return entries


def parsePresetsJson(text: str) -> List[str]:
    """Method names from ``models presets --json``: a list of method names, or of preset objects such as
    ``{"name": "caml-la-16", "method": "caml"}`` (their ``method``), in order, without repeats."""
    try:
        data = json.loads(text.strip() or "null")
    except ValueError:
        data = _json_from_tail(text.strip())
    if isinstance(data, dict):
        data = data.get("presets", data.get("methods"))
    names: List[str] = []
    if isinstance(data, list):
        for item in data:
            if isinstance(item, str):
                names.append(item)
            elif isinstance(item, dict):
                name = item.get("method") or item.get("name") or item.get("id")
                if name:
                    names.append(str(name))
    return [n for i, n in enumerate(names) if n and n not in names[:i]]


def _json_from_tail(text: str) -> Any:
    lines = text.splitlines()
    for i in range(len(lines)):
        chunk = "\n".join(lines[i:]).strip()
        if chunk.startswith(("[", "{")):
            try:
                return json.loads(chunk)
            except ValueError:
                continue
    return None


class Catalog:
    """The entries plus the rules the panel applies to them."""

    def __init__(self, entries: Iterable[ModelEntry] = ()) -> None:
        self.entries: List[ModelEntry] = []
        self.byId: Dict[str, ModelEntry] = {}
        for entry in entries:
            if entry.role == "localiser":
                continue
            if entry.id not in self.byId:
                self.entries.append(entry)
                self.byId[entry.id] = entry

    @classmethod
    def fromJson(cls, text: str) -> "Catalog":
        return cls(parseModelsJson(text))

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, modelId: Optional[str]) -> Optional[ModelEntry]:
        return self.byId.get(modelId) if modelId else None

    def ordered(self) -> List[ModelEntry]:
        """Bundled first, then site, then local models newest first (the combobox order)."""
        def key(entry: ModelEntry):
            rank = SOURCES_ORDER.get(entry.source, 3)
            created = entry.created if entry.isLocal else ""
            return (rank, _neg_text(created), entry.id)
        return sorted(self.entries, key=key)

    def usable(self) -> List[ModelEntry]:
        return [e for e in self.ordered() if not e.isBroken]

    # -- display ----------------------------------------------------------------------------------------
    def displayName(self, entry: ModelEntry) -> str:
        tag = {"bundled": "bundled", "site": "site", "local": "fine-tuned"}.get(entry.source, entry.source)
        if entry.isBroken:
            return f"{entry.id} (unusable)"
        return f"{entry.id} - {methodLabel(entry.method)} ({tag})"

    def details(self, entry: Optional[ModelEntry]) -> str:
        """Method, labels, validation Dice and parent on one line; lineage and date on a second."""
        if entry is None:
            return "No model selected."
        if entry.isBroken:
            return f"{entry.id} cannot be used: {entry.error}"
        labels = (f"{entry.labeledCases} labelled cases" if entry.labeledCases is not None
                  else "labelled cases: n/a")
        if entry.unlabeledCases is not None:
            labels += f" + {entry.unlabeledCases} unlabelled"
        dice = diceText(entry)
        parent = f"parent: {entry.parent}" if entry.parent else "parent: none (base model)"
        line1 = f"Method: {methodLabel(entry.method)} | {labels} | {dice} | {parent}"
        extra = []
        chain = self.lineage(entry.id)
        if len(chain) > 1:
            extra.append("Lineage: " + " <- ".join(e.id if e else "(missing)" for e in chain))
        if entry.created:
            extra.append(f"Created: {entry.created}")
        if entry.isBundled:
            extra.append("Bundled model (read-only)")
        return line1 + ("\n" + " | ".join(extra) if extra else "")

    # -- lineage ------------------------------------------------------------------------------------------
    def lineage(self, modelId: str) -> List[Optional[ModelEntry]]:
        """[model, parent, grandparent, ...]; a missing ancestor ends the chain with None; cycles stop."""
        chain: List[Optional[ModelEntry]] = []
        seen = set()
        current = self.get(modelId)
        if current is None:
            return chain
        while current is not None and current.id not in seen:
            chain.append(current)
            seen.add(current.id)
            if not current.parent:
                return chain
            nxt = self.get(current.parent)
            if nxt is None:
                chain.append(None)
                return chain
            current = nxt
        return chain

    def baseOf(self, modelId: str) -> Optional[ModelEntry]:
        """The model "Revert to base" selects: the first non-local ancestor (bundled or site), else the
        oldest known ancestor; a bundled model is its own base."""
        chain = [e for e in self.lineage(modelId) if e is not None]
        if not chain:
            return None
        for entry in chain:
            if not entry.isLocal:
                return entry
        return chain[-1]

    def revertTarget(self, modelId: str) -> Optional[str]:
        base = self.baseOf(modelId)
        if base is None or base.id == modelId:
            return None
        return base.id

    def canRemove(self, modelId: Optional[str]):
        """(allowed, reason): only local (fine-tuned or imported) models can be removed."""
        entry = self.get(modelId)
        if entry is None:
            return False, "Select a model first."
        if entry.isBundled:
            return False, f"{entry.id} is a bundled model; bundled models are never modified or removed."
        if entry.source == "site":
            return False, f"{entry.id} comes from the site models folder; ask its administrator."
        children = [e.id for e in self.entries if e.parent == entry.id]
        if children:
            return True, (f"{entry.id} is the parent of {', '.join(children)}; they keep their own weights "
                          "but their lineage will show a missing parent.")
        return True, ""

    def selectionAfterRemoval(self, modelId: str) -> Optional[str]:
        """Which model to select once ``modelId`` is gone: its parent, else its base, else the first."""
        entry = self.get(modelId)
        if entry is not None and entry.parent and entry.parent in self.byId:
            return entry.parent
        base = self.baseOf(modelId)
        if base is not None and base.id != modelId:
            return base.id
        rest = [e.id for e in self.usable() if e.id != modelId]
        return rest[0] if rest else None

    def defaultModelId(self, preferred: Optional[str] = None) -> Optional[str]:
        """The remembered model when it still exists, else the first usable bundled model."""
        entry = self.get(preferred)
        if entry is not None and not entry.isBroken:
            return entry.id
        usable = self.usable()
        return usable[0].id if usable else None


def _neg_text(text: str) -> str:
    # sort helper: newest ISO date first within one source
    return "".join(chr(0x10FFFF - ord(c)) for c in text) if text else "\U0010ffff"


def _int_or_none(value: Any) -> Optional[int]:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _float_or_none(value: Any) -> Optional[float]:
    if isinstance(value, bool) or value is None:
        return None
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if result == result else None  # NaN -> None
