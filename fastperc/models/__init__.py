"""The networks: image transformation networks and the VGG-16 loss network."""
from fastperc.models.superres import SuperResolutionNet
from fastperc.models.transformer import TransformerNet
from fastperc.models.vgg import VGG16Features

__all__ = ["SuperResolutionNet", "TransformerNet", "VGG16Features"]
