"""`stgc --help` and every `stgc COMMAND --help` import neither torch nor transformers (an import-level
check, not a timing test: those two are what made help take 5-9 s), and `import stgc` stays light while
still registering the model with transformers' Auto classes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from stgc.cli import SUBCOMMANDS

HEAVY = ("torch", "transformers", "pandas", "datasets", "lmms_eval", "deepspeed")

_PROBE = """
import json, sys
from stgc.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)), file=sys.stderr)
"""


def _heavy_modules_after(argv: list[str]) -> tuple[list[str], str]:
    code = _PROBE.format(argv=argv, heavy=HEAVY)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stderr.strip().splitlines()[-1]), done.stdout


def test_top_level_help_is_light():
    loaded, out = _heavy_modules_after(["--help"])
    assert loaded == [] and "demo" in out


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_subcommand_help_is_light(command):
    loaded, out = _heavy_modules_after([command, "--help"])
    assert loaded == [], f"`stgc {command} --help` imported {loaded}"
    assert f"usage: stgc {command}" in out and "--verbose" in out


def test_import_stgc_is_light_and_registers_when_transformers_arrives(tmp_path):
    """Both orders a user writes: `import stgc` first (registration when transformers has been imported)
    and transformers first (registration on `import stgc`); and `import stgc.backbones` first, whose own
    transformers import must not see a half-built registration."""
    from evals.testing import write_tiny_checkpoint

    checkpoint = write_tiny_checkpoint(tmp_path / "ckpt")
    load = (
        "from transformers import AutoModelForImageTextToText as A, AutoProcessor as P; "
        f"m = A.from_pretrained({str(checkpoint)!r}); P.from_pretrained({str(checkpoint)!r}); "
        "print(type(m).__name__)"
    )
    light = "import sys, stgc; assert 'torch' not in sys.modules and 'transformers' not in sys.modules; "
    for code in (
        light + load,
        load.replace("; m =", "; import stgc; m =", 1),
        "import stgc.backbones; " + load,
    ):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip().endswith("MoELlavaForConditionalGeneration")
