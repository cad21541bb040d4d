"""lmms-eval integration and comparison tables (docs/architecture.md, "evals/").

- `evals.tasks`: the task YAML templates (`stgc_*`: ten benchmarks, lmms-eval and MoE-LLaVA protocols),
  `write_task_dir(out, source, mini_root)` (the mini / hub switch), `TASKS`, `PROTOCOLS`, `HEADLINE`, `SUITES`
- `evals.lmms_model`: the lmms-eval model `stgc_moe_llava` (entry point `lmms_eval.models`)
- `evals.run`: `evaluate(checkpoint, tasks)` and `stgc eval` (`evals.cli_eval`)
- `evals.sweep`: sweeps (methods x seeds x tasks) and `stgc sweep` (`evals.cli_sweep`)
- `evals.tables`: long scores -> wide table (mean ± std over seeds, delta vs baseline, paired t-test)
- `evals.testing`: test doubles (a scripted lmms-eval model, a tiny suite and checkpoint)
"""
