"""Does a network take the sum of its blocks' times? The additivity report of a latency table.

Random architectures of the search space are built in their deploy form, timed whole on the
table's backend (interleaved rounds, medians: `zoo.slim.measure.interleaved`), and compared
with the table's sum over their blocks, raw and after a fitted ``a * sum + b``. The fit's
errors are leave-one-out (each architecture predicted by the line fitted on the others), so
they say how the calibration does on an architecture it has not seen; the line stored in the
table is the one fitted on all of them. Rank agreement: Spearman's rho (scipy).
"""
from __future__ import annotations

import random

import numpy as np

from zoo.errors import ConfigError, DataError
from zoo.slim.measure import check_backend, measure_networks
from zoo.slim.table import LatencyTable

__all__ = ["additivity_report", "fit_line", "format_report"]


def fit_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least squares ``y = a x + b``."""
    a, b = np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)
    return float(a), float(b)


def additivity_report(space, table: LatencyTable, num_archs: int = 8, seed: int = 0, warmup: int = 5, reps: int = 30,
                      archs=None, store: bool = True) -> dict:
    """Measure `num_archs` random architectures (or the given `archs`) on the table's backend
    and thread count; returns the per-architecture rows and the summary, and with `store`
    puts the fitted line into ``table.calibration``."""
    from scipy.stats import spearmanr

    backend = table.provenance.get("backend")
    threads = int(table.provenance.get("threads") or 1)
    if backend not in ("torch", "onnxruntime", "cuda"):
        raise DataError(f"{table.where} was measured on {backend!r}, which zoo cannot run here; an imported device "
                        "table is checked on the device (the CoreML manifest includes whole networks for that).")
    check_backend(backend, threads)
    if archs is None:
        if num_archs < 3:
            raise ConfigError("the additivity report needs at least 3 architectures (a line is fitted).")
        rng = random.Random(seed)
        archs = [space.random_arch(rng) for _ in range(num_archs)]
    table.check_covers(k for a in archs for k in space.keys(a))
    measured = np.array(measure_networks(space, archs, backend, threads, warmup, reps), dtype=float)
    summed = np.array([table.predict(space.keys(a), calibrated=False) for a in archs])
    a, b = fit_line(summed, measured)
    loo = np.empty_like(measured)
    for i in range(len(archs)):
        keep = np.arange(len(archs)) != i
        ai, bi = fit_line(summed[keep], measured[keep])
        loo[i] = ai * summed[i] + bi
    raw_err = (summed - measured) / measured
    cal_err = (loo - measured) / measured
    rho = float(spearmanr(summed, measured).statistic)
    rows = [{"arch": arch.to_json(), "measured_ms": float(m), "table_sum_ms": float(s), "calibrated_ms": float(c),
             "raw_error": float(r), "calibrated_error": float(e)}
            for arch, m, s, c, r, e in zip(archs, measured, summed, loo, raw_err, cal_err)]
    report = {"backend": backend, "threads": threads, "img_size": space.img_size, "reps": reps,
              "overhead_ms": table.overhead_ms,
              "num_archs": len(archs), "a": a, "b": b, "spearman": rho,
              "raw_mean_abs_error": float(np.abs(raw_err).mean()), "raw_max_abs_error": float(np.abs(raw_err).max()),
              "calibrated_mean_abs_error": float(np.abs(cal_err).mean()),
              "calibrated_max_abs_error": float(np.abs(cal_err).max()), "rows": rows}
    # a line that falls (a <= 0) would reverse the table's ranking: not a calibration to keep
    report["calibration_stored"] = bool(store and a > 0)
    if report["calibration_stored"]:
        table.calibration = {"a": a, "b": b, "fitted_on": len(archs), "spearman": rho,
                             "calibrated_max_abs_error": report["calibrated_max_abs_error"]}
    return report


def format_report(report: dict) -> str:
    """The report as a markdown table and a summary line."""
    third = "heads" if report["rows"] and "heads" in report["rows"][0]["arch"] else "num_vit"
    lines = [f"| arch (widths / depths / {third}) | measured ms | table sum ms | error | calibrated ms | error |",
             "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        a = r["arch"]
        lines.append(f"| {a['widths']} / {a['depths']} / {a[third]} | {r['measured_ms']:.3f} | "
                     f"{r['table_sum_ms']:.3f} | {r['raw_error']:+.1%} | {r['calibrated_ms']:.3f} | "
                     f"{r['calibrated_error']:+.1%} |")
    lines += ["", f"{report['num_archs']} random architectures, {report['backend']}, {report['threads']} thread(s), "
                  f"{report['img_size']} px, median of {report['reps']} interleaved rounds. Table sum: the blocks' "
                  f"medians less a {report.get('overhead_ms', 0.0):.4f} ms call overhead for all blocks but one. "
                  "Raw: mean |error| "
                  f"{report['raw_mean_abs_error']:.1%}, max {report['raw_max_abs_error']:.1%}. Calibrated "
                  f"(a = {report['a']:.3f}, b = {report['b']:.3f} ms; leave-one-out): mean |error| "
                  f"{report['calibrated_mean_abs_error']:.1%}, max {report['calibrated_max_abs_error']:.1%}. "
                  f"Spearman rho {report['spearman']:.3f}."]
    return "\n".join(lines)
