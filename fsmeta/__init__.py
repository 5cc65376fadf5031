"""fsmeta: few-shot microscopy cell segmentation by meta-learning, run on Ray, tracked in MLflow."""

__version__ = "0.1.0"
