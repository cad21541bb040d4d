"""What a checkpoint folder says when it is loaded without ``import stgc``.

transformers resolves ``model_type: stgc_moe_llava`` only after ``import stgc`` has registered the classes;
without it, ``AutoModelForImageTextToText.from_pretrained(path)`` would fail with "does not recognize this
architecture". Every checkpoint's ``config.json`` therefore carries an ``auto_map`` entry naming a small
module saved next to it (``stgc_autoload.py``), transformers' own mechanism for model code that is not
built in:

- with ``import stgc`` the registered classes win (transformers prefers local code; nothing changes);
- without it, transformers stops with its usual request for ``trust_remote_code=True``;
- with ``trust_remote_code=True`` the module imports the classes from the installed ``stgc`` package, or
  raises an ImportError saying what to install and import.

The module holds no model code: the checkpoint keeps working when the package changes, and nothing beyond
an import runs.
"""

from __future__ import annotations

from pathlib import Path

MODULE_NAME = "stgc_autoload"
AUTO_MAP = {
    "AutoConfig": f"{MODULE_NAME}.MoELlavaConfig",
    "AutoModelForImageTextToText": f"{MODULE_NAME}.MoELlavaForConditionalGeneration",
}
IMPORT_HINT = (
    "this checkpoint is a stgc-suite MoE-LLaVA model (model_type stgc_moe_llava): install the stgc-suite "
    "package (`pip install -e <stgc-suite checkout>`) and `import stgc` before "
    "AutoModelForImageTextToText.from_pretrained(path)"
)
# The import sits in a try block: transformers' import check skips those, so a missing package reaches the
# ImportError below instead of transformers' generic "pip install stgc" advice (a different package).
MODULE_TEXT = f'''"""This checkpoint's classes, from the stgc-suite package (written by stgc.autoload)."""

try:
    from stgc.modeling import MoELlavaConfig, MoELlavaForConditionalGeneration
except ImportError as err:
    raise ImportError({IMPORT_HINT!r}) from err

__all__ = ["MoELlavaConfig", "MoELlavaForConditionalGeneration"]
'''


def write_module(folder: str | Path) -> Path:
    """Write ``stgc_autoload.py`` into a checkpoint folder (created if missing); returns its path."""
    path = Path(folder) / f"{MODULE_NAME}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(MODULE_TEXT)
    return path
