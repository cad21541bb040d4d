"""stgc: MoE-LLaVA training with STGC and peer routing methods.

Importing the package registers the model with transformers' Auto classes (``stgc.modeling``), so that
``AutoModelForImageTextToText.from_pretrained(path)`` loads a checkpoint folder.
"""

from stgc import modeling as _modeling  # noqa: F401  (registers MoELlavaConfig / the model)
