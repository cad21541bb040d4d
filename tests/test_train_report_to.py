"""training.report_to: metrics.jsonl alone by default; TensorBoard / W&B fed through the Trainer when their
package is installed; one clear error when asked for but missing, or for an unknown name."""

from __future__ import annotations

import importlib.util

import pytest

from stgc.recipes import TrainingConfig, apply_overrides, get_recipe


def test_default_is_none_and_names_are_checked():
    assert TrainingConfig().report_targets() == []
    with pytest.raises(ValueError, match="report_to='mlflow' is not valid; use 'none' or"):
        TrainingConfig(report_to="mlflow")
    config = apply_overrides(get_recipe("tiny"), ["training.report_to=tensorboard,wandb"])
    assert config.training.report_to == "tensorboard,wandb"  # a saved config loads anywhere


def test_missing_logger_package_is_one_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a))
    with pytest.raises(
        ValueError, match="needs the wandb package, which is not installed: pip install wandb"
    ):
        TrainingConfig(report_to="wandb").report_targets()


def test_installed_loggers_reach_the_trainer_arguments(monkeypatch, tmp_path):
    from stgc.train import training_arguments

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: object() if n in ("tensorboard", "wandb") else real(n, *a)
    )
    config = apply_overrides(get_recipe("tiny"), ["training.report_to=tensorboard", f"output_dir={tmp_path}"])
    assert training_arguments(config).report_to == ["tensorboard"]
    none = apply_overrides(get_recipe("tiny"), [f"output_dir={tmp_path}"])
    assert training_arguments(none).report_to in ([], "none", ["none"])
