"""composer: LoRA-Composer (training-free multi-concept composition) on a from-scratch SD1.5 stack."""
from .loading import load
from .pipeline import Pipeline

__all__ = ["load", "Pipeline"]
__version__ = "0.1.0"
