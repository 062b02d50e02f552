"""zoo.metrics.kitti against OpenPCDet's kitti_object_eval_python.

The reference numbers in tests/data/kitti_eval_reference.json were made once by running the
port itself (under numba's CUDA simulator) on the label sets of tests/kitti_cases.py; the
command is in the file and in tests/make_kitti_reference.py.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.kitti_cases import CASES, write_case
from zoo.errors import DataError
from zoo.metrics.kitti import evaluate, format_results

REF = json.loads((Path(__file__).parent / "data" / "kitti_eval_reference.json").read_text())


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_cell_equals_the_official_evaluator(case, tmp_path):
    gt_dir, pred_dir = write_case(case, tmp_path)
    got = evaluate(gt_dir, pred_dir)
    ref = REF["cases"][case]
    cells = 0
    for key in ("ap", "ap_loose"):
        for cls, per in ref[key].items():
            for r in ("R11", "R40"):
                for metric, values in per[r].items():
                    for diff, v in zip(("easy", "moderate", "hard"), values):
                        # the port prints AP to 4 decimals and AOS to 2
                        tol = 0.005 if metric == "aos" else 5e-5
                        assert abs(got[key][cls][r][metric][diff] - v) <= tol + 1e-9, (key, cls, r, metric, diff)
                        cells += 1
    has_aos = CASES[case][2]
    assert cells == 2 * 3 * 2 * (4 if has_aos else 3) * 3
    if not has_aos:
        assert math.isnan(got["ap"]["Car"]["R40"]["aos"]["easy"])
    assert max(ref["ap"]["Car"]["R40"]["bev"]) > 10  # the case exercises real matches


def test_missing_and_empty_result_files_are_no_detections(tmp_path):
    gt_dir, pred_dir = write_case("crowded", tmp_path)
    first = evaluate(gt_dir, pred_dir)
    for p in sorted(pred_dir.glob("*.txt"))[:5]:
        if p.read_text():
            p.write_text("")
            break
    else:
        pytest.fail("no non-empty result file")
    empty = evaluate(gt_dir, pred_dir)
    p.unlink()
    assert evaluate(gt_dir, pred_dir) == empty
    assert empty != first
    assert first["frames"] == CASES["crowded"][1]


def test_perfect_predictions_score_100(tmp_path):
    """Every object predicted exactly, with distinct scores, scores 100 in every cell; objects
    whose image boxes overlap another's are dropped first (the port's matching may then hand a
    copy to its neighbour, which is its rule, not an error)."""
    gt_src, _ = write_case("many", tmp_path / "src")
    gt_dir, pred = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred.mkdir()
    rng = np.random.default_rng(0)
    for p in gt_src.glob("*.txt"):
        rows = [l.split() for l in p.read_text().splitlines()]
        boxes = np.array([[float(v) for v in r[4:8]] for r in rows]).reshape(-1, 4)
        lone = [i for i in range(len(rows))
                if all(_overlap(boxes[i], boxes[j]) == 0 for j in range(len(rows)) if j != i)]
        rows = [rows[i] for i in lone if rows[i][0] != "DontCare"]
        for copy in range(4):  # the port needs >= 41 counted objects to reach every recall sample
            name = f"{copy}{p.name[1:]}"
            (gt_dir / name).write_text("".join(" ".join(r) + "\n" for r in rows))
            (pred / name).write_text("".join(" ".join(r) + f" {rng.uniform(0.1, 1):.4f}\n" for r in rows))
    got = evaluate(gt_dir, pred)
    for key in ("ap", "ap_loose"):
        for cls in ("Car", "Pedestrian"):
            for r in ("R11", "R40"):
                for metric in ("bbox", "bev", "3d", "aos"):
                    assert got[key][cls][r][metric]["moderate"] == pytest.approx(100.0), (key, cls, r, metric)
    assert "Car AP_R40@0.70, 0.70, 0.70" in format_results(got)


def _overlap(a, b):
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def test_bad_input(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        evaluate(tmp_path / "nope", tmp_path)
    (tmp_path / "gt").mkdir()
    with pytest.raises(DataError, match="no label files"):
        evaluate(tmp_path / "gt", tmp_path)
    gt_dir, pred_dir = write_case("crowded", tmp_path / "c")
    with pytest.raises(DataError, match="not 'Tram'"):
        evaluate(gt_dir, pred_dir, classes=("Tram",))
    bad = sorted(pred_dir.glob("*.txt"))[0]
    bad.write_text("Car 1 2\n")
    with pytest.raises(DataError, match=f"{bad.name}:1: 3 fields"):
        evaluate(gt_dir, pred_dir)


def test_the_cases_hold_the_edge_cases(tmp_path):
    """The reference sets exercise the rules they are meant to: exact height and truncation
    limits, empty frames, frames without a result file, detections on DontCare regions."""
    from zoo.data.kitti import read_labels

    heights, truncs, empty, dontcare_hits, missing = set(), set(), 0, 0, 0
    for case in CASES:
        gt_dir, pred_dir = write_case(case, tmp_path / case)
        for p in gt_dir.glob("*.txt"):
            objs = read_labels(p)
            empty += not objs
            heights |= {o.bbox[3] - o.bbox[1] for o in objs}
            truncs |= {o.truncated for o in objs}
            q = pred_dir / p.name
            if not q.exists():
                missing += 1
                continue
            dets = read_labels(q)
            for o in objs:
                if o.type == "DontCare":
                    dontcare_hits += any(min(o.bbox[2], d.bbox[2]) > max(o.bbox[0], d.bbox[0]) and
                                         min(o.bbox[3], d.bbox[3]) > max(o.bbox[1], d.bbox[1]) for d in dets)
    assert {25.0, 40.0} <= heights
    assert {0.15, 0.3, 0.5} <= truncs
    assert empty >= 5 and missing >= 5 and dontcare_hits >= 10
