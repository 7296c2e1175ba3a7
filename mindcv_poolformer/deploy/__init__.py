"""Deployment: loading trained artifacts (``artifacts``), MINDIR/ONNX/AIR export, prediction."""
