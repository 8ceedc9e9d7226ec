"""The model zoo: every registered model, built from the shared blocks."""

# Importing the model modules runs their @register decorators (see registry.py).
from mtrank.training.models import classic, mfh, ple, stem  # noqa: F401
