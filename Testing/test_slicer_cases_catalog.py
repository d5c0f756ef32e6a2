"""Slicer side, layer (a): case-table rules, dataset layout, and the model catalog / lineage logic."""

import json
import os

import pytest

import slicer_fake  # noqa: F401  (puts SemiSegLA/ on sys.path)

# isort: split
from SemiSegLALib.cases import (
    EXCLUDED,
    INVALID,
    LABELLED,
    NO_SEGMENTATION,
    UNLABELLED,
    DatasetPlan,
    SegmentationInfo,
    SegmentInfo,
    VolumeInfo,
    buildCaseTable,
    counts,
    sanitizeCaseId,
    summaryText,
    validateCases,
)
from SemiSegLALib.catalog import (
    Catalog,
    CatalogError,
    ModelEntry,
    diceText,
    guardNote,
    guardWarning,
    methodLabel,
    parseModelsJson,
    parsePresetsJson,
)


def vol(i, name=None):
    return VolumeInfo(f"vtkMRMLScalarVolumeNode{i}", name or f"Case {i}")


def seg(i, ref, *names):
    return SegmentationInfo(f"vtkMRMLSegmentationNode{i}", f"Seg {i}", ref,
                            [SegmentInfo(f"Segment_{k}", n) for k, n in enumerate(names)])


# -- cases ------------------------------------------------------------------------------------------------
def test_labelled_when_a_segmentation_references_the_volume():
    volumes = [vol(1), vol(2), vol(3)]
    segs = [seg(1, volumes[0].id, "Left atrium"), seg(2, volumes[2].id, "Aorta", "Myocardium")]
    rows = buildCaseTable(volumes, segs)
    assert [r.role for r in rows] == [LABELLED, UNLABELLED, INVALID]
    assert rows[0].segmentationId == segs[0].id and rows[0].segmentId == "Segment_0"
    assert "no 'Left atrium' segment" in rows[2].status and "'Aorta', 'Myocardium'" in rows[2].status
    assert "rename" in rows[2].status
    assert counts(rows) == (1, 1)
    assert summaryText(rows) == "1 labelled, 1 unlabelled, 1 need attention"


def test_left_atrium_segment_found_by_name_variants():
    for name in ("Left atrium", "left_atrium", "LEFT ATRIUM ", "Left-Atrium"):
        rows = buildCaseTable([vol(1)], [seg(1, vol(1).id, "Background", name)])
        assert rows[0].role == LABELLED and rows[0].segmentId == "Segment_1", name


def test_several_segmentations_prefer_one_with_the_atrium_and_say_so():
    v = vol(1)
    rows = buildCaseTable([v], [seg(1, v.id, "Left atrium"), seg(2, v.id, "Aorta")])
    assert rows[0].role == LABELLED and rows[0].segmentationId == "vtkMRMLSegmentationNode1"
    assert "2 segmentations use this volume" in rows[0].status


def test_a_corrected_segmentation_is_preferred_to_later_automatic_results():
    """After a fine-tune a volume may carry both models' automatic results; the one the user corrected and ticked
    makes it a labelled case, whichever was added last. Without a corrected one the volume stays unlabelled, paired
    with its own latest result rather than another model's added to compare with (an uncertain result's first pass,
    a fine-tune's parent): a "Corrected" tick on the row must not make that one the label."""
    v = vol(1)
    new, parent = seg(1, v.id, "Left atrium"), seg(2, v.id, "Left atrium")
    for node in (new, parent):
        node.reviewed, node.automatic = False, True
    rows = buildCaseTable([v], [new, parent])
    assert rows[0].role == UNLABELLED and rows[0].segmentationId == parent.id
    parent.comparison = True
    rows = buildCaseTable([v], [new, parent])
    assert rows[0].role == UNLABELLED and rows[0].segmentationId == new.id
    assert buildCaseTable([v], [parent])[0].segmentationId == parent.id  # the only one: still shown
    new.reviewed = True
    rows = buildCaseTable([v], [new, parent])
    assert rows[0].role == LABELLED and rows[0].segmentationId == new.id
    new.reviewed, parent.reviewed = False, True  # the user corrected the parent's and ticked it: theirs to choose
    assert buildCaseTable([v], [new, parent])[0].segmentationId == parent.id


def test_user_pairing_overrides_and_can_mean_none():
    v1, v2 = vol(1), vol(2)
    s = seg(7, None, "Left atrium")  # no reference geometry at all
    rows = buildCaseTable([v1, v2], [s], pairing={v1.id: s.id, v2.id: NO_SEGMENTATION})
    assert rows[0].role == LABELLED and rows[0].paired == "user"
    assert rows[1].role == UNLABELLED and rows[1].paired == "user"
    gone = buildCaseTable([v1], [], pairing={v1.id: "vtkMRMLSegmentationNode99"})
    assert gone[0].role == INVALID and "no longer exists" in gone[0].status


def test_excluded_rows_and_validation_messages():
    volumes = [vol(1), vol(2)]
    segs = [seg(1, volumes[0].id, "Left atrium")]
    rows = buildCaseTable(volumes, segs, excluded={volumes[1].id})
    assert rows[1].role == EXCLUDED
    errors, warnings = validateCases(rows, "mean_teacher")
    assert errors == [] and any("will learn from the labelled cases only" in w for w in warnings)
    errors, warnings = validateCases(rows, "supervised")
    assert errors == [] and any("Only 1 labelled case: the fine-tuned model cannot be checked" in w
                                for w in warnings)
    labelled = [vol(i) for i in range(1, 5)]
    for n, warned in ((2, True), (3, False), (4, False)):
        rows = buildCaseTable(labelled[:n], [seg(i, v.id, "Left atrium") for i, v in enumerate(labelled[:n], 1)])
        _, warnings = validateCases(rows, "mean_teacher")
        assert any(f"Only {n} labelled cases" in w and "Annotate at least 3" in w for w in warnings) == warned
    nothing = buildCaseTable(volumes, [])
    errors, _ = validateCases(nothing, "supervised")
    assert errors and "at least one labelled case" in errors[0] and "Segment Editor" in errors[0]


def test_case_ids_are_ascii_safe_and_unique():
    assert sanitizeCaseId("Patient 12 / LGE (3D)") == "Patient_12_LGE_3D"
    assert sanitizeCaseId("Müller_Ångström") == "M_ller_ngstr_m"
    assert sanitizeCaseId("???") == "case"
    rows = buildCaseTable([vol(1, "A b"), vol(2, "A_b"), vol(3, "a b")], [])
    assert [r.caseId for r in rows] == ["A_b", "A_b_2", "a_b_3"]


def test_dataset_plan_layout(tmp_path):
    volumes = [vol(1, "LA 1"), vol(2, "LA 2"), vol(3, "scan")]
    rows = buildCaseTable(volumes, [seg(1, volumes[0].id, "Left atrium"), seg(2, volumes[1].id, "Left atrium")])
    plan = DatasetPlan(str(tmp_path), rows)
    assert [os.path.relpath(i, tmp_path) for _, i, _ in plan.labelled] == [
        os.path.join("dataset", "imagesTr", "LA_1_0000.nrrd"), os.path.join("dataset", "imagesTr", "LA_2_0000.nrrd")]
    assert [os.path.relpath(label, tmp_path) for _, _, label in plan.labelled] == [
        os.path.join("dataset", "labelsTr", "LA_1.nrrd"), os.path.join("dataset", "labelsTr", "LA_2.nrrd")]
    assert [os.path.relpath(p, tmp_path) for _, p in plan.unlabelled] == [os.path.join("unlabeled", "scan.nrrd")]
    plan.makeFolders()
    with open(plan.writeDatasetJson()) as f:
        assert json.load(f) == {"channel_names": {"0": "LGE-MRI"}, "labels": {"background": 0, "left_atrium": 1},
                                "numTraining": 2, "file_ending": ".nrrd"}


# -- catalog ----------------------------------------------------------------------------------------------
MODELS = [
    {"id": "la-caml-v1.0.0", "source": "bundled", "path": "/b/caml", "method": "caml", "labeled_cases": 16,
     "dice": 0.912, "parent": None, "created": "2025-01-01"},
    {"id": "site-a-v0.0.1", "source": "local", "path": "/h/a", "method": "mean_teacher", "labeled_cases": 4,
     "unlabeled_cases": 20, "dice": 0.88, "parent": "la-caml-v1.0.0", "created": "2025-03-01T10:00:00"},
    {"id": "site-a-v0.0.2", "source": "local", "path": "/h/b", "method": "caml", "labeled_cases": 6,
     "dice": None, "parent": "site-a-v0.0.1", "created": "2025-04-01T10:00:00"},
    {"id": "orphan-v0.0.1", "source": "local", "path": "/h/o", "method": "supervised", "labeled_cases": 2,
     "dice": 0.5, "parent": "deleted-v9", "created": "2025-02-01"},
    {"id": "site-shared-v1", "source": "site", "path": "/s/x", "method": "crln", "labeled_cases": 8,
     "dice": 0.9, "parent": None, "created": "2024-12-01"},
    {"id": "broken-v1", "source": "local", "path": "/h/x", "error": "weights SHA-256 mismatch"},
    {"id": "la-localiser-v0.1.0", "source": "bundled", "path": "/b/loc", "method": "supervised", "role": "localiser",
     "dice": 0.8, "parent": None, "created": "2025-01-01"},
]


@pytest.fixture
def catalog():
    return Catalog.fromJson(json.dumps(MODELS))


def test_order_and_display(catalog):
    assert [e.id for e in catalog.ordered()] == ["la-caml-v1.0.0", "site-shared-v1", "site-a-v0.0.2",
                                                 "site-a-v0.0.1", "orphan-v0.0.1", "broken-v1"]
    assert "broken-v1" not in [e.id for e in catalog.usable()]
    assert catalog.get("la-localiser-v0.1.0") is None  # the core's atrium finder is not a model to choose
    assert catalog.displayName(catalog.get("la-caml-v1.0.0")) == "la-caml-v1.0.0 - CAML (bundled)"
    assert catalog.displayName(catalog.get("site-a-v0.0.1")) == "site-a-v0.0.1 - Mean Teacher (fine-tuned)"
    assert catalog.displayName(catalog.get("broken-v1")) == "broken-v1 (unusable)"


def test_details_show_method_labels_dice_parent_and_lineage(catalog):
    details = catalog.details(catalog.get("site-a-v0.0.2"))
    first, second = details.split("\n")
    assert first == "Method: CAML | 6 labelled cases | Dice: n/a | parent: site-a-v0.0.1"
    assert "Lineage: site-a-v0.0.2 <- site-a-v0.0.1 <- la-caml-v1.0.0" in second
    assert "Created: 2025-04-01T10:00:00" in second
    assert catalog.details(catalog.get("site-a-v0.0.1")).startswith(
        "Method: Mean Teacher | 4 labelled cases + 20 unlabelled | validation Dice 0.880 | parent: la-caml-v1.0.0")
    assert "(base model)" in catalog.details(catalog.get("la-caml-v1.0.0"))
    assert "Bundled model (read-only)" in catalog.details(catalog.get("la-caml-v1.0.0"))
    assert "weights SHA-256 mismatch" in catalog.details(catalog.get("broken-v1"))
    assert catalog.details(None) == "No model selected."


def test_lineage_base_and_revert(catalog):
    assert [e.id for e in catalog.lineage("site-a-v0.0.2")] == ["site-a-v0.0.2", "site-a-v0.0.1", "la-caml-v1.0.0"]
    assert catalog.baseOf("site-a-v0.0.2").id == "la-caml-v1.0.0"
    assert catalog.revertTarget("site-a-v0.0.2") == "la-caml-v1.0.0"
    assert catalog.revertTarget("la-caml-v1.0.0") is None  # already a base
    chain = catalog.lineage("orphan-v0.0.1")
    assert chain[0].id == "orphan-v0.0.1" and chain[1] is None
    assert catalog.revertTarget("orphan-v0.0.1") is None  # no known base: nothing to revert to
    cyclic = Catalog(parseModelsJson(json.dumps([
        {"id": "a", "source": "local", "parent": "b"}, {"id": "b", "source": "local", "parent": "a"}])))
    assert [e.id for e in cyclic.lineage("a")] == ["a", "b"]


def test_only_local_models_can_be_removed(catalog):
    assert catalog.canRemove("la-caml-v1.0.0")[0] is False
    assert "never modified" in catalog.canRemove("la-caml-v1.0.0")[1]
    assert catalog.canRemove("site-shared-v1")[0] is False
    allowed, note = catalog.canRemove("site-a-v0.0.1")
    assert allowed and "parent of site-a-v0.0.2" in note
    assert catalog.canRemove("site-a-v0.0.2") == (True, "")
    assert catalog.canRemove(None)[0] is False
    assert catalog.selectionAfterRemoval("site-a-v0.0.2") == "site-a-v0.0.1"
    assert catalog.selectionAfterRemoval("orphan-v0.0.1") == "la-caml-v1.0.0"


def test_default_model(catalog):
    assert catalog.defaultModelId("site-a-v0.0.1") == "site-a-v0.0.1"
    assert catalog.defaultModelId("gone") == "la-caml-v1.0.0"
    assert catalog.defaultModelId("broken-v1") == "la-caml-v1.0.0"
    assert Catalog().defaultModelId() is None


def test_malformed_model_list_names_the_position():
    with pytest.raises(CatalogError, match=r"invalid JSON at line 1, column 32"):
        parseModelsJson('[{"id": "a", "source": "local",}]')
    with pytest.raises(CatalogError, match="printed nothing"):
        parseModelsJson("  ")
    with pytest.raises(CatalogError, match="expected a JSON array"):
        parseModelsJson('{"id": "a"}')
    with pytest.raises(CatalogError, match="entry 1 has no 'id'"):
        parseModelsJson('[{"id": "a"}, {"source": "local"}]')
    # warnings printed before the JSON are tolerated
    assert [e.id for e in parseModelsJson('UserWarning: x\n[{"id": "a"}]')] == ["a"]


def test_presets_and_method_labels():
    assert parsePresetsJson('["supervised", "caml", "caml"]') == ["supervised", "caml"]
    # the core's presets are named configs: the module offers their methods
    core = '[{"name": "caml-la-16", "method": "caml"}, {"name": "caml-la-4", "method": "caml"}, ' \
           '{"name": "finetune", "method": "mean_teacher"}, {"name": "crln-la-8", "method": "crln"}]'
    assert parsePresetsJson(core) == ["caml", "mean_teacher", "crln"]
    assert parsePresetsJson('[{"name": "crln", "description": "..."}, {"id": "semicml"}]') == ["crln", "semicml"]
    assert parsePresetsJson('{"presets": ["mean_teacher"]}') == ["mean_teacher"]
    assert parsePresetsJson("usage: error") == []
    assert methodLabel("semicml") == "Semi-CML (PReL)" and methodLabel("new_method") == "new_method"


def test_the_dice_says_what_it_was_measured_on():
    """A fine-tune's figure on its own training cases must not read like a parent's validation Dice."""
    assert diceText(ModelEntry({"id": "a", "dice": 0.851})) == "validation Dice 0.851"  # older rows: validation
    assert diceText(ModelEntry({"id": "b", "dice": 0.87, "dice_kind": "site hold-out"})) == "site hold-out Dice 0.870"
    fit = diceText(ModelEntry({"id": "c", "dice": 0.893, "dice_kind": "training fit"}))
    assert fit == "Dice 0.893 on its own training cases (optimistic)"
    assert diceText(ModelEntry({"id": "d", "dice": None})) == "Dice: n/a"


def test_guard_warning_only_for_a_worse_child():
    assert guardWarning(None, "p") is None
    assert guardWarning({"verdict": "better or equal", "parent_dice": 0.8, "child_dice": 0.9}, "p") is None
    assert guardWarning({"verdict": "unchecked: fewer than 3 labelled cases"}, "p") is None
    text = guardWarning({"verdict": "worse", "parent": "base-v1", "parent_dice": 0.85, "child_dice": 0.61}, "x")
    assert "worse than its parent base-v1" in text and "(Dice 0.610 vs 0.850)" in text and "stays selected" in text
    assert "your held-out case (Dice" in text
    three = guardWarning({"verdict": "worse", "parent": "b", "parent_dice": 0.8, "child_dice": 0.7,
                          "held_out_cases": 3}, "x")
    assert "on your 3 held-out cases (Dice 0.700 vs 0.800)" in three


def test_a_child_better_on_one_held_out_case_or_unchecked_is_called_little_evidence():
    """One held-out whole scan called the child better in 12 of 12 benchmark runs where it was worse on 8
    others (worse on the two its parent segmented worst): the panel says how much a single case says, and where
    to look first, and only then."""
    one = {"verdict": "better or equal", "parent": "base-v1", "parent_dice": 0.85, "child_dice": 0.88,
           "held_out_cases": 1}
    text = guardNote(one, "x")
    assert "better than its parent base-v1 on your one held-out case (Dice 0.880 vs 0.850)" in text
    assert "little evidence" in text and "scans you did not annotate, first those base-v1 segmented worst" in text
    assert "Revert to base" in text
    assert guardNote({**one, "held_out_cases": 3}, "x") is None
    assert guardNote({**one, "verdict": "worse"}, "x") is None
    unchecked = guardNote({"verdict": "unchecked: fewer than 3 labelled cases", "held_out_cases": 0}, "base-v1")
    assert "not checked against its parent base-v1" in unchecked and "Revert to base" in unchecked
    assert guardNote(None, "x") is None


def test_the_scans_where_the_new_model_and_its_parent_disagree_most_are_named_first():
    from SemiSegLALib.catalog import agreementNote

    guard = {"agreement": {"cases": [["Scan_2", 0.64], ["Scan_1", 0.88], ["Scan_3", 0.95], ["Scan_4", 0.97]]}}
    text = agreementNote(guard, {"Scan_2": "Scan 2", "Scan_1": "Scan 1"})
    assert text.startswith("Of 4 unlabelled volume(s)") and "'Scan 2' (0.64), 'Scan 1' (0.88), 'Scan_3' (0.95)" in text
    assert "Scan_4" not in text
    assert agreementNote({"agreement": {"cases": [], "not_compared": 3}}) is None
    assert agreementNote({"verdict": "better or equal"}) is None and agreementNote(None) is None
    shown = agreementNote(guard, {"Scan_2": "Scan 2"}, ["Scan 2"], "site-v1", "base-v1")
    assert ("Each model's result on 'Scan 2' is in the scene as '<volume>: site-v1 (new)' and '<volume>: base-v1 "
            "(parent)'") in shown
    assert "segmented with each model" in text and "segmented with each model" not in shown


def test_the_label_files_of_the_lowest_agreement_are_read_in_order_and_malformed_ones_skipped():
    from SemiSegLALib.catalog import agreementLabels

    labels = {"Scan_2": {"new": "/r/Scan_2_new.nrrd", "parent": "/r/Scan_2_parent.nrrd"},
              "Scan_1": {"new": "/r/Scan_1_new.nrrd"}, "Scan_3": "not a record",
              "Scan_4": {"new": "/r/Scan_4_new.nrrd", "parent": "/r/Scan_4_parent.nrrd"}}
    assert agreementLabels({"agreement": {"cases": [], "labels": labels}}) == [
        ("Scan_2", "/r/Scan_2_new.nrrd", "/r/Scan_2_parent.nrrd"),
        ("Scan_4", "/r/Scan_4_new.nrrd", "/r/Scan_4_parent.nrrd")]
    assert agreementLabels({"agreement": {"cases": []}}) == [] and agreementLabels(None) == []
    assert agreementLabels({"agreement": {"labels": ["not", "a", "mapping"]}}) == []
