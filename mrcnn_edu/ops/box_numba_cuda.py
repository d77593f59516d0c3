"""numba.cuda kernels for box IoU and NMS (Faster R-CNN section 3.1.2, Mask R-CNN section 3.1).

Notebook ``03_kernels_numba_cuda.ipynb`` explains how these kernels are written and checked;
notebook ``04_anchors_and_rpn.ipynb`` explains NMS itself (see ``box_reference.py``).

* ``box_iou``: one thread per output ``[i, j]`` (``x`` -> column ``j`` so neighbouring threads
  write neighbouring memory).
* ``nms``: the *bitmask* algorithm of torchvision's ``nms_kernel.cu``. Boxes are sorted by
  score (best first) and cut into blocks of 64. Block ``(col_block, row_block)`` of the
  grid compares its 64 "row" boxes with 64 "column" boxes held in shared memory; thread ``t``
  writes one 64-bit word, bit ``k`` set when row box ``t`` overlaps column box ``k`` by
  ``IoU > threshold``. Only blocks with ``col_block >= row_block`` work (a box can only
  suppress worse boxes), and on the diagonal only bits ``k > t``. Then a one-block kernel
  walks the boxes in score order and ORs the mask row of every kept box into a ``removed``
  bit set: the greedy part, now a few bit operations per box.

Tensors are shared zero-copy: CUDA tensors through ``__cuda_array_interface__``
(``numba.cuda.as_cuda_array``) with the kernels launched on torch's current stream; without a
GPU (``NUMBA_ENABLE_CUDASIM=1``) CPU tensors go through numpy to Numba's CUDA simulator, which
runs every thread as a Python thread (slow: use tiny inputs).

Pitfall: the masks are unsigned 64-bit words. Every operand of ``|``, ``<<`` and ``&`` is kept
``np.uint64``: mixing ``uint64`` with a signed ``int64`` promotes to ``float64`` in Numba's
(numpy's) typing rules, and the bit set would silently become a float.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from numba import cuda

from ._numba_cuda_common import device_view as _device_view
from ._numba_cuda_common import gpu_launch

BLOCK = 64  # boxes per NMS block = bits per mask word
IOU_TILE = 16  # box_iou thread block: IOU_TILE x IOU_TILE outputs
# Threads of the one-block greedy pass. On the simulator every thread is a Python thread, so
# use 2 there: faster, and each thread then strides over several mask words, as on a GPU with
# more than 64 * 64 boxes.
REDUCE_THREADS_GPU = 64
REDUCE_THREADS_SIM = 2

_NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


@functools.cache
def _kernels(np_dtype):
    """Compile (lazily, once per dtype) the IoU and NMS-mask kernels for float ``np_dtype``."""
    scalar = np_dtype  # the float type, usable inside the kernels: scalar(0)

    @cuda.jit
    def box_iou_kernel(boxes1, boxes2, out):
        j = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x  # column: box of boxes2
        i = cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y  # row: box of boxes1
        if i >= boxes1.shape[0] or j >= boxes2.shape[0]:
            return
        zero = scalar(0)
        ax1, ay1, ax2, ay2 = boxes1[i, 0], boxes1[i, 1], boxes1[i, 2], boxes1[i, 3]
        bx1, by1, bx2, by2 = boxes2[j, 0], boxes2[j, 1], boxes2[j, 2], boxes2[j, 3]
        area_a = (ax2 - ax1) * (ay2 - ay1)
        area_b = (bx2 - bx1) * (by2 - by1)
        w = max(min(ax2, bx2) - max(ax1, bx1), zero)
        h = max(min(ay2, by2) - max(ay1, by1), zero)
        inter = w * h
        union = area_a + area_b - inter  # (area_a + area_b) - inter, as torchvision
        # union == 0 only for two zero-area boxes, where torch gives 0 / 0 = nan; the branch
        # keeps the simulator (numpy scalars) from warning about the division.
        if union == zero:
            out[i, j] = math.nan
        else:
            out[i, j] = inter / union

    @cuda.jit
    def nms_mask_kernel(boxes, n, col_blocks, iou_threshold, mask):
        row_block = cuda.blockIdx.y  # which 64 boxes this block's threads stand for
        col_block = cuda.blockIdx.x  # which 64 boxes they are compared with
        if row_block > col_block:  # a box only suppresses boxes of lower score
            return
        t = cuda.threadIdx.x
        row_size = min(n - row_block * BLOCK, BLOCK)
        col_size = min(n - col_block * BLOCK, BLOCK)

        # Column boxes (x1, y1, x2, y2, area) into shared memory, one per thread.
        col_boxes = cuda.shared.array((BLOCK, 5), np_dtype)
        if t < col_size:
            c = col_block * BLOCK + t
            col_boxes[t, 0] = boxes[c, 0]
            col_boxes[t, 1] = boxes[c, 1]
            col_boxes[t, 2] = boxes[c, 2]
            col_boxes[t, 3] = boxes[c, 3]
            col_boxes[t, 4] = (boxes[c, 2] - boxes[c, 0]) * (boxes[c, 3] - boxes[c, 1])
        cuda.syncthreads()

        if t < row_size:
            i = row_block * BLOCK + t  # sorted position of this thread's box
            zero = scalar(0)
            ix1, iy1, ix2, iy2 = boxes[i, 0], boxes[i, 1], boxes[i, 2], boxes[i, 3]
            iarea = (ix2 - ix1) * (iy2 - iy1)
            bits = np.uint64(0)
            start = t + 1 if row_block == col_block else 0  # diagonal: only worse boxes
            for k in range(start, col_size):
                w = max(min(ix2, col_boxes[k, 2]) - max(ix1, col_boxes[k, 0]), zero)
                h = max(min(iy2, col_boxes[k, 3]) - max(iy1, col_boxes[k, 1]), zero)
                inter = w * h
                union = iarea + col_boxes[k, 4] - inter
                # IoU in the boxes' dtype, compared in float64 with the threshold (explicit
                # cast: the simulator follows numpy, where float32 > python float compares in
                # float32). 0/0 (nan) never suppresses, so union == 0 is skipped.
                if union != zero and np.float64(inter / union) > iou_threshold:
                    bits |= np.uint64(1) << np.uint64(k)
            mask[i * col_blocks + col_block] = bits

    return box_iou_kernel, nms_mask_kernel


@cuda.jit
def _nms_reduce_kernel(mask, n, col_blocks, removed, keep_flags):
    """Greedy pass over the mask in one thread block; ``removed`` must start zeroed.

    All threads walk ``i = 0..n-1`` together and take the same branch (they read the same
    ``removed`` word). For a kept box, thread 0 marks it and the threads OR its mask row into
    ``removed`` in parallel. Row ``i`` only sets bits of boxes after ``i``, so a thread that
    reads a word while another updates it still sees the right bit ``i``.
    """
    t = cuda.threadIdx.x
    for i in range(n):
        word = i // BLOCK
        bit = np.uint64(1) << np.uint64(i - word * BLOCK)
        if (removed[word] & bit) == np.uint64(0):
            if t == 0:
                keep_flags[i] = 1
            for j in range(word + t, col_blocks, cuda.blockDim.x):
                removed[j] |= mask[i * col_blocks + j]
            cuda.syncthreads()  # uniform: every thread took this branch


def _on_gpu(x: torch.Tensor) -> bool:
    return x.device.type == "cuda"


def box_iou_cuda(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU ``[N, M]`` of float32/float64 ``boxes1`` ``[N, 4]``, ``boxes2`` ``[M, 4]``, validated."""
    boxes1, boxes2 = boxes1.detach().contiguous(), boxes2.detach().contiguous()
    n, m = boxes1.shape[0], boxes2.shape[0]
    out = torch.empty((n, m), dtype=boxes1.dtype, device=boxes1.device)
    if out.numel() == 0:
        return out
    box_iou_kernel, _ = _kernels(_NP_DTYPES[boxes1.dtype])
    grid = ((m + IOU_TILE - 1) // IOU_TILE, (n + IOU_TILE - 1) // IOU_TILE)
    block = (IOU_TILE, IOU_TILE)
    if _on_gpu(boxes1):
        with gpu_launch(boxes1.device, "box_iou") as stream:  # the boxes' GPU, torch's stream
            box_iou_kernel[grid, block, stream](
                _device_view(boxes1), _device_view(boxes2), _device_view(out)
            )
    else:  # CUDA simulator: numpy views share memory with the tensors
        box_iou_kernel[grid, block](boxes1.numpy(), boxes2.numpy(), out.numpy())
    return out


def nms_cuda(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Bitmask NMS: ``boxes`` ``[N, 4]``, ``scores`` ``[N]`` -> kept indices int64 ``[K]``."""
    n = boxes.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores.detach(), descending=True, stable=True).indices  # [N]
    sorted_boxes = boxes.detach()[order].contiguous()  # [N, 4], best first
    col_blocks = (n + BLOCK - 1) // BLOCK
    _, nms_mask_kernel = _kernels(_NP_DTYPES[boxes.dtype])
    # mask: [N * col_blocks] 64-bit words, row i = boxes suppressed by sorted box i.
    mask = torch.empty(n * col_blocks, dtype=torch.int64, device=boxes.device)
    removed = torch.zeros(col_blocks, dtype=torch.int64, device=boxes.device)
    keep_flags = torch.zeros(n, dtype=torch.uint8, device=boxes.device)
    grid = (col_blocks, col_blocks)  # (col_block, row_block)
    thr = float(iou_threshold)
    if _on_gpu(boxes):
        with gpu_launch(boxes.device, "nms") as stream:  # the boxes' GPU, torch's stream
            mask_d = _device_view(mask).view(np.uint64)  # same memory, seen as unsigned words
            removed_d = _device_view(removed).view(np.uint64)
            nms_mask_kernel[grid, BLOCK, stream](
                _device_view(sorted_boxes), n, col_blocks, thr, mask_d
            )
            _nms_reduce_kernel[1, REDUCE_THREADS_GPU, stream](
                mask_d, n, col_blocks, removed_d, _device_view(keep_flags)
            )
    else:  # CUDA simulator: numpy views share memory with the tensors
        mask_h = mask.numpy().view(np.uint64)
        removed_h = removed.numpy().view(np.uint64)
        nms_mask_kernel[grid, BLOCK](sorted_boxes.numpy(), n, col_blocks, thr, mask_h)
        _nms_reduce_kernel[1, REDUCE_THREADS_SIM](
            mask_h, n, col_blocks, removed_h, keep_flags.numpy()
        )
    kept_positions = keep_flags.nonzero().squeeze(1)  # ascending = decreasing score
    return order[kept_positions]
