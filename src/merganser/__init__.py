"""merganser: merge the weights of fine-tuned neural networks."""

__version__ = "0.1.0"

from merganser.api import MergeOptions, merge, merge_tensors
from merganser.errors import MerganserError

__all__ = ["MerganserError", "MergeOptions", "__version__", "merge", "merge_tensors"]
