"""Make tests/data/kitti_eval_reference.json: OpenPCDet's KITTI evaluator on `kitti_cases`.

Run once, outside the test suite, with numba and an OpenPCDet checkout (nothing of it is copied
here); its rotated IoU is a numba CUDA kernel, which the CUDA simulator runs on a CPU:

    NUMBA_ENABLE_CUDASIM=1 python tests/make_kitti_reference.py /path/to/OpenPCDet

The evaluator's own code reads the label files (``get_label_annos``) and computes the AP
(``get_official_eval_result``); its ``ret_dict`` carries R40 only, so the R11 values and both
threshold sets are read from its returned text, which prints every cell to 4 decimals (AOS to 2).
"""
from __future__ import annotations

import importlib.util
import json
import re
import sys
import tempfile
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from kitti_cases import CASES, write_case  # noqa: E402

CLASSES = ["Car", "Pedestrian", "Cyclist"]


def load_port(openpcdet: Path):
    # kitti_common imports skimage for image reading, which the evaluation never calls
    sys.modules.setdefault("skimage", types.ModuleType("skimage"))
    sys.modules["skimage"].io = None
    base = openpcdet / "pcdet" / "datasets" / "kitti" / "kitti_object_eval_python"
    pkg = "kitti_eval_port"
    spec = importlib.util.spec_from_file_location(pkg, base / "__init__.py", submodule_search_locations=[str(base)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[pkg] = mod
    spec.loader.exec_module(mod)
    evalmod = importlib.import_module(f"{pkg}.eval")
    common = importlib.import_module(f"{pkg}.kitti_common")
    return evalmod, common


def parse(text: str) -> dict:
    """The evaluator's text -> {set: {class: {R11|R40: {metric: [e, m, h]}}}}."""
    out: dict = {}
    head = re.compile(r"^(\w+) AP(_R40)?@([\d.]+), ([\d.]+), ([\d.]+):$")
    cur = None
    for line in text.splitlines():
        m = head.match(line.strip())
        if m:
            cls, r40, *th = m.groups()
            key = "ap_loose" if th[1] != th[0] else "ap"  # the loose set lowers BEV and 3D
            cur = out.setdefault(key, {}).setdefault(cls, {}).setdefault("R40" if r40 else "R11", {})
            continue
        m = re.match(r"^(bbox|bev|3d|aos)\s+AP:(.*)$", line.strip())
        if m and cur is not None:
            cur[m.group(1)] = [float(v) for v in m.group(2).split(",")]
    return out


def main(openpcdet: str) -> None:
    evalmod, common = load_port(Path(openpcdet))
    ref = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in CASES:
            gt_dir, pred_dir = write_case(name, Path(tmp) / name)
            ids = sorted(int(p.stem) for p in gt_dir.glob("*.txt"))
            gt = common.get_label_annos(str(gt_dir), ids)
            dt = []
            for i in ids:  # a missing result file is no detections
                p = pred_dir / f"{i:06d}.txt"
                if not p.exists():
                    p.write_text("")
                dt.append(common.get_label_anno(str(p)))
            text, _ = evalmod.get_official_eval_result(gt, dt, CLASSES)
            ref[name] = parse(text)
            print(name, "done", file=sys.stderr)
    out = Path(__file__).parent / "data" / "kitti_eval_reference.json"
    out.write_text(json.dumps({"command": "NUMBA_ENABLE_CUDASIM=1 python tests/make_kitti_reference.py OPENPCDET",
                               "source": "open-mmlab/OpenPCDet pcdet/datasets/kitti/kitti_object_eval_python",
                               "cases": ref}, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
