"""Evaluations come in kinds: the registry (big_vision's `config.evals.NAME = dict(type=...)`).

`config.evals.NAME` (a ConfigDict) runs the evaluator module `dora_jax.evaluation.TYPE`, with
TYPE its `type` key (NAME when absent, so `config.evals.knn` is a k-NN and
`config.evals.knn_small = dict(type="knn", ...)` a second one). The same module is `dora-eval
TYPE`. Each evaluator module owns its kind, and defines:

  DEFAULTS        {key: value}: its settings, named as `dora-eval TYPE`'s flags with underscores
                  (`config.evals.davis.short_side` is `--short-side`); 0 or "" where the module
                  says it takes the training run's value.
  REPORT_FILE     the JSON report `dora-eval TYPE` writes in --out.
  SCORES          the report's keys that are logged as NAME/KEY during pretraining.
  ERRORS          its exceptions for bad data (one-line messages).
  add_flags(parser, base)   `dora-eval TYPE`'s flags (`base`: config_base's config).
  Evaluator(values, *, name_of, run=None)
                  reads and checks its data (bad data fails here, before any backbone is
                  loaded); `values` holds every key of DEFAULTS, `name_of(key)` says how the user
                  wrote it (`config.evals.NAME.KEY` or `--KEY`), `run` is the training run
                  (`Run`) when it evaluates during pretraining (then its small data is decoded
                  once and kept in memory). Its methods:
    .check(size)            the backbone's `ViTSize` fits the settings (else `SettingError`);
    .run(backbone, *, out_dir=None, progress=False) -> report (a JSON-able dict);
    .summary(report) -> str  the one line `dora-eval` prints.

Adding an evaluation is one module with those names and one line in `TYPES`.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Mapping

import ml_collections

if TYPE_CHECKING:  # dora-eval parses its flags without importing jax.
  from dora_jax import objects

# TYPE -> its module under dora_jax.evaluation (the one registry line of each evaluation).
TYPES = {
    "knn": "knn",
    "seg": "seg",
    "davis": "davis",
    "discover": "discover",
    "track": "track",
}
# The keys of config.evals.NAME that are the registry's, not the evaluator's.
TYPE_KEY, EVERY_STEPS_KEY = "type", "every_steps"


class SettingError(ValueError):
  """A bad evaluator setting; the message is one line naming the key or flag."""


@dataclasses.dataclass(frozen=True)
class Run:
  """What an evaluator during pretraining takes from the training config, parsed once."""
  image_size: int  # data.global_size.
  frames_per_clip: int  # data.frames_per_clip.
  frame_stride: int  # data.frame_stride.
  dora: "objects.DoraOptions"  # config.dora, checked against the model's heads.
  seed: int  # config.seed.
  demo_tour: str | None  # The run's own synthetic tour (data.synthetic), else None.


def module(type_name: str) -> ModuleType:
  """The evaluator module of `type_name`, imported on first use."""
  if type_name not in TYPES:
    raise SettingError(f"unknown evaluation type {type_name!r}; known: {', '.join(TYPES)}.")
  return importlib.import_module(f"dora_jax.evaluation.{TYPES[type_name]}")


def config(type_name: str, *, every_steps: int = 0, **settings) -> ml_collections.ConfigDict:
  """A `config.evals.NAME` entry with every key (so that --config.evals.NAME.KEY=... can set
  any), e.g. `c.evals.davis = registry.config("davis", every_steps=5000, data="/data/DAVIS")`."""
  defaults = module(type_name).DEFAULTS
  unknown = sorted(set(settings) - set(defaults))
  if unknown:
    raise SettingError(f"{type_name} evaluator has no settings {unknown}; known: "
                       f"{sorted(defaults)}.")
  return ml_collections.ConfigDict(
      {TYPE_KEY: type_name, EVERY_STEPS_KEY: every_steps, **defaults, **settings})


def config_values(name: str, section: Mapping[str, Any]) -> tuple[str, int, dict[str, Any]]:
  """(type, every_steps, settings) of `config.evals.NAME`: the module's DEFAULTS updated by the
  section's keys.

  Raises:
    SettingError: an unknown type or key, or a negative every_steps (naming the key).
  """
  section = dict(section)
  type_name = section.pop(TYPE_KEY, name)
  if type_name not in TYPES:
    raise SettingError(f"config.evals.{name}.type={type_name!r} is no evaluation; known: "
                       f"{', '.join(TYPES)} (without `type`, NAME is the type).")
  every_steps = section.pop(EVERY_STEPS_KEY, 0)
  if not isinstance(every_steps, int) or every_steps < 0:
    raise SettingError(f"config.evals.{name}.every_steps={every_steps!r}: expected an integer "
                       ">= 0 (0: off).")
  defaults = module(type_name).DEFAULTS
  unknown = sorted(set(section) - set(defaults))
  if unknown:
    raise SettingError(f"config.evals.{name}.{unknown[0]} is no setting of the {type_name} "
                       f"evaluator; its keys: {', '.join(sorted(defaults))}.")
  return type_name, every_steps, {**defaults, **section}


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """One `config.evals.NAME` entry that is on, parsed: what the trainer's plan holds."""
  name: str  # NAME: the prefix of its metrics.
  type: str  # Its TYPE in `TYPES`.
  every_steps: int  # > 0.
  values: Mapping[str, Any]  # Every key of the module's DEFAULTS.


def parse_evals(evals: Mapping[str, Any]) -> tuple[EvalSettings, ...]:
  """The entries of `config.evals` with every_steps > 0, parsed and checked (`config_values`).

  Raises:
    SettingError: a bad type, key or every_steps (one line naming config.evals.NAME.KEY).
  """
  parsed = []
  for name, section in evals.items():
    type_name, every_steps, values = config_values(name, section)
    if every_steps:
      parsed.append(EvalSettings(name, type_name, every_steps, values))
  return tuple(parsed)


def config_key_namer(name: str) -> Callable[[str], str]:
  return lambda key: f"config.evals.{name}.{key}"


def flag_namer(key: str) -> str:
  return "--" + key.replace("_", "-")


def check_positive(values: Mapping[str, Any], keys: tuple[str, ...],
                   name_of: Callable[[str], str]) -> None:
  """Raises SettingError naming the first of `keys` whose value is not an integer >= 1."""
  for key in keys:
    value = values[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise SettingError(f"{name_of(key)}={value!r}: expected a positive integer.")


def positive_int(value: str) -> int:
  """argparse's type of the positive integer flags."""
  try:
    number = int(value)
  except ValueError:
    number = 0
  if number < 1:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
  return number


def scores(type_name: str, report: Mapping[str, Any]) -> dict[str, float]:
  """The report's SCORES that it holds (None: not measured), as floats."""
  return {key: float(report[key]) for key in module(type_name).SCORES
          if report.get(key) is not None}
