"""Small, self-contained models and data for the examples, tests and benchmarks.

The data is scikit-learn's digits (1,797 8x8 images that ship inside scikit-learn), so nothing is downloaded.
"""

from .data import DigitsDataModule, load_digits_tensors
from .models import CNNClassifier, MLPClassifier

__all__ = ["CNNClassifier", "DigitsDataModule", "MLPClassifier", "load_digits_tensors"]
