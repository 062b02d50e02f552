"""The eager-CPU runtime of the deploy forms: oneDNN kernels with prepacked weights, their
caches, and the guards that decide when they may run.

A deploy form (``reparameterize()``) swaps its ``nn.Conv2d``, ``nn.Linear`` and ``nn.GELU``
for `DeployConv2d`, `DeployLinear` and `DeployGELU`, and each ``nn.Sequential`` holding a conv
directly followed by a GELU or ReLU for a `DeploySequential` that runs the pair as one oneDNN
call with the activation fused (`use_deploy_kernels`): the same parameters, keys and
function, with faster kernels in eager float32 CPU inference. The
model files never call anything here but those classes and a few guards; reading them does
not need this module.

Safety, in order:

- ``ZOO_CPU_KERNELS=0`` in the environment (read at the first call, or again after
  `reset_cpu_kernels`) turns every fast path off: the deploy form then runs stock PyTorch ops.
- The oneDNN ops are private PyTorch ops. They are used only after `probe_onednn` has called
  every variant this module uses (``_linear_pointwise.default`` plain and with ReLU or GELU,
  ``.binary`` add, ``_convolution_pointwise.default``, both weight reorders and the in-place
  GELU) on small tensors and checked the results against the stock ops. A failed probe turns
  them off with one warning saying why.
- A oneDNN call that raises later turns the oneDNN path off for that layer, with one warning,
  and the call is answered by the stock op.
- Kernel caches are per layer and lock their builds, so threads may share one model.
"""
from __future__ import annotations

import os
import threading
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

__all__ = [
    "cpu_kernels_enabled",
    "onednn_enabled",
    "probe_onednn",
    "reset_cpu_kernels",
    "can_write_inplace",
    "graph_capture",
    "eager_cpu_inference",
    "onednn_applies",
    "add_",
    "mul_add",
    "KernelCache",
    "kernel_cache",
    "prepacked_linear",
    "DeployConv2d",
    "DeployLinear",
    "DeployGELU",
    "DeploySequential",
    "act_name",
    "hooked",
    "nchw_fallback",
    "use_deploy_kernels",
]

ENV_VAR = "ZOO_CPU_KERNELS"


def graph_capture() -> bool:
    """True while tracing (jit or fx), scripting, compiling or exporting: then only standard
    ops are used, and no decision looks at a tensor."""
    return (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()
            or is_fx_symbolic_tracing())


# --- switches and the probe --------------------------------------------------------------

class _Switch:
    """What the first call found: whether fast kernels are wanted, and whether oneDNN passed
    its probe. ``None`` until decided; decided once under a lock."""

    enabled: bool | None = None
    onednn: bool | None = None
    lock = threading.Lock()
    # the op overloads, resolved once after the probe (each ``torch.ops`` lookup is a dict walk)
    linear = linear_add = conv = None


def reset_cpu_kernels() -> None:
    """Forget the switch and the probe result: the next call reads ``ZOO_CPU_KERNELS`` and
    probes again (for tests, and for a process that changes the variable)."""
    with _Switch.lock:
        _Switch.enabled = _Switch.onednn = None


def _decide() -> None:
    with _Switch.lock:
        if _Switch.enabled is not None:
            return
        enabled = os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "off", "no")
        onednn, why = (probe_onednn() if enabled else (False, f"{ENV_VAR}=0"))
        if enabled and not onednn:
            warnings.warn(f"zoo: the oneDNN CPU kernels are off ({why}); deploy forms use stock PyTorch ops.",
                          RuntimeWarning, stacklevel=3)
        if onednn:
            ops = torch.ops.mkldnn
            _Switch.linear, _Switch.linear_add = ops._linear_pointwise.default, ops._linear_pointwise.binary
            _Switch.conv = ops._convolution_pointwise.default
        _Switch.onednn = onednn
        _Switch.enabled = enabled  # last: readers that see it set see the rest


def cpu_kernels_enabled() -> bool:
    """False when ``ZOO_CPU_KERNELS=0``: deploy forms then run stock PyTorch ops only."""
    if _Switch.enabled is None:
        _decide()
    return _Switch.enabled


def onednn_enabled() -> bool:
    """True when the oneDNN kernels may be used: enabled, and the probe passed (so False
    whenever `cpu_kernels_enabled` is)."""
    if _Switch.enabled is None:
        _decide()
    return _Switch.onednn


# A fused activation's name -> oneDNN's post-op attribute and algorithm.
_POST_OPS = {"none": ("none", ""), "relu": ("relu", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh")}


def _act_(y: torch.Tensor, act: str) -> torch.Tensor:
    """``act(y)`` written into `y` (a fresh intermediate)."""
    if act == "relu":
        return y.relu_()
    if act in ("gelu", "gelu_tanh"):
        return torch._C._nn.gelu_(y, approximate="none" if act == "gelu" else "tanh")
    return y


def probe_onednn() -> tuple[bool, str]:
    """Call every oneDNN op variant used here once on small float32 tensors and compare with
    the stock ops; ``(True, "")`` or ``(False, why)``. Any exception counts as a failure."""
    ops = torch.ops.mkldnn
    if not torch.backends.mkldnn.is_available():
        return False, "this PyTorch build has no oneDNN"
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(8, 16, generator=g)
        w = torch.randn(12, 16, generator=g)
        b = torch.randn(12, generator=g)
        add = torch.randn(8, 12, generator=g)
        with torch.no_grad():
            packed = ops._reorder_linear_weight(w, 8)
            checks = {
                "_linear_pointwise.default": (ops._linear_pointwise.default(x, packed, b, "none", [], ""),
                                              F.linear(x, w, b)),
                "_linear_pointwise.default relu": (ops._linear_pointwise.default(x, packed, b, "relu", [], ""),
                                                   F.relu(F.linear(x, w, b))),
                "_linear_pointwise.default gelu": (ops._linear_pointwise.default(x, packed, b, "gelu", [], "none"),
                                                   F.gelu(F.linear(x, w, b))),
                "_linear_pointwise.default gelu tanh": (
                    ops._linear_pointwise.default(x, packed, b, "gelu", [], "tanh"),
                    F.gelu(F.linear(x, w, b), approximate="tanh")),
                "_linear_pointwise.binary add": (ops._linear_pointwise.binary(x, add, packed, b, "add"),
                                                 F.linear(x, w, b) + add),
            }
            xc = torch.randn(1, 8, 6, 6, generator=g)
            wc = torch.randn(8, 1, 3, 3, generator=g)
            bc = torch.randn(8, generator=g)
            for layout, name in ((torch.contiguous_format, ""), (torch.channels_last, " channels-last")):
                xl = xc.contiguous(memory_format=layout)
                pc = ops._reorder_convolution_weight(wc.contiguous(memory_format=layout), [1, 1], [1, 1], [1, 1], 8,
                                                     list(xl.shape))
                ref = F.conv2d(xc, wc, bc, 1, 1, 1, 8)
                checks["_convolution_pointwise.default" + name] = (
                    ops._convolution_pointwise.default(xl, pc, bc, [1, 1], [1, 1], [1, 1], 8, "none", [], ""), ref)
                checks["_convolution_pointwise.default relu" + name] = (
                    ops._convolution_pointwise.default(xl, pc, bc, [1, 1], [1, 1], [1, 1], 8, "relu", [], ""),
                    F.relu(ref))
                checks["_convolution_pointwise.default gelu" + name] = (
                    ops._convolution_pointwise.default(xl, pc, bc, [1, 1], [1, 1], [1, 1], 8, "gelu", [], "none"),
                    F.gelu(ref))
                checks["_convolution_pointwise.default gelu tanh" + name] = (
                    ops._convolution_pointwise.default(xl, pc, bc, [1, 1], [1, 1], [1, 1], 8, "gelu", [], "tanh"),
                    F.gelu(ref, approximate="tanh"))
            checks["gelu_"] = (torch._C._nn.gelu_(x.clone(), approximate="none"), F.gelu(x))
        for name, (got, want) in checks.items():
            if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
                return False, f"{name} gave wrong results on this CPU"
    except Exception as e:  # noqa: BLE001 - a private op may fail in any way on an odd build
        return False, f"{type(e).__name__}: {e}".splitlines()[0]
    return True, ""


def _onednn_failed(layer: nn.Module, error: Exception) -> None:
    """A oneDNN call of `layer` raised: that layer uses stock ops from now on; warn once."""
    layer.__dict__["_onednn_off"] = True
    warnings.warn(f"zoo: a oneDNN kernel failed in {type(layer).__name__} ({type(error).__name__}: "
                  f"{str(error).splitlines()[0] if str(error) else ''}); that layer now uses stock PyTorch ops.",
                  RuntimeWarning, stacklevel=3)


# --- guards --------------------------------------------------------------------------------

def can_write_inplace(t: torch.Tensor) -> bool:
    """True when eager inference may overwrite `t` (a fresh intermediate): no graph capture and
    no autograd history to keep. Deploy forms use it to allocate fewer large buffers, which on
    the CPU costs page faults (PyTorch's CPU allocator does not cache)."""
    return not graph_capture() and not (torch.is_grad_enabled() and t.requires_grad)


def eager_cpu_inference(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when a deploy-form fast path may run: kernels enabled, eager mode (no tracing,
    scripting, compiling or exporting), a CPU input, and no autograd graph to record through
    `x` or `weight`."""
    return (x.is_cpu and can_write_inplace(x) and not (torch.is_grad_enabled() and weight.requires_grad)
            and cpu_kernels_enabled())


def onednn_applies(layer: nn.Module, x: torch.Tensor) -> bool:
    """True when the oneDNN kernels with prepacked weights may serve `layer` on `x`: oneDNN
    passed its probe, it has not failed in this layer, and the input and weight are float32
    (the one dtype the paths are tested for)."""
    return (
        x.dtype == torch.float32
        and layer._parameters["weight"].dtype == torch.float32
        and onednn_enabled()
        and "_onednn_off" not in layer.__dict__
    )


def add_(branch: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x + branch``, written into `branch` (a fresh intermediate) when `can_write_inplace`."""
    if torch.jit.is_scripting():  # TorchScript compiles only this branch
        return x + branch
    return branch.add_(x) if can_write_inplace(branch) and branch.shape == x.shape else x + branch


def mul_add(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``a + b * c``: one fused ``addcmul`` in eager mode; plain mul and add in captured graphs,
    because CoreML has no ``addcmul``."""
    if torch.jit.is_scripting():
        return a + b * c
    return a + b * c if graph_capture() else torch.addcmul(a, b, c)


class DeployGELU(nn.GELU):
    """`nn.GELU` that overwrites its input (a fresh intermediate) in eager inference, once the
    in-place GELU passed the probe."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if can_write_inplace(x) and x.is_cpu and onednn_enabled():  # False too when the kernels are off
            return torch._C._nn.gelu_(x, approximate=self.approximate)
        return super().forward(x)


# --- caches ----------------------------------------------------------------------------------

class KernelCache(dict):
    """Tensors derived from one layer's weight for its fast kernels (prepacked oneDNN weights,
    dense depthwise matrices), keyed by what they depend on besides the weight (input rows or
    shape, layout, dtype). Each entry remembers the weight it was built from (the tensor, its
    storage and its version counter) and is rebuilt when any of these changed, so in-place
    edits, ``.data`` swaps, new Parameters and moves are all seen.

    Builds run under the cache's lock, so threads sharing a model never see a half-made entry
    or evict one another's; reads take no lock (an entry is one immutable tuple).

    Not parameters or buffers: never in the state dict, never exported. A deepcopy or pickle of
    the layer starts with an empty cache (prepacked oneDNN tensors cannot be copied), and at
    most `max_entries` keys are kept per layer.
    """

    max_entries = 4

    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()

    def __deepcopy__(self, memo) -> "KernelCache":
        return type(self)()

    def __reduce__(self):
        return type(self), ()

    def get_or_build(self, key, weight: torch.Tensor, build):
        """The tensor cached under `key`, built by ``build()`` (under no_grad) if missing or if
        `weight` is not what it was built from; a build returning None is not cached. Inference
        tensors keep no version counter, so for them only the tensor and storage are compared."""
        entry = self.get(key)
        version = -1 if weight.is_inference() else weight._version
        if entry is not None and entry[0] is weight and entry[1] == version and entry[2] == weight.data_ptr():
            return entry[3]
        with self.lock:
            entry = self.get(key)  # another thread may have built it meanwhile
            if entry is not None and entry[0] is weight and entry[1] == version and entry[2] == weight.data_ptr():
                return entry[3]
            with torch.no_grad():
                value = build()
            if value is None:  # nothing to cache: the caller has no fast form for this key
                return None
            if key not in self and len(self) >= self.max_entries:
                self.clear()
            self[key] = (weight, version, weight.data_ptr(), value)
            return value


def kernel_cache(module: nn.Module) -> KernelCache:
    """`module`'s `KernelCache`, created on first use (kept out of the module's registries)."""
    cache = module.__dict__.get("_kernel_cache")
    if cache is None:
        cache = module.__dict__.setdefault("_kernel_cache", KernelCache())
    return cache


def prepacked_linear(
    layer: nn.Module, x: torch.Tensor, tag: str, act: str = "none", add: torch.Tensor | None = None
) -> torch.Tensor | None:
    """``act(x @ W.T + layer.bias) + add`` through oneDNN for ``x [..., in]``, where ``W [out,
    in]`` is `layer`'s weight (a Linear's, or a 1x1 conv's ``[out, in, 1, 1]``), reordered once
    per number of rows of `x` and kept in `layer`'s `KernelCache` under `tag`. `act` (a key
    of `_POST_OPS`: none, relu, gelu, gelu_tanh) is fused; `add` (the output's shape, only without an `act`) is
    fused too. Call only where `eager_cpu_inference` and `onednn_applies` hold. None when the
    oneDNN call failed (the layer then stays on stock ops; see `_onednn_failed`)."""
    rows = x.numel() // x.shape[-1]
    params = layer._parameters
    weight = params["weight"]
    try:
        packed = kernel_cache(layer).get_or_build(
            (tag, rows), weight,
            lambda: torch.ops.mkldnn._reorder_linear_weight(weight.detach().reshape(weight.shape[0], -1), rows))
        if add is not None:
            return _Switch.linear_add(x, add.contiguous(), packed, params["bias"], "add")
        return _Switch.linear(x, packed, params["bias"], *_post_op(act))
    except RuntimeError as e:
        _onednn_failed(layer, e)
        return None


def _post_op(act: str) -> tuple[str, list, str]:
    """The ``attr, scalars, algorithm`` arguments of a oneDNN pointwise op fusing `act`."""
    attr, algorithm = _POST_OPS[act]
    return attr, [], algorithm


def _is_channels_last(x: torch.Tensor) -> bool:
    """A 4-D tensor stored channels-last (and not also plain contiguous, as when H = W = 1)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


class DeployConv2d(nn.Conv2d):
    """An `nn.Conv2d` (same parameters, same function) with faster eager CPU kernels.

    Small ViTs run hundreds of small convolutions, where the stock ``F.conv2d`` reorders the
    weight into oneDNN's blocked layout on every call whatever the arithmetic. In eager
    float32 inference on the CPU this module instead computes

    - a 1x1, stride-1, ungrouped conv of more than `onednn_rows_min_macs` multiply-adds on a
      channels-last input as one oneDNN product of its ``[B*H*W, Ci]`` rows with the weight
      prepacked, bias fused; the output is channels-last too, so chains stay in that layout;
    - such a conv at batch 1 on an NCHW input as one oneDNN product ``W @ X``
      (``X = x.view(Ci, H*W)``), then the bias, giving NCHW (oneDNN beats MKL's ``addmm`` at
      these sizes; below `onednn_matmul_min_macs` its fixed cost per call does not pay);
    - a smaller 1x1 conv, or one at batch > 1 of at most `matmul_max_macs` multiply-adds per
      image or `matmul_max_input` input values, as ``torch.matmul`` / ``addmm``;
    - a stride-1 depthwise conv with 'same' zero padding on a grid of at most
      `dense_max_tokens` positions as one batched product with a dense per-channel
      ``[H*W, H*W]`` matrix built from the kernel (capped at `dense_max_bytes` per layer);
    - any other conv through oneDNN with its weight reordered once for the input's shape
      (``torch.ops.mkldnn._convolution_pointwise``), which returns channels-last memory.

    So in eager inference a deploy-form model passes channels-last (NCHW-shaped, NHWC-strided)
    tensors between many layers: values are the same, but code outside the model should use
    ``reshape``, not ``view``, on features it takes from one.

    Derived weights live in the layer's `KernelCache`. Anything else, and always while
    tracing, scripting, compiling or exporting, on other devices or dtypes, or when autograd
    needs the weights, is the plain ``nn.Conv2d`` forward.
    """

    dense_max_tokens = 49
    dense_max_bytes = 256 << 10
    matmul_max_macs = 8_000_000
    matmul_max_input = 20480
    onednn_matmul_min_macs = 2_000_000
    onednn_rows_min_macs = 1_000_000

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or not eager_cpu_inference(x, self.weight):
            return super().forward(x)
        y = self._forward_fast(x)
        return super().forward(x) if y is None else y

    def forward_act(self, x: torch.Tensor, act: str) -> torch.Tensor:
        """``act(self(x))`` for `act` in `_POST_OPS`, fused into the oneDNN kernel where the
        fast path takes one, else applied in place on the fresh output. Only for eager
        inference on a layer without hooks; see `DeploySequential`."""
        if x.dim() == 4 and eager_cpu_inference(x, self.weight):
            y = self._forward_fast(x, act)
            return _act_(super().forward(x), act) if y is None else y
        y = super().forward(x)  # autograd or graph capture: out of place
        if act == "relu":
            return F.relu(y)
        return F.gelu(y, approximate="none" if act == "gelu" else "tanh") if act != "none" else y

    def forward_add(self, x: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
        """``self(x) + add`` (`add` the output's shape), the sum fused into the product where
        the channels-last rows path serves this call, else added in place into the fresh
        output. Only for eager inference on a layer without hooks."""
        if not (x.dim() == 4 and eager_cpu_inference(x, self.weight)):
            return super().forward(x) + add
        b, c, h, w = x.shape
        if (self._is_pointwise() and _is_channels_last(x) and _is_channels_last(add) and add.shape[1] == self.out_channels
                and c * self.out_channels * h * w > self.onednn_rows_min_macs and onednn_applies(self, x)):
            y = prepacked_linear(self, x.permute(0, 2, 3, 1).reshape(b * h * w, c), "rows",
                                 add=add.permute(0, 2, 3, 1).reshape(b * h * w, self.out_channels))
            if y is not None:
                return y.view(b, h, w, self.out_channels).permute(0, 3, 1, 2)
        y = self._forward_fast(x)
        y = super().forward(x) if y is None else y
        return y.add_(add) if y.shape == add.shape else y + add

    def _forward_fast(self, x: torch.Tensor, act: str = "none") -> torch.Tensor | None:
        """The fast paths, `act` fused or applied after, or None where the stock convolution
        is the only choice."""
        y = self._forward_kernels(x, act)
        if y is None or isinstance(y, tuple):  # (result, act still to apply)
            return None if y is None else _act_(y[0], act)
        return y

    def _forward_kernels(self, x: torch.Tensor, act: str) -> torch.Tensor | tuple | None:
        """The paths: a tensor with `act` fused, a 1-tuple whose tensor still needs `act`, or
        None."""
        b, c, h, w = x.shape
        onednn = onednn_applies(self, x)
        if self._is_pointwise():
            macs = c * self.out_channels * h * w
            weight = self.weight.view(self.out_channels, c)
            if onednn and macs > self.onednn_rows_min_macs and _is_channels_last(x):
                # Rows in, rows out: [B*H*W, Ci] @ W.T with the weight prepacked, bias fused;
                # the result is the NCHW tensor with channels-last strides, as oneDNN convs give.
                y = prepacked_linear(self, x.permute(0, 2, 3, 1).reshape(b * h * w, c), "rows", act)
                if y is not None:
                    return y.view(b, h, w, self.out_channels).permute(0, 3, 1, 2)
            elif b == 1 and onednn and macs > self.onednn_matmul_min_macs:
                # linear(A, B) = A @ B.T: the weight is the left operand, the activation (as its
                # transpose, a free view) the right one, so the product lands in NCHW.
                try:
                    y = _Switch.linear(weight, x.reshape(c, h * w).t(), None, "none", [], "")
                except RuntimeError as e:
                    _onednn_failed(self, e)
                    return None
                if self.bias is not None:
                    y.add_(self.bias.view(-1, 1))
                return (y.view(1, self.out_channels, h, w),)
            if macs <= self.matmul_max_macs or c * h * w <= self.matmul_max_input:
                if b == 1:
                    xs = x.reshape(c, h * w)
                    y = torch.addmm(self.bias.view(-1, 1), weight, xs) if self.bias is not None else weight @ xs
                else:
                    y = torch.matmul(weight, x.reshape(b, c, h * w))
                    if self.bias is not None:
                        y = y + self.bias.view(1, -1, 1)
                return (y.view(b, self.out_channels, h, w),)
        dense = self._dense_depthwise(h, w, x.dtype)
        if dense is not None:
            n = h * w
            xs = x.reshape(c, 1, n) if b == 1 else x.reshape(b, c, n).transpose(0, 1)
            bias = self.bias.view(c, 1, 1) if self.bias is not None else None
            y = torch.baddbmm(bias, xs, dense) if bias is not None else torch.bmm(xs, dense)
            return (y.view(1, c, h, w) if b == 1 else y.transpose(0, 1).reshape(b, c, h, w),)
        if onednn and self.padding_mode == "zeros" and isinstance(self.padding, tuple):
            return self._onednn_conv(x, act)
        return None

    def _onednn_conv(self, x: torch.Tensor, act: str = "none") -> torch.Tensor | None:
        """oneDNN's convolution with the weight prepacked for this input shape and layout;
        None if the call failed (the layer then stays on the stock convolution)."""
        channels_last = _is_channels_last(x)
        params = self._parameters
        weight = params["weight"]

        def build() -> tuple:
            args = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
            layout = torch.channels_last if channels_last else torch.contiguous_format
            return torch.ops.mkldnn._reorder_convolution_weight(
                weight.detach().contiguous(memory_format=layout), *args, list(x.shape)), args

        try:
            packed, args = kernel_cache(self).get_or_build(("conv", x.shape, channels_last), weight, build)
            return _Switch.conv(x, packed, params["bias"], *args, *_post_op(act))
        except RuntimeError as e:
            _onednn_failed(self, e)
            return None

    # --- channels-last inference (see `zoo.models.nhwc`) --------------------------------
    def forward_nhwc(self, t: torch.Tensor, act: str = "none", add: torch.Tensor | None = None) -> torch.Tensor:
        """``act(conv(t)) + add`` on an NHWC tensor ``t [B, H, W, Ci]``, returning a contiguous
        NHWC ``[B, Ho, Wo, Co]``; `act` is ``"none"`` or ``"relu"``, `add` (NHWC, the output's
        shape) is only allowed without one.

        A 1x1 stride-1 ungrouped conv is a product of the ``[B*H*W, Ci]`` rows (`forward_rows`);
        other convs go through oneDNN with the activation fused; both read and write NHWC, so
        a chain of layers never changes layout. Outside float32 eager CPU inference with
        oneDNN, or with hooks on this layer, it is this module's own forward, NCHW in and out,
        with the activation and sum applied after it."""
        if act not in ("none", "relu") or (add is not None and act != "none"):
            raise ValueError(f"forward_nhwc takes act 'none' or 'relu', and add only without one (got {act!r})")
        if not self._nhwc_applies(t):
            return nchw_fallback(self, t, act, add)
        b, h, w, c = t.shape
        if self._is_pointwise():
            m = b * h * w
            y = self.forward_rows(t.reshape(m, c), act, None if add is None else add.reshape(m, self.out_channels))
            return y.view(b, h, w, self.out_channels)
        if self.padding_mode != "zeros" or not isinstance(self.padding, tuple):
            return nchw_fallback(self, t, act, add)
        y = self._onednn_conv(t.permute(0, 3, 1, 2), act)
        if y is None:
            return nchw_fallback(self, t, act, add)
        y = y.permute(0, 2, 3, 1)
        return y if add is None else y.add_(add)

    def forward_rows(self, x: torch.Tensor, act: str = "none", add: torch.Tensor | None = None) -> torch.Tensor:
        """A 1x1 stride-1 ungrouped conv on token rows: ``act(x @ W.T + bias) + add`` for
        ``x [M, Ci]`` and ``add [M, Co]``, as `forward_nhwc`; call only where `_nhwc_applies`.

        Above `onednn_rows_min_macs` multiply-adds, one oneDNN product with the weight
        prepacked for M rows and the activation or the sum fused into it; below, MKL's
        ``addmm`` (oneDNN's fixed cost per call is larger than such a product)."""
        params = self._parameters
        weight, bias = params["weight"], params["bias"]
        if x.shape[0] * weight.numel() > self.onednn_rows_min_macs and onednn_applies(self, x):
            y = prepacked_linear(self, x, "rows", act, add)
            if y is not None:
                return y
        weight = weight.view(self.out_channels, -1).t()
        y = torch.addmm(bias, x, weight) if bias is not None else x @ weight
        if act == "relu":
            y.relu_()
        return y if add is None else y.add_(add)

    def _is_pointwise(self) -> bool:
        """A 1x1, stride-1, unpadded, ungrouped conv: a product of token rows."""
        return self.kernel_size == (1, 1) and self.groups == 1 and self.stride == (1, 1) and self.padding == (0, 0)

    def _nhwc_applies(self, t: torch.Tensor) -> bool:
        """The channels-last kernels may serve this call: a float32 CPU input and weight,
        oneDNN, no hooks on this layer, and no autograd through the weight."""
        w = self._parameters["weight"]
        return (
            t.is_cpu
            and onednn_applies(self, t)
            and not (self._forward_hooks or self._forward_pre_hooks)
            and not (w.requires_grad and torch.is_grad_enabled())
        )

    def _dense_depthwise(self, h: int, w: int, dtype: torch.dtype) -> torch.Tensor | None:
        """``[C, H*W, H*W]``: this stride-1 'same' depthwise conv on an ``H x W`` grid as one
        matrix per channel (row q: the response to a unit impulse at q), or None where it has
        no dense form within `dense_max_tokens` and `dense_max_bytes` (part of the cache key,
        so changing them takes effect)."""
        weight = self._parameters["weight"]
        key = ("dense", h, w, dtype, self.dense_max_tokens, self.dense_max_bytes)
        return kernel_cache(self).get_or_build(key, weight, lambda: self._build_dense(weight, h, w, dtype))

    def _build_dense(self, weight: torch.Tensor, h: int, w: int, dtype: torch.dtype) -> torch.Tensor | None:
        k = self.kernel_size
        c = self.in_channels
        n = h * w
        if not (
            self.groups == c == self.out_channels
            and self.stride == (1, 1)
            and self.dilation == (1, 1)
            and self.padding == (k[0] // 2, k[1] // 2)
            and self.padding_mode == "zeros"
            and n <= self.dense_max_tokens
            and c * n * n * weight.element_size() <= self.dense_max_bytes
        ):
            return None
        impulses = torch.eye(n, dtype=dtype).view(n, 1, h, w).expand(n, c, h, w)
        resp = F.conv2d(impulses, weight.to(dtype), None, 1, self.padding, 1, c)
        return resp.reshape(n, c, n).transpose(0, 1).contiguous()  # [C, q, p]


def nchw_fallback(module: nn.Module, t: torch.Tensor, act: str = "none", add: torch.Tensor | None = None) -> torch.Tensor:
    """``act(module(x)) + add`` for an NHWC tensor ``t [B, H, W, C]`` through `module`'s own
    forward (its hooks fire): ``x`` is the NCHW view of `t`; the result is contiguous NHWC."""
    y = module(t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    if act == "relu":
        y = F.relu(y)
    if add is not None:
        y = y + add
    return y.contiguous()


class DeployLinear(nn.Linear):
    """An `nn.Linear` (same parameters, same function) whose eager float32 CPU inference runs
    oneDNN's matrix product with the weight prepacked once per number of input rows. Otherwise,
    and always while tracing or exporting or when autograd needs the weight, the plain forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0 or not (eager_cpu_inference(x, self.weight) and onednn_applies(self, x)):
            return super().forward(x)
        y = prepacked_linear(self, x, "linear")
        return super().forward(x) if y is None else y


def hooked(*modules: nn.Module) -> bool:
    """True when any of `modules` has a forward hook or pre-hook (a fused path must not skip
    its call)."""
    for m in modules:
        if m._forward_hooks or m._forward_pre_hooks:
            return True
    return False


def act_name(m: nn.Module) -> str | None:
    """The `_POST_OPS` name of an activation module oneDNN can fuse, else None."""
    if type(m) in (nn.GELU, DeployGELU):
        return "gelu" if m.approximate == "none" else "gelu_tanh"
    if type(m) is nn.ReLU:
        return "relu"
    return None


class DeploySequential(nn.Sequential):
    """An `nn.Sequential` (same children, same keys, same function) that in eager float32 CPU
    inference runs each `DeployConv2d` directly followed by a GELU or ReLU as one call with
    the activation fused into the oneDNN kernel (`DeployConv2d.forward_act`): the activation
    is then not a separate pass over the conv's output. oneDNN's GELU post-op evaluates the
    same erf (or tanh) form; a pair with hooks on either module runs unfused, so hooks fire.
    While tracing, scripting, compiling or exporting it is the plain `nn.Sequential`."""

    def forward(self, x):
        if graph_capture() or not isinstance(x, torch.Tensor) or not x.is_cpu or not cpu_kernels_enabled():
            return super().forward(x)
        mods = list(self._modules.values())
        i = 0
        while i < len(mods):
            m = mods[i]
            act = act_name(mods[i + 1]) if i + 1 < len(mods) else None
            if (act is not None and isinstance(m, DeployConv2d) and eager_cpu_inference(x, m.weight)
                    and not hooked(m, mods[i + 1])):
                x = m.forward_act(x, act)
                i += 2
            else:
                x = m(x)
                i += 1
        return x


def use_deploy_kernels(module: nn.Module) -> nn.Module:
    """Turn every plain `nn.Conv2d` in `module` into a `DeployConv2d`, every `nn.Linear` into a
    `DeployLinear`, every `nn.GELU` into a `DeployGELU`, and every plain `nn.Sequential` that
    holds a conv directly followed by a GELU or ReLU into a `DeploySequential`, in place (same
    parameters, same keys, same function). Only for modules whose GELUs act on fresh
    intermediates (true of every family here)."""
    for m in list(module.modules()):
        if type(m) is nn.Conv2d:
            m.__class__ = DeployConv2d
        elif type(m) is nn.Linear:
            m.__class__ = DeployLinear
        elif type(m) is nn.GELU:
            m.__class__ = DeployGELU
    for m in module.modules():
        kids = list(m.children())
        if type(m) is nn.Sequential and any(
                isinstance(a, DeployConv2d) and act_name(b) for a, b in zip(kids, kids[1:])):
            m.__class__ = DeploySequential
    return module
