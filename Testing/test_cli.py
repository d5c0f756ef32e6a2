"""The `semiseg-la` command end to end, as a user runs it: real child processes, real files."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from cli_helpers import json_lines, oblique_direction, read_header, run_cli, save_tiny_model, write_case


@pytest.fixture()
def tiny_model():
    return save_tiny_model()


@pytest.mark.parametrize("spacing,direction", [
    ((1.0, 1.0, 1.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)),
    ((0.8, 1.1, 2.2), (-1, 0, 0, 0, -1, 0, 0, 0, 1)),  # RAS-style axes, anisotropic
    ((0.9, 0.9, 1.5), oblique_direction(20.0)),
])
def test_segment_writes_label_on_the_input_grid(tmp_path, tiny_model, spacing, direction):
    src = tmp_path / "scan.nrrd"
    write_case(src, spacing=spacing, origin=(-12.5, 30.0, 7.25), direction=direction)
    out = tmp_path / "seg.nrrd"
    proc = run_cli(["segment", str(src), "-o", str(out), "--model", "tiny-test-v0.1.0", "--progress", "json",
                    "--device", "cpu"])
    assert proc.returncode == 0, proc.stderr
    records = json_lines(proc.stdout)
    assert records[-1]["stage"] == "done" and records[-1]["device"] == "cpu"
    assert {"load", "preprocess", "predict", "write"} <= {r["stage"] for r in records}
    size, sp, origin, direc = read_header(out)
    size0, sp0, origin0, direc0 = read_header(src)
    assert size == size0
    np.testing.assert_allclose(sp, sp0, atol=1e-6)
    np.testing.assert_allclose(origin, origin0, atol=1e-6)
    np.testing.assert_allclose(direc, direc0, atol=1e-6)
    assert sitk.ReadImage(str(out)).GetPixelID() == sitk.sitkUInt8


def _expect_one_line_error(proc, fragment):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("semiseg-la: error:")]
    assert len(lines) == 1, proc.stderr
    assert fragment.lower() in lines[0].lower(), lines[0]


def test_segment_rejects_bad_inputs_with_one_line(tmp_path, tiny_model):
    out = str(tmp_path / "o.nrrd")
    flat = tmp_path / "flat.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((20, 20), np.float32)), str(flat))
    _expect_one_line_error(run_cli(["segment", str(flat), "-o", out]), "2D")
    four = tmp_path / "four.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((3, 8, 8, 8), np.float32), isVector=False), str(four))
    _expect_one_line_error(run_cli(["segment", str(four), "-o", out]), "4D")
    nan = tmp_path / "nan.nrrd"
    arr = np.random.default_rng(0).normal(size=(20, 20, 20)).astype(np.float32)
    arr[3, 4, 5] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(nan))
    _expect_one_line_error(run_cli(["segment", str(nan), "-o", out]), "NaN")
    const = tmp_path / "const.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((20, 20, 20), np.float32)), str(const))
    _expect_one_line_error(run_cli(["segment", str(const), "-o", out]), "constant")
    good = tmp_path / "good.nrrd"
    write_case(good)
    cut = tmp_path / "cut.nrrd"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    _expect_one_line_error(run_cli(["segment", str(cut), "-o", out]), "cut.nrrd")
    _expect_one_line_error(run_cli(["segment", str(tmp_path / "missing.nrrd"), "-o", out]), "not found")
    _expect_one_line_error(run_cli(["segment", str(good), "-o", str(tmp_path / "o.png")]), "format")
    _expect_one_line_error(run_cli(["segment", str(good), "-o", out, "--model", "no-such-model"]), "no-such-model")


def test_segment_refuses_a_tampered_checkpoint(tmp_path, tiny_model):
    weights = sorted(tiny_model.glob("model*.safetensors"))[0]
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    good = tmp_path / "good.nrrd"
    write_case(good)
    proc = run_cli(["segment", str(good), "-o", str(tmp_path / "o.nrrd"), "--model", "tiny-test-v0.1.0",
                    "--progress", "json"])
    _expect_one_line_error(proc, "SHA-256")
    assert json_lines(proc.stdout)[-1] == {"stage": "error", "kind": "checkpoint",
                                           "message": json_lines(proc.stdout)[-1]["message"]}
    assert not (tmp_path / "o.nrrd").exists()


def test_segment_averages_the_flips_by_default(tmp_path, tiny_model):
    """The default is flip TTA (docs/results.md: +2.8 Dice points); --tta none is the one-pass fast path."""
    src = tmp_path / "scan.nrrd"
    write_case(src)

    def probability(*extra):
        out, prob = tmp_path / "seg.nrrd", tmp_path / f"prob{len(extra)}{'-'.join(extra)}.nrrd"
        proc = run_cli(["segment", str(src), "-o", str(out), "--model", "tiny-test-v0.1.0", "--device", "cpu",
                        "--progress", "none", "--probabilities", str(prob), *extra])
        assert proc.returncode == 0, proc.stderr
        return sitk.GetArrayFromImage(sitk.ReadImage(str(prob)))

    default, flip, one_pass = probability(), probability("--tta", "flip"), probability("--tta", "none")
    # Two processes may split the CPU convolutions differently, so equal means equal to float rounding
    # (CI saw 9e-6); the one-pass output differs by a hundred times more.
    np.testing.assert_allclose(default, flip, rtol=0, atol=1e-4)
    assert np.abs(default - one_pass).max() > 1e-2  # the random tiny network is not flip-symmetric


def test_progress_none_drops_the_bars_and_keeps_the_messages(tmp_path, tiny_model):
    """`--progress none > run.log 2>&1` (the README's detached run) must still log what was written and every
    warning: it drops the bars only (it used to drop everything, leaving such a log empty)."""
    src, out = tmp_path / "scan.nrrd", tmp_path / "seg.nrrd"
    write_case(src)
    proc = run_cli(["segment", str(src), "-o", str(out), "--model", "tiny-test-v0.1.0", "--device", "cpu",
                    "--tta", "none", "--progress", "none"])
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stderr
    assert "%|" not in proc.stderr  # no tqdm bar


def test_models_list_json_shows_local_model(tiny_model):
    import json

    proc = run_cli(["models", "list", "--json"])
    assert proc.returncode == 0, proc.stderr
    ids = {row["id"]: row for row in json.loads(proc.stdout)}
    assert ids["tiny-test-v0.1.0"]["source"] == "local"


def test_models_alone_lists_the_catalog(tiny_model):
    """`semiseg-la models` with no subcommand is `models list` (it was a usage error)."""
    alone, listed = run_cli(["models"]), run_cli(["models", "list"])
    assert alone.returncode == 0, alone.stderr
    assert "tiny-test-v0.1.0" in alone.stdout
    assert alone.stdout == listed.stdout


def test_models_import_accepts_official_state_dicts_and_refuses_pickles(tmp_path):
    import json

    import torch

    from semiseg_la.models import VNet

    net = VNet()
    official = {}
    for key, value in net.state_dict().items():  # UA-MT naming: block_one.conv.0.weight, out_conv.weight
        part, rest = key.split(".", 1)[1].split(".", 1)
        official[f"{part}.{rest}" if part == "out_conv" else f"{part}.conv.{rest}"] = value
    pth = tmp_path / "iter_6000.pth"
    torch.save(official, pth)
    proc = run_cli(["models", "import", str(pth), "--id", "uamt-import-v0.1.0"])
    assert proc.returncode == 0, proc.stderr
    listing = {r["id"] for r in json.loads(run_cli(["models", "list", "--json"]).stdout)}
    assert "uamt-import-v0.1.0" in listing

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": Payload()}, evil)
    proc = run_cli(["models", "import", str(evil)])
    _expect_one_line_error(proc, "pickle")
    assert not (tmp_path / "pwned").exists()
