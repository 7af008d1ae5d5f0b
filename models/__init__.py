"""Models: the gene, the ResNet50 and MobileNetV2 families, the registry and the cost model."""
from . import mobilenetv2, resnet  # noqa: F401  (registers the families and their --arch names)
from .gene import SCALES, Gene, GeneLayout
from .pruningnet import ArchSpec, PrunedNet, PruningNet, recalibrate_bn
from .registry import (MAX_INPUT_SIZE, MAX_WIDTH_MULT, MIN_INPUT_SIZE, create_model, get_family, is_pruningnet,
                       list_families, list_models, small_input_for)

__all__ = ["SCALES", "Gene", "GeneLayout", "ArchSpec", "PrunedNet", "PruningNet", "recalibrate_bn", "create_model",
           "get_family", "is_pruningnet", "list_families", "list_models", "small_input_for", "MAX_INPUT_SIZE", "MAX_WIDTH_MULT",
           "MIN_INPUT_SIZE"]
