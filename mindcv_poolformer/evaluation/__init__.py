"""Metrics and evaluation loops (segmentation mIoU as mmseg's IoUMetric)."""
