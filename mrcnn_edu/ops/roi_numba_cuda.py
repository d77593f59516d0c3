"""RoIAlign and RoIPool as ``numba.cuda`` kernels, forward and backward (the ``"cuda"`` backend).

Mask R-CNN (He et al. 2017) section 3 and Fast R-CNN section 2.1; notebook
``03_kernels_numba_cuda.ipynb`` compares these GPU kernels with the CPU ones of
``roi_numba_cpu.py``. The arithmetic is that of ``roi_reference.py`` (torchvision's).

GPU layout: **one thread per output element** ``(k, c, ph, pw)`` of the ``[K, C, oh, ow]`` output,
in NCHW like torchvision's CUDA kernel. The forward thread reads its bin's samples and writes one
value; the backward thread scatters its gradient into the four pixels around every sample with
``cuda.atomic.add``, because threads of different RoIs may hit the same pixel.

On a GPU the kernels read torch's CUDA tensors zero-copy (``cuda.as_cuda_array``, i.e. the
``__cuda_array_interface__``) and run on torch's current stream, so they order correctly with
the surrounding torch work. Without a GPU, with ``NUMBA_ENABLE_CUDASIM=1``, the same kernels run
on Numba's CUDA simulator (CPU tensors -> numpy -> simulated device arrays): very slow, but it is
how the tests check these kernels on tiny inputs.

Index names: ``k`` RoI, ``n`` image, ``c`` channel, ``ph, pw`` output bin, ``iy, ix`` sample.
Kernels are built per float type ``T`` (float32 / float64) by :func:`_kernels`, so that every
step runs in ``T`` like the C++ template ``roi_align_forward_kernel<T>``.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from numba import cuda

from ._common import cuda_simulator_enabled
from ._numba_cuda_common import device_view, gpu_launch

THREADS_PER_BLOCK = 256  # on the simulator every thread is a Python thread: use 32 there
FLT_MAX = 3.4028234663852886e38


@functools.cache
def _kernels(T):
    """Compile (lazily, once per dtype) the four kernels for float type ``T``."""

    @cuda.jit(device=True)
    def bilinear_axis(coord, size):
        """(valid, low, high, w_low, w_high): see ``roi_numba_cpu._bilinear_axis``."""
        if coord < -1.0 or coord > size:
            return False, 0, 0, T(0.0), T(0.0)
        if coord <= 0:
            coord = T(0.0)
        low = int(coord)
        if low >= size - 1:
            low = size - 1
            high = size - 1
            coord = T(low)
        else:
            high = low + 1
        frac = coord - T(low)  # distance past ``low``: the weight of ``high``
        return True, low, high, T(1.0 - frac), frac

    @cuda.jit(device=True)
    def geometry(rois, k, spatial_scale, oh, ow, sampling_ratio, aligned):
        """(n, start_h, start_w, bin_h, bin_w, grid_h, grid_w, count) of RoI ``k``."""
        offset = T(0.5) if aligned else T(0.0)
        n = int(rois[k, 0])
        start_w = rois[k, 1] * spatial_scale - offset
        start_h = rois[k, 2] * spatial_scale - offset
        roi_w = (rois[k, 3] * spatial_scale - offset) - start_w
        roi_h = (rois[k, 4] * spatial_scale - offset) - start_h
        if not aligned:
            roi_w = max(roi_w, T(1.0))
            roi_h = max(roi_h, T(1.0))
        bin_h = roi_h / T(oh)
        bin_w = roi_w / T(ow)
        if sampling_ratio > 0:
            grid_h = sampling_ratio
            grid_w = sampling_ratio
        else:
            grid_h = int(math.ceil(roi_h / T(oh)))  # noqa: RUF046
            grid_w = int(math.ceil(roi_w / T(ow)))  # noqa: RUF046
        count = T(max(grid_h * grid_w, 1))
        return n, start_h, start_w, bin_h, bin_w, grid_h, grid_w, count

    @cuda.jit
    def align_forward(feat, rois, spatial_scale, oh, ow, sampling_ratio, aligned, out):
        """feat [N, C, H, W], out [K, C, oh, ow]: one thread per output element."""
        H = feat.shape[2]
        W = feat.shape[3]
        C = feat.shape[1]
        index = cuda.grid(1)
        if index >= out.size:
            return
        pw = index % ow  # index = ((k * C + c) * oh + ph) * ow + pw
        ph = (index // ow) % oh
        c = (index // (ow * oh)) % C
        k = index // (ow * oh * C)
        n, start_h, start_w, bin_h, bin_w, grid_h, grid_w, count = geometry(
            rois, k, spatial_scale, oh, ow, sampling_ratio, aligned
        )
        acc = T(0.0)
        for iy in range(grid_h):
            y = start_h + T(ph) * bin_h + T(iy + 0.5) * bin_h / T(grid_h)
            vy, y_lo, y_hi, hy, ly = bilinear_axis(y, H)
            if not vy:
                continue
            for ix in range(grid_w):
                x = start_w + T(pw) * bin_w + T(ix + 0.5) * bin_w / T(grid_w)
                vx, x_lo, x_hi, hx, lx = bilinear_axis(x, W)
                if not vx:
                    continue
                acc += (
                    hy * hx * feat[n, c, y_lo, x_lo]
                    + hy * lx * feat[n, c, y_lo, x_hi]
                    + ly * hx * feat[n, c, y_hi, x_lo]
                    + ly * lx * feat[n, c, y_hi, x_hi]
                )
        out[k, c, ph, pw] = acc / count

    @cuda.jit
    def align_backward(grad_out, rois, spatial_scale, oh, ow, sampling_ratio, aligned, grad_in):
        """grad_out [K, C, oh, ow] -> atomically added into grad_in [N, C, H, W]."""
        H = grad_in.shape[2]
        W = grad_in.shape[3]
        C = grad_in.shape[1]
        index = cuda.grid(1)
        if index >= grad_out.size:
            return
        pw = index % ow
        ph = (index // ow) % oh
        c = (index // (ow * oh)) % C
        k = index // (ow * oh * C)
        n, start_h, start_w, bin_h, bin_w, grid_h, grid_w, count = geometry(
            rois, k, spatial_scale, oh, ow, sampling_ratio, aligned
        )
        g = grad_out[k, c, ph, pw]
        for iy in range(grid_h):
            y = start_h + T(ph) * bin_h + T(iy + 0.5) * bin_h / T(grid_h)
            vy, y_lo, y_hi, hy, ly = bilinear_axis(y, H)
            if not vy:
                continue
            for ix in range(grid_w):
                x = start_w + T(pw) * bin_w + T(ix + 0.5) * bin_w / T(grid_w)
                vx, x_lo, x_hi, hx, lx = bilinear_axis(x, W)
                if not vx:
                    continue
                cuda.atomic.add(grad_in, (n, c, y_lo, x_lo), g * (hy * hx) / count)
                cuda.atomic.add(grad_in, (n, c, y_lo, x_hi), g * (hy * lx) / count)
                cuda.atomic.add(grad_in, (n, c, y_hi, x_lo), g * (ly * hx) / count)
                cuda.atomic.add(grad_in, (n, c, y_hi, x_hi), g * (ly * lx) / count)

    @cuda.jit(device=True)
    def round_half_away(x):
        a = abs(x)
        r = math.floor(a)
        if a - r >= 0.5:
            r += 1
        return -r if x < 0 else r

    @cuda.jit
    def pool_forward(feat, rois, spatial_scale, oh, ow, out, argmax):
        """feat [N, C, H, W] -> out [K, C, oh, ow], argmax (h * W + w, or -1) of the same shape."""
        H = feat.shape[2]
        W = feat.shape[3]
        C = feat.shape[1]
        index = cuda.grid(1)
        if index >= out.size:
            return
        pw = index % ow
        ph = (index // ow) % oh
        c = (index // (ow * oh)) % C
        k = index // (ow * oh * C)
        n = int(rois[k, 0])
        start_w = int(round_half_away(rois[k, 1] * spatial_scale))
        start_h = int(round_half_away(rois[k, 2] * spatial_scale))
        roi_w = max(int(round_half_away(rois[k, 3] * spatial_scale)) - start_w + 1, 1)
        roi_h = max(int(round_half_away(rois[k, 4] * spatial_scale)) - start_h + 1, 1)
        bin_h = T(roi_h) / T(oh)
        bin_w = T(roi_w) / T(ow)
        h0 = min(max(int(math.floor(T(ph) * bin_h)) + start_h, 0), H)  # noqa: RUF046
        h1 = min(max(int(math.ceil(T(ph + 1) * bin_h)) + start_h, 0), H)  # noqa: RUF046
        w0 = min(max(int(math.floor(T(pw) * bin_w)) + start_w, 0), W)  # noqa: RUF046
        w1 = min(max(int(math.ceil(T(pw + 1) * bin_w)) + start_w, 0), W)  # noqa: RUF046
        best = T(0.0) if (h1 <= h0 or w1 <= w0) else T(-FLT_MAX)
        best_index = -1
        for h in range(h0, h1):
            for w in range(w0, w1):
                v = feat[n, c, h, w]
                if v > best:
                    best = v
                    best_index = h * W + w
        out[k, c, ph, pw] = best
        argmax[k, c, ph, pw] = best_index

    @cuda.jit
    def pool_backward(grad_out, rois, argmax, grad_in):
        """grad_out [K, C, oh, ow] -> atomically added at each bin's argmax in grad_in."""
        W = grad_in.shape[3]
        C = grad_in.shape[1]
        oh = grad_out.shape[2]
        ow = grad_out.shape[3]
        index = cuda.grid(1)
        if index >= grad_out.size:
            return
        pw = index % ow
        ph = (index // ow) % oh
        c = (index // (ow * oh)) % C
        k = index // (ow * oh * C)
        a = argmax[k, c, ph, pw]
        if a >= 0:
            cuda.atomic.add(grad_in, (int(rois[k, 0]), c, a // W, a % W), grad_out[k, c, ph, pw])

    return align_forward, align_backward, pool_forward, pool_backward


# ---------------------------------------------------------------------------------------------
# Moving tensors in and out, and launching
# ---------------------------------------------------------------------------------------------
def _np_type(dtype: torch.dtype):
    if dtype == torch.float32:
        return np.float32
    if dtype == torch.float64:
        return np.float64
    raise TypeError(f"roi kernels (cuda): unsupported dtype {dtype}; use float32 or float64")


class _Launch:
    """Context for one operator call: views of torch tensors as numba device arrays, a launcher.

    On a GPU: zero-copy views (``cuda.as_cuda_array``), the tensors' device made current and
    torch's current stream on it (see ``_numba_cuda_common.gpu_launch``). On the simulator: numpy
    copies on simulated device arrays, copied back into the output tensors on a clean exit.
    """

    def __init__(self, device: torch.device, op: str):
        self.simulated = device.type != "cuda"
        if self.simulated and not cuda_simulator_enabled():
            raise RuntimeError(f"{op} (backend='cuda'): CPU tensors need NUMBA_ENABLE_CUDASIM=1")
        self.device, self.op = device, op
        self.threads = 32 if self.simulated else THREADS_PER_BLOCK
        self.stream = 0
        self._gpu = None
        self._outputs = []

    def __enter__(self):
        if not self.simulated:
            self._gpu = gpu_launch(self.device, self.op)
            self.stream = self._gpu.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._gpu is not None:
            return self._gpu.__exit__(exc_type, exc, tb)
        if exc_type is None:  # simulator: copy every output array back into its torch tensor
            for t, arr in self._outputs:
                t.copy_(torch.from_numpy(arr.copy_to_host()))
        return False

    def view(self, t: torch.Tensor, output: bool = False):
        """Device array of ``t``; an ``output`` must be a contiguous tensor made by the caller."""
        t = t.detach().contiguous()
        if self.simulated:
            arr = cuda.to_device(t.numpy())
            if output:
                self._outputs.append((t, arr))
            return arr
        return device_view(t)

    def run(self, kernel, num_threads: int, *args) -> None:
        if num_threads == 0:  # K = 0 (or C = 0): a grid of 0 blocks is an error on a GPU
            return
        blocks = (num_threads + self.threads - 1) // self.threads
        kernel[blocks, self.threads, self.stream](*args)


def roi_align_forward(input, rois, output_size, spatial_scale, sampling_ratio, aligned):
    """RoIAlign forward: input ``[N, C, H, W]``, rois ``[K, 5]`` -> ``[K, C, oh, ow]``."""
    T = _np_type(input.dtype)
    C = input.shape[1]
    oh, ow = output_size
    out = torch.zeros((rois.shape[0], C, oh, ow), dtype=input.dtype, device=input.device)
    if out.numel() == 0:  # K = 0: nothing to launch (and no views of empty tensors)
        return out
    with _Launch(input.device, "roi_align") as launch:
        launch.run(
            _kernels(T)[0],
            out.numel(),
            launch.view(input),
            launch.view(rois),
            T(spatial_scale),
            oh,
            ow,
            int(sampling_ratio),
            bool(aligned),
            launch.view(out, output=True),
        )
    return out


def roi_align_backward(grad_output, rois, input_shape, spatial_scale, sampling_ratio, aligned):
    """RoIAlign backward: grad_output ``[K, C, oh, ow]`` -> grad_input ``[N, C, H, W]``."""
    T = _np_type(grad_output.dtype)
    oh, ow = grad_output.shape[2:]
    grad_input = torch.zeros(input_shape, dtype=grad_output.dtype, device=grad_output.device)
    if grad_output.numel() == 0:
        return grad_input
    with _Launch(grad_output.device, "roi_align backward") as launch:
        launch.run(
            _kernels(T)[1],
            grad_output.numel(),
            launch.view(grad_output),
            launch.view(rois),
            T(spatial_scale),
            oh,
            ow,
            int(sampling_ratio),
            bool(aligned),
            launch.view(grad_input, output=True),
        )
    return grad_input


def roi_pool_forward(input, rois, output_size, spatial_scale):
    """RoIPool forward -> (output ``[K, C, oh, ow]``, argmax ``[K, C, oh, ow]`` int32)."""
    T = _np_type(input.dtype)
    C = input.shape[1]
    oh, ow = output_size
    K = rois.shape[0]
    out = torch.zeros((K, C, oh, ow), dtype=input.dtype, device=input.device)
    argmax = torch.full((K, C, oh, ow), -1, dtype=torch.int32, device=input.device)
    if out.numel() == 0:
        return out, argmax
    with _Launch(input.device, "roi_pool") as launch:
        launch.run(
            _kernels(T)[2],
            out.numel(),
            launch.view(input),
            launch.view(rois),
            T(spatial_scale),
            oh,
            ow,
            launch.view(out, output=True),
            launch.view(argmax, output=True),
        )
    return out, argmax


def roi_pool_backward(grad_output, rois, argmax, input_shape):
    """RoIPool backward: grad_output ``[K, C, oh, ow]`` -> grad_input ``[N, C, H, W]``."""
    T = _np_type(grad_output.dtype)
    grad_input = torch.zeros(input_shape, dtype=grad_output.dtype, device=grad_output.device)
    if grad_output.numel() == 0:
        return grad_input
    with _Launch(grad_output.device, "roi_pool backward") as launch:
        launch.run(
            _kernels(T)[3],
            grad_output.numel(),
            launch.view(grad_output),
            launch.view(rois),
            launch.view(argmax),
            launch.view(grad_input, output=True),
        )
    return grad_input
