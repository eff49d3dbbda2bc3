"""QuantPlan: a saved allocation (one action per unit) with what it was measured to give,
tied to the table (weights, calibration, config) it was made for, and saying how to rebuild
the problem (model, corpus, calibration seed and sizes, proxy precision) that table belongs to."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from .errors import ConfigError, PlanNotFoundError, TableMismatchError
from .problem import ProblemSpec, QuantProblem
from .quant.bitwidths import ACTION_BITS
from .quant.config import QuantConfig
from .quant.table import QuantTable

PLAN_SCHEMA = 1


@dataclass(frozen=True)
class QuantPlan:
    actions: tuple
    """Requested action index per unit, in unit order (see ``ACTION_BITS``)."""
    table_fingerprint: str
    quant_config: QuantConfig
    model: str = ""
    """Informational: the model's name or class."""
    metrics: Dict[str, Any] = field(default_factory=dict)
    schema: int = PLAN_SCHEMA
    problem: Optional[ProblemSpec] = None
    """How to rebuild the problem the plan was made on (absent in plans of older versions)."""

    @classmethod
    def from_table(cls, table: QuantTable, actions: Sequence[int], model: str = "", **metrics) -> "QuantPlan":
        checked = table.check_plan(actions)
        return cls(tuple(int(a) for a in checked), table.fingerprint, table.config, model, dict(metrics))

    @classmethod
    def from_problem(cls, problem: QuantProblem, actions: Sequence[int], **metrics) -> "QuantPlan":
        """A plan of ``problem``'s table that also records how to rebuild ``problem``."""
        spec = problem.spec
        checked = problem.table.check_plan(actions)
        return cls(tuple(int(a) for a in checked), problem.table.fingerprint, problem.table.config,
                   (spec.model if spec is not None else None) or type(problem.model).__name__, dict(metrics),
                   problem=spec)

    def problem_spec(self, model: Optional[str] = None, calibration: Optional[str] = None) -> ProblemSpec:
        """The spec to rebuild this plan's problem, with ``model`` / ``calibration`` replaced
        when given (e.g. the same model from another folder)."""
        if self.problem is None:
            raise ConfigError(
                "This plan file does not say which problem it was made on (it was saved by an older version): "
                "give the env's settings instead (windquant export/plot PLAN --model NAME --preset PRESET, or build "
                "the QuantProblem in Python)."
            )
        changes = {k: v for k, v in (("model", model), ("calibration", calibration)) if v is not None}
        return dataclasses.replace(self.problem, **changes) if changes else self.problem

    def check(self, table: QuantTable) -> None:
        """Refuse a table this plan was not made for."""
        made_for = f" (made for {self.model!r})" if self.model else ""
        if self.quant_config != table.config:
            mine, theirs = self.quant_config.to_dict(), table.config.to_dict()
            differ = ", ".join(f"{k}: plan {mine[k]!r}, table {theirs[k]!r}" for k in mine if mine[k] != theirs[k])
            raise TableMismatchError(
                f"This plan{made_for} was made with another quant config ({differ}); the full configs are "
                f"{self.quant_config} and {table.config}. Rebuild the env with the plan's quant config "
                "(plan.quant_config)."
            )
        if self.table_fingerprint != table.fingerprint:
            raise TableMismatchError(
                f"This plan{made_for} belongs to table {self.table_fingerprint}, not {table.fingerprint}: "
                f"{_fingerprint_difference(self.table_fingerprint, table.fingerprint)}. Use the model, the preset "
                "(its quant_config), the calibration and the windquant-gym version the plan was made with."
            )
        table.check_plan(self.actions)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "schema": self.schema,
            "model": self.model,
            "table_fingerprint": self.table_fingerprint,
            "quant_config": self.quant_config.to_dict(),
            "action_bits": list(ACTION_BITS),
            "actions": list(self.actions),
            "metrics": self.metrics,
            # the quant config is stored once, above
            **({"problem": {k: v for k, v in self.problem.to_dict().items() if k != "quant_config"}}
               if self.problem is not None else {}),
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "QuantPlan":
        if not Path(path).is_file():
            raise PlanNotFoundError(
                f"No plan file at {str(path)!r}. Give a plan JSON saved by a run (runs/NAME/final_plan.json, "
                "best_plan_T.json), by `windquant bench` (its *_plans/ folder) or by QuantPlan.save."
            )
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as error:
            raise TableMismatchError(f"{path} is not a plan file (not JSON: {error}); give a plan saved by QuantPlan.save.") from None
        if not isinstance(data, dict):
            raise TableMismatchError(f"{path} is not a plan file (a JSON {type(data).__name__}); give a plan saved by QuantPlan.save.")
        if data.get("schema") != PLAN_SCHEMA:
            raise TableMismatchError(f"{path}: plan schema {data.get('schema')!r}, this version reads {PLAN_SCHEMA}.")
        missing = [k for k in ("actions", "table_fingerprint", "quant_config") if k not in data]
        if missing:
            raise TableMismatchError(f"{path} lacks the plan fields {missing}; give a plan saved by QuantPlan.save.")
        quant_config = QuantConfig.from_dict(data["quant_config"])
        problem = None
        if data.get("problem") is not None:
            try:
                problem = ProblemSpec.from_dict({**data["problem"], "quant_config": data["quant_config"]})
            except (ConfigError, TypeError) as error:
                raise TableMismatchError(f"{path}: its 'problem' entry is malformed ({error}).") from None
        return cls(
            actions=tuple(data["actions"]),
            table_fingerprint=data["table_fingerprint"],
            quant_config=quant_config,
            model=data.get("model", ""),
            metrics=data.get("metrics", {}),
            problem=problem,
        )


#: The parts of a table fingerprint (:func:`~windquant_gym.quant.build.table_fingerprint`), by position.
_FINGERPRINT_PARTS = (
    (0, 32, "the weights (another model, or other weights), the quantization config (another preset's "
            "quant_config) or the fitting code (windquant_gym/quant: another version of the package)"),
    (32, 48, "the calibration (the activation scales, and the Hessian blocks where the config uses them: another "
             "calibration text, seed or statistics set)"),
)


def _fingerprint_difference(mine: str, theirs: str) -> str:
    """What differs between two table fingerprints, read off the parts that do."""
    differ = [what for start, end, what in _FINGERPRINT_PARTS if mine[start:end] != theirs[start:end]]
    return "they differ in " + "; and in ".join(differ) if differ else "another table"
