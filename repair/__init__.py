"""Repair methods on plain ``torch.nn.Module``s: AtPatch and rank-one rectification, plus the bundle format."""
from repair.torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()
