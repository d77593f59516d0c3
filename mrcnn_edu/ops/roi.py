"""PLACEHOLDER (being replaced by the RoI-ops work): delegates to torchvision."""
import torchvision


def roi_align(input, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False,
              backend="auto"):
    return torchvision.ops.roi_align(input, rois, output_size, spatial_scale, sampling_ratio, aligned)


def roi_pool(input, rois, output_size, spatial_scale=1.0, backend="auto"):
    return torchvision.ops.roi_pool(input, rois, output_size, spatial_scale)
