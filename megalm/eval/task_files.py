"""Which lm-eval tasks `megalm-eval --tasks` runs, as configs lm-eval can run offline.

`--tasks` takes comma-separated names, a directory of task YAMLs or one task YAML:
  * a shipped task (megalm/eval/tasks/*.yaml, package data) or a task of a given directory becomes its
    full config dict, with relative `dataset_kwargs.data_files` made absolute against the YAML's own
    directory: lm-eval hands data_files to `datasets.load_dataset`, which reads them relative to the
    working directory, so a shipped task would otherwise only run from inside megalm/eval/tasks/;
  * any other name must be one of lm-eval's own tasks (its whole index is built only then: that takes
    seconds); those read Hugging Face datasets, which must already be in the local cache, since
    megalm-eval runs with HF_DATASETS_OFFLINE=1.
A name that is neither is an error listing the shipped tasks.
"""
from __future__ import annotations

import glob
import os
from typing import Any

SHIPPED_TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")


class TaskSpecError(ValueError):
    """--tasks names something that is not a task, or a task asks what the megalm model cannot do
    (one line: what, and the fix)."""


def _task_yamls(directory: str) -> dict[str, str]:
    """{task name: YAML path} of the task configs in `directory` and below (includes resolved, so a
    task whose name comes from an included file counts; group and tag files are skipped)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    found: dict[str, str] = {}
    for path in sorted(glob.glob(os.path.join(directory, "**", "*.yaml"), recursive=True)):
        try:
            cfg = load_yaml(path, resolve_func=False)
        except Exception as e:  # noqa: BLE001 - a YAML lm-eval cannot read is an error naming the file
            raise TaskSpecError(f"task file {path}: does not load as an lm-eval task config ({e}); fix or remove it") from None
        name = cfg.get("task")
        if isinstance(name, str) and "group" not in cfg:
            found.setdefault(name, path)
    return found


def shipped_tasks() -> dict[str, str]:
    """{name: YAML path} of the tasks megalm ships."""
    return _task_yamls(SHIPPED_TASKS_DIR)


def _absolute_data_files(data_files: Any, base: str) -> Any:
    """data_files as `datasets` takes it (a path, a list, or {split: path or list}) with each relative
    local path joined to `base`; URLs and absolute paths are left alone."""
    if isinstance(data_files, str):
        if "://" in data_files or os.path.isabs(data_files):
            return data_files
        return os.path.normpath(os.path.join(base, os.path.expanduser(data_files)))
    if isinstance(data_files, list):
        return [_absolute_data_files(f, base) for f in data_files]
    if isinstance(data_files, dict):
        return {split: _absolute_data_files(f, base) for split, f in data_files.items()}
    return data_files


def task_config(yaml_path: str) -> dict:
    """The full config of the task in `yaml_path` (includes and !function resolved, as lm-eval loads
    it), its relative data_files made absolute against the YAML's directory."""
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = dict(load_yaml(yaml_path, resolve_func=True))
    kwargs = cfg.get("dataset_kwargs")
    if isinstance(kwargs, dict) and "data_files" in kwargs:
        base = os.path.dirname(os.path.abspath(yaml_path))
        cfg["dataset_kwargs"] = {**kwargs, "data_files": _absolute_data_files(kwargs["data_files"], base)}
    return cfg


def resolve_tasks(spec: str):
    """`--tasks` -> (task specs for lm-eval's simple_evaluate: config dicts and lm-eval task names,
    the TaskManager to load them with). Every name is checked before any model is loaded."""
    from lm_eval.tasks import TaskManager

    spec = spec.strip()
    if os.path.isfile(spec) and spec.endswith((".yaml", ".yml")):
        return [task_config(spec)], TaskManager(include_defaults=False)
    if os.path.isdir(spec):
        found = _task_yamls(spec)
        if not found:
            raise TaskSpecError(f"--tasks {spec}: the directory holds no task YAML (a file with a `task:` key)")
        return [task_config(path) for path in found.values()], TaskManager(include_defaults=False)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise TaskSpecError(f"--tasks {spec!r}: give comma-separated task names or a directory of task YAMLs")
    shipped = shipped_tasks()
    others = [n for n in names if n not in shipped]
    manager = TaskManager(include_defaults=False)
    if others:
        if os.sep in others[0] or others[0].endswith(".yaml"):
            raise TaskSpecError(f"--tasks {others[0]}: no such directory; give a directory of task YAMLs or task names")
        manager = TaskManager()  # lm-eval's own index: only built when a name is not ours
        unknown = [n for n in others if n not in manager.all_tasks]
        if unknown:
            raise TaskSpecError(f"--tasks: unknown task {', '.join(unknown)}; shipped tasks: {', '.join(sorted(shipped))} "
                                f"(or lm-eval's own task names, or a directory of task YAMLs)")
    return [task_config(shipped[n]) if n in shipped else n for n in names], manager
