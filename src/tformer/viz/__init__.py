"""What a person sees: attention heatmaps and training curves (matplotlib, no screen needed)."""

from tformer.viz.plots import attention_heatmap, loss_curve

__all__ = ["attention_heatmap", "loss_curve"]
