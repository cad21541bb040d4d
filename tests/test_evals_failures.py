"""A task whose every request fails is an error, never exit status 0: through `stgc eval`, `stgc sweep` and
plain `python -m lmms_eval` (whose CLI logs any Exception and exits 0); loading a checkpoint without
`import stgc` says what to import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from evals import tasks as T
from evals.testing import write_tiny_checkpoint, write_tiny_suite

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """(checkpoint whose chat template raises for every prompt, tiny suite)."""
    tmp = tmp_path_factory.mktemp("broken")
    ckpt = write_tiny_checkpoint(tmp / "runs" / "r" / "checkpoint-1")
    (ckpt / "chat_template.jinja").write_text("{{ raise_exception('this chat template is broken') }}")
    return ckpt, write_tiny_suite(tmp / "mini", n=2, names=["gqa"])


def test_stgc_eval_exits_1_when_every_request_fails(broken, capsys):
    from stgc.cli import main

    ckpt, root = broken
    capsys.readouterr()
    assert main(["eval", str(ckpt), "--tasks", "stgc_gqa", "--mini-root", str(root), "--limit", "2"]) == 1
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("stgc eval: error:"))
    assert "every request of task(s) stgc_gqa failed" in line and "this chat template is broken" in line
    assert not (ckpt.parent / "eval" / ckpt.name / "results.json").exists()


def test_stgc_sweep_records_the_failed_cell(broken, tmp_path):
    from evals import sweep as S
    from stgc.recipes import tiny
    from tests.test_evals_sweep import StubTrainer

    ckpt, root = broken
    sweep = S.Sweep(
        name="t",
        methods={"baseline": tiny()},
        seeds=(0,),
        tasks=("stgc_gqa",),
        eval=S.EvalSettings(batch_size=2, mini_root=str(root), limit=2),
        runs_root=str(tmp_path / "runs"),
    )
    result = S.run_sweep(sweep, tmp_path / "out", train_fn=StubTrainer(source=ckpt), progress=False)
    assert len(result.failures) == 1 and "every request of task(s) stgc_gqa failed" in str(result.failures[0])


def test_partial_failures_are_reported_and_all_failed_raises(capsys):
    from evals.lmms_model import RequestsFailed, StgcMoeLlava

    lm = StgcMoeLlava.__new__(StgcMoeLlava)  # _report_failures reads only `pretrained`
    lm.pretrained = "ckpt"
    lm._report_failures({"a": ["ValueError: x"]}, ["a", "a", "b"])
    assert "1 of 2 requests of task a failed" in capsys.readouterr().err
    with pytest.raises(RequestsFailed, match=r"every request of task\(s\) b failed .*KeyError: y"):
        lm._report_failures({"a": ["ValueError: x"], "b": ["KeyError: y"]}, ["a", "a", "b"])


def _env(tmp_path) -> dict[str, str]:
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "hf_modules"), PYTHONPATH=str(REPO))
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def test_python_m_lmms_eval_exits_nonzero(broken, tmp_path):
    ckpt, root = broken
    task_dir = T.write_task_dir(tmp_path / "tasks", source="mini", mini_root=root)
    cmd = [
        sys.executable, "-m", "lmms_eval", "--model", "stgc_moe_llava", "--model_args", f"pretrained={ckpt}",
        "--include_path", str(task_dir), "--tasks", "stgc_gqa", "--limit", "2", "--batch_size", "2",
    ]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=_env(tmp_path), timeout=300)
    assert run.returncode != 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "every request of task(s) stgc_gqa failed" in run.stderr


def test_loading_without_import_stgc_says_what_to_import(tmp_path):
    """The checkpoint's auto_map points at its stgc_autoload.py: without `import stgc` transformers asks
    for trust_remote_code, with it the module imports stgc (same model), or says what to install."""
    ckpt = write_tiny_checkpoint(tmp_path / "checkpoint-0")
    auto_map = json.loads((ckpt / "config.json").read_text())["auto_map"]
    assert auto_map["AutoConfig"].startswith("stgc_autoload")
    script = """
import sys
from transformers import AutoModelForImageTextToText as A

def load(trust):
    try:
        m = A.from_pretrained(sys.argv[1], trust_remote_code=trust)
    except Exception as e:
        print("\\n@ERROR", type(e).__name__, " ".join(str(e).split()))
    else:
        print("\\n@LOADED", type(m).__module__, "stgc" in sys.modules)

load(None)  # a plain call in a fresh process (transformers asks on stdin first: it reads EOF)
sys.modules["stgc"] = None  # stgc not installed
load(True)
del sys.modules["stgc"]
load(True)
"""
    run = subprocess.run(
        [sys.executable, "-c", script, str(ckpt)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_env(tmp_path),
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    plain, missing, trusted = [x for x in run.stdout.splitlines() if x.startswith("@")]
    assert plain.startswith("@ERROR ValueError") and "trust_remote_code=True" in plain
    assert missing.startswith("@ERROR ImportError") and "import stgc" in missing and "stgc-suite" in missing
    assert trusted == "@LOADED stgc.modeling True"
