"""Point cloud distances and generation metrics, batched in PyTorch.

Distances (inputs ``[B,N,3]`` and ``[B,M,3]``, one value per pair, result ``[B]``):

- :func:`chamfer_distance`: **squared** L2 by default; for each point the distance to its
  nearest neighbour in the other cloud, **averaged** over the points of each cloud, and the
  two directions **summed**. This is how PVD, PSF and PointFlow compute CD.
- :func:`emd`: earth mover's distance between equal-size clouds: the mean cost of the best
  one-to-one matching. ``squared=True`` matches squared L2 distances, as PSF's training code
  did; ``squared=False`` matches plain L2 distances, as PointFlow's evaluation (and thus the
  published MMD-EMD / COV-EMD / 1-NNA-EMD tables) did. ``exact=True`` solves the
  assignment with scipy's solver (one cloud pair at a time, on the CPU); ``exact=False`` runs
  an annealed log-domain Sinkhorn in torch, batched (the GPU path), rounded to a feasible
  plan, so its cost is an upper bound on the exact one, by a few percent at most
  (``tests/test_metrics_pointcloud.py`` bounds it against the exact solver).

Generation metrics (:func:`compute_all_metrics`), as PointFlow's ``evaluation_metrics.py``
defines them, for a set of generated ``samples`` and reference ``refs``:

- ``MMD-X``: for every reference, the distance to its nearest sample; averaged over refs.
- ``COV-X``: the fraction of references that are the nearest reference of some sample.
- ``1-NNA-X``: leave-one-out 1-nearest-neighbour accuracy of telling samples from refs in
  the pooled set (0.5 is ideal; 1.0 means perfectly separable).
- ``JSD``: Jensen-Shannon divergence (base 2) between the two sets' point-occupancy
  histograms on a 28^3 grid over ``[-0.5, 0.5]^3`` keeping the cells inside the radius-0.5
  sphere; each point counts in its nearest cell.

Values are raw (papers often print MMD-CD x 10^3 and MMD-EMD x 10^2).
"""
from __future__ import annotations

import numpy as np
import torch

from zoo.errors import DataError, require

__all__ = ["chamfer_distance", "emd", "pairwise_distances", "mmd_cov", "one_nna", "jsd",
           "compute_all_metrics"]


def _check_clouds(x: torch.Tensor, y: torch.Tensor, same_size: bool = False):
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or not t.is_floating_point():
            raise DataError(f"{name} must be a float tensor [B,N,D] of point clouds, got "
                            f"{getattr(t, 'shape', type(t))}")
    if x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise DataError(f"x {tuple(x.shape)} and y {tuple(y.shape)} must share batch and dimension")
    if same_size and x.shape[1] != y.shape[1]:
        raise DataError(f"EMD needs clouds of equal size, got {x.shape[1]} and {y.shape[1]} points; "
                        "subsample the larger one")


def _sq_dists(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[B,N,M]`` squared L2 distances, by differences (exact even for nearly equal points)."""
    return (x.unsqueeze(2) - y.unsqueeze(1)).pow(2).sum(-1)


def chamfer_distance(x: torch.Tensor, y: torch.Tensor, squared: bool = True,
                     chunk: int = 8) -> torch.Tensor:
    """Chamfer distance ``[B]`` between ``x [B,N,D]`` and ``y [B,M,D]`` (see module docstring).

    ``mean_i min_j d(x_i, y_j) + mean_j min_i d(x_i, y_j)`` with ``d`` squared L2 (default)
    or L2. Differentiable. ``chunk`` clouds are processed at a time to bound memory.
    """
    _check_clouds(x, y)
    out = []
    for s in range(0, x.shape[0], chunk):
        d = _sq_dists(x[s:s + chunk], y[s:s + chunk])
        if not squared:
            d = d.clamp_min(0).sqrt()
        out.append(d.min(2).values.mean(1) + d.min(1).values.mean(1))
    return torch.cat(out)


def _emd_exact(cost: torch.Tensor) -> torch.Tensor:
    linear_sum_assignment = require("scipy.optimize", "3d", "exact EMD").linear_sum_assignment

    vals = []
    for c in cost:
        rows, cols = linear_sum_assignment(c.detach().cpu().double().numpy())
        idx_r = torch.as_tensor(rows, device=c.device)
        idx_c = torch.as_tensor(cols, device=c.device)
        vals.append(c[idx_r, idx_c].mean())  # differentiable through the matched costs
    return torch.stack(vals)


def _emd_sinkhorn(cost: torch.Tensor, iters: int, eps_final: float) -> torch.Tensor:
    """Annealed log-domain Sinkhorn, rounded to a feasible plan; returns ``<P, C>`` per batch.

    Costs are divided by their mean so that one temperature schedule (from 1 down to
    ``eps_final``) suits every cloud. The last plan is rounded onto the exact uniform
    marginals (Altschuler, Weed & Rigollet 2017), so the result is the cost of a feasible
    matching: never below the exact EMD.
    """
    b, n, _ = cost.shape
    c = cost.detach().double()
    c = c / c.mean((1, 2), keepdim=True).clamp_min(1e-12)
    log_mu = torch.full((b, n), -np.log(n), dtype=c.dtype, device=c.device)
    f = torch.zeros_like(log_mu)
    g = torch.zeros_like(log_mu)
    eps_list = np.geomspace(1.0, eps_final, num=max(2, iters // 10))
    per_eps = max(1, iters // len(eps_list))
    for eps in eps_list:
        for _ in range(per_eps):
            f = eps * (log_mu - torch.logsumexp((g[:, None, :] - c) / eps, dim=2))
            g = eps * (log_mu - torch.logsumexp((f[:, :, None] - c) / eps, dim=1))
    plan = torch.exp((f[:, :, None] + g[:, None, :] - c) / eps_list[-1])
    target = 1.0 / n
    plan = plan * (target / plan.sum(2, keepdim=True)).clamp(max=1)
    plan = plan * (target / plan.sum(1, keepdim=True)).clamp(max=1)
    err_r = target - plan.sum(2)
    err_c = target - plan.sum(1)
    plan = plan + err_r[:, :, None] * err_c[:, None, :] / err_r.sum(1).clamp_min(1e-300)[:, None, None]
    return (plan.to(cost.dtype) * cost).sum((1, 2))  # envelope theorem: gradient via the cost


def emd(x: torch.Tensor, y: torch.Tensor, exact: bool = False, squared: bool = True,
        iters: int = 300, eps: float = 1e-3) -> torch.Tensor:
    """Earth mover's distance ``[B]``: mean matched cost between equal-size clouds.

    Args:
        x, y: ``[B,N,D]``.
        exact: Hungarian assignment (scipy) instead of batched Sinkhorn.
        squared: match squared L2 distances (PSF's training) or L2 (PointFlow's metrics).
        iters, eps: Sinkhorn iterations and final entropic temperature relative to the
            largest cost; ignored when ``exact``.

    Differentiable in both clouds (through the matched costs).
    """
    _check_clouds(x, y, same_size=True)
    out = []
    step = max(1, (1 << 22) // (x.shape[1] * y.shape[1]))  # bound the [B,N,N] cost memory
    for s in range(0, x.shape[0], step):
        cost = _sq_dists(x[s:s + step], y[s:s + step])
        if not squared:
            cost = cost.clamp_min(0).sqrt()
        out.append(_emd_exact(cost) if exact else _emd_sinkhorn(cost, iters, eps))
    return torch.cat(out)


def pairwise_distances(a: torch.Tensor, b: torch.Tensor, metric: str = "cd",
                       batch_size: int = 64, **emd_kwargs) -> torch.Tensor:
    """``[len(a), len(b)]`` matrix of ``cd`` or ``emd`` between every cloud of ``a`` and of ``b``."""
    if metric not in ("cd", "emd"):
        raise DataError(f"metric must be 'cd' or 'emd', not {metric!r}")
    na, nb = a.shape[0], b.shape[0]
    ia, ib = torch.meshgrid(torch.arange(na), torch.arange(nb), indexing="ij")
    ia, ib = ia.reshape(-1), ib.reshape(-1)
    out = torch.empty(na * nb, dtype=a.dtype)
    with torch.no_grad():
        for s in range(0, na * nb, batch_size):
            x, y = a[ia[s:s + batch_size]], b[ib[s:s + batch_size]]
            d = chamfer_distance(x, y) if metric == "cd" else emd(x, y, **emd_kwargs)
            out[s:s + batch_size] = d.cpu()
    return out.view(na, nb)


def mmd_cov(dist_sample_ref: torch.Tensor) -> tuple[float, float]:
    """MMD and COV from a ``[num_samples, num_refs]`` distance matrix (PointFlow's definitions)."""
    mmd = dist_sample_ref.min(0).values.mean().item()  # per ref: its nearest sample
    nearest_ref = dist_sample_ref.argmin(1)  # per sample: its nearest ref
    cov = nearest_ref.unique().numel() / dist_sample_ref.shape[1]
    return mmd, cov


def one_nna(d_rr: torch.Tensor, d_rs: torch.Tensor, d_ss: torch.Tensor) -> float:
    """Leave-one-out 1-NN accuracy on the pooled set (refs labelled 1, samples 0).

    ``d_rr [R,R]``, ``d_rs [R,S]``, ``d_ss [S,S]``. Each cloud is classified by the label of
    its nearest other cloud; ties go to the lowest index (refs first), as ``topk`` does in
    PointFlow's code.
    """
    r, s = d_rr.shape[0], d_ss.shape[0]
    full = torch.cat([torch.cat([d_rr, d_rs], 1), torch.cat([d_rs.T, d_ss], 1)], 0).double()
    full = full + torch.diag(torch.full((r + s,), float("inf"), dtype=full.dtype))
    label = torch.cat([torch.ones(r), torch.zeros(s)])
    pred = label[full.argmin(0)]
    return (pred == label).float().mean().item()


def _occupancy(clouds: np.ndarray, resolution: int) -> np.ndarray:
    cKDTree = require("scipy.spatial", "3d", "JSD").cKDTree

    axis = np.arange(resolution) / (resolution - 1) - 0.5
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    grid = grid[np.linalg.norm(grid, axis=1) <= 0.5]
    _, idx = cKDTree(grid).query(clouds.reshape(-1, 3))
    return np.bincount(idx, minlength=len(grid)).astype(np.float64)


def jsd(samples: torch.Tensor, refs: torch.Tensor, resolution: int = 28) -> float:
    """Jensen-Shannon divergence (base 2) of the two sets' occupancy histograms (module docstring)."""
    entropy = require("scipy.stats", "3d", "JSD").entropy

    p = _occupancy(samples.detach().cpu().double().numpy(), resolution)
    q = _occupancy(refs.detach().cpu().double().numpy(), resolution)
    p, q = p / p.sum(), q / q.sum()
    return float(entropy((p + q) / 2, base=2) - (entropy(p, base=2) + entropy(q, base=2)) / 2)


def compute_all_metrics(samples: torch.Tensor, refs: torch.Tensor, batch_size: int = 64,
                        emd_exact: bool | None = None, emd_squared: bool = False,
                        jsd_resolution: int = 28, include_emd: bool = True) -> dict[str, float]:
    """PointFlow's generation metrics for ``samples [S,N,3]`` against ``refs [R,N,3]``.

    Returns ``MMD-CD``, ``MMD-EMD``, ``COV-CD``, ``COV-EMD``, ``1-NNA-CD``, ``1-NNA-EMD``
    and ``JSD`` (module docstring). EMD is PointFlow's (plain L2, ``emd_squared=False``) by
    default; ``emd_exact=None`` solves it exactly for CPU tensors (faster there) and with
    batched Sinkhorn for CUDA tensors. ``include_emd=False`` leaves the three EMD entries out:
    exact EMD is one assignment problem per pair of clouds, minutes at a few hundred clouds,
    where the Chamfer metrics take seconds.
    """
    if emd_exact is None:
        emd_exact = not samples.is_cuda
    if samples.dim() != 3 or refs.dim() != 3 or samples.shape[1:] != refs.shape[1:]:
        raise DataError(f"samples {tuple(samples.shape)} and refs {tuple(refs.shape)} must be "
                        "[S,N,3] and [R,N,3] with the same N")
    if samples.shape[0] < 1 or refs.shape[0] < 1:
        raise DataError("compute_all_metrics needs at least one sample and one reference")
    results = {}
    metrics = [("cd", {})] + ([("emd", {"exact": emd_exact, "squared": emd_squared})] if include_emd else [])
    for metric, kw in metrics:
        d_rs = pairwise_distances(refs, samples, metric, batch_size, **kw)
        d_rr = pairwise_distances(refs, refs, metric, batch_size, **kw)
        d_ss = pairwise_distances(samples, samples, metric, batch_size, **kw)
        mmd, cov = mmd_cov(d_rs.T)
        tag = metric.upper()
        results[f"MMD-{tag}"] = mmd
        results[f"COV-{tag}"] = cov
        results[f"1-NNA-{tag}"] = one_nna(d_rr, d_rs, d_ss)
    results["JSD"] = jsd(samples, refs, jsd_resolution)
    return results
