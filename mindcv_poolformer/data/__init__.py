"""Datasets beyond ImageFolder classification (ADE20K segmentation)."""
