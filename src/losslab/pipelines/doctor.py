"""doctor: read runs back from MLflow, name each alarm's likely cause and the config changes to try.

``losslab doctor <run id | experiment>``: a run id diagnoses that run (a parent run — a CV parent or
the main job's run — diagnoses its fold runs); an experiment name diagnoses its single-fold train
runs. Each diagnosed run gets a ``doctor.md`` artifact and the tag ``losslab.doctor`` (the alarms
found, comma-separated, or ``healthy``).

The evidence is what train already logs: the engine's alarm tags ``losslab.alarm.<name>``
(:class:`losslab.engine.metrics.Alarms`: ``dead_class``, ``overfitting``, ``unstable``), the tag
``losslab.dead_classes``, the last epoch's ``val/pred_count_<class>`` (dead by the engine's one rule,
:func:`losslab.engine.metrics.dead_class_names`), the metrics ``best_val/dead_class_count`` and
``val/attention_entropy_normalised`` (:func:`losslab.engine.diagnostics.attention_statistics`; the
engine has no alarm for collapsed MIL attention, so the doctor reads the statistic: below
:data:`ATTENTION_COLLAPSED` = 0.15 the attention sits on about one instance of the bag).

All knowledge lives in :data:`RULES`, one row per alarm: the evidence that raises it, the likely
cause, and the changes to try, each a config override (``key=value``, templated with the run's own
params, e.g. a third of its ``optim.lr``) with its reason. A change the run already has is not
suggested.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from losslab.engine.metrics import dead_class_names, pred_counts
from losslab.tracking import resolve_tracking_uri

ATTENTION_COLLAPSED = 0.15
HEALTHY = "healthy"


@dataclass(frozen=True)
class Change:
    override: str  # ``key=value``; ``{name}`` fields come from :func:`_context`
    reason: str


@dataclass(frozen=True)
class Rule:
    alarm: str
    # (kind, key, threshold): tag (present) | metric_above | metric_below | dead_classes (the engine's
    # dead_class_names over the last epoch's <key>pred_count_<class> metrics)
    evidence: tuple[tuple[str, str, float], ...]
    cause: str
    changes: tuple[Change, ...]


RULES: tuple[Rule, ...] = (
    Rule("dead_class",
         (("tag", "losslab.alarm.dead_class", 0), ("tag", "losslab.dead_classes", 0),
          ("dead_classes", "val/", 0), ("metric_above", "best_val/dead_class_count", 0)),
         "the argmax never picks a minority class: the loss and the class prior pull every logit toward "
         "the majority (often with a too small or too large learning rate)",
         (Change("evaluate.calibration.enabled=true", "no retraining: `losslab evaluate --model <this run id>` "
                 "(calibration is on by default) fits per-class logit offsets / a threshold on validation, which "
                 "revives a class the argmax never picks; read test_calibrated/*"),
          Change("loss=logit_adjusted", "adds tau·log(prior) to the logits during training, so rare classes "
                 "must win by a margin (Menon et al., ICLR 2021)"),
          Change("loss.class_weights=inverse_freq", "weights each sample by its class's inverse frequency, so a "
                 "missed minority case costs as much as the majority ones"),
          Change("data.sampler=class_balanced_batch", "every batch sees every class"))),
    Rule("overfitting", (("tag", "losslab.alarm.overfitting", 0),),
         "validation loss far above training loss: the model memorises the small training folds",
         (Change("optim.weight_decay={weight_decay_x10}", "ten times the weight decay shrinks the weights "
                 "that fit individual cases"),
          Change("train.epochs={epochs_to_best}", "the best validation epoch came early; later epochs only "
                 "widen the gap"),
          Change("data.bag_size={bag_size_half}", "smaller random bags are a stronger augmentation of each case"),
          Change("loss.label_smoothing=0.1", "softer targets stop the loss from driving training logits to "
                 "extremes"),
          Change("train.ema_decay=0.99", "an exponential moving average of the weights generalises better than "
                 "the last step"))),
    Rule("unstable", (("tag", "losslab.alarm.unstable", 0),),
         "balanced accuracy jumps from epoch to epoch: a small validation fold (one case moves it a lot) or "
         "a learning rate too high for the batch size",
         (Change("train.ema_decay=0.999", "validates averaged weights, which move smoothly"),
          Change("optim.lr={lr_third}", "a third of the learning rate takes smaller, steadier steps"),
          Change("data.num_folds={num_folds_fewer}", "fewer folds make each validation fold larger, so one case "
                 "moves balanced accuracy less"))),
    Rule("attention_collapsed", (("metric_below", "val/attention_entropy_normalised", ATTENTION_COLLAPSED),),
         "MIL attention sits on about one instance per bag: the head learned a shortcut on a single slice",
         (Change("model.head=topk", "averages the top-k instance scores, so several slices must carry the "
                 "evidence"),
          Change("model.head_kwargs.instance_dropout=0.2", "drops instances at random in training, so no single "
                 "slice can be relied on"))),
)


class _Context(dict):
    def __missing__(self, key: str) -> str:
        return f"<{key}: the run did not log the params it needs>"


def _number(params: dict[str, str], key: str) -> float:
    try:
        return float(params.get(key, "nan"))
    except ValueError:
        return math.nan


def _context(params: dict[str, str], metrics: dict[str, float]) -> _Context:
    """Values for the change templates, from the run's own params (missing ones stay unfilled)."""
    ctx = _Context()
    lr, wd = _number(params, "optim.lr"), _number(params, "optim.weight_decay")
    bag, folds = _number(params, "data.bag_size"), _number(params, "data.num_folds")
    if math.isfinite(lr):
        ctx["lr_third"] = f"{lr / 3:.3g}"
    if math.isfinite(wd):
        ctx["weight_decay_x10"] = f"{max(wd * 10, 1e-3):.3g}"
    if math.isfinite(bag) and bag >= 2:
        ctx["bag_size_half"] = str(int(bag // 2))
    if math.isfinite(folds) and folds > 2:
        ctx["num_folds_fewer"] = str(int(folds) - 1)
    best = metrics.get("best_epoch")
    if best is not None and best >= 0:
        ctx["epochs_to_best"] = str(int(best) + 1)
    return ctx


@dataclass
class Finding:
    alarm: str
    evidence: str
    cause: str
    changes: list[tuple[str, str]]  # (override, reason)


def _evidence(rule: Rule, tags: dict[str, str], metrics: dict[str, float]) -> str | None:
    for kind, key, threshold in rule.evidence:
        if kind == "tag" and key in tags:
            return f"{key} = {tags[key]}"
        if kind == "dead_classes":
            dead = dead_class_names(pred_counts(metrics, key))
            if dead:
                return f"{key}pred_count_<class> = 0 at the last epoch for {', '.join(dead)}"
            continue
        value = metrics.get(key)
        if value is None or math.isnan(value):
            continue
        if (kind == "metric_above" and value > threshold) or (kind == "metric_below" and value < threshold):
            return f"{key} = {value:.4g} ({'>' if kind == 'metric_above' else '<'} {threshold:g})"
    return None


def diagnose(params: dict[str, str], tags: dict[str, str], metrics: dict[str, float]) -> list[Finding]:
    """The findings for one run's params, tags and latest metrics, in :data:`RULES` order."""
    ctx = _context(params, metrics)
    findings = []
    for rule in RULES:
        evidence = _evidence(rule, tags, metrics)
        if evidence is None:
            continue
        changes = []
        for change in rule.changes:
            override = change.override.format_map(ctx)
            key, _, value = override.partition("=")
            current = params.get("loss.name" if key == "loss" else key)
            if current is not None and str(current) == value:
                continue  # the run already has it
            changes.append((override, change.reason))
        findings.append(Finding(rule.alarm, evidence, rule.cause, changes))
    return findings


def report_markdown(run_name: str, run_id: str, findings: list[Finding]) -> str:
    lines = [f"# Doctor: {run_name} ({run_id})", ""]
    if not findings:
        return "\n".join(lines + ["No alarm: healthy.", ""])
    for finding in findings:
        lines += [f"## {finding.alarm}", "", f"- evidence: {finding.evidence}", f"- likely cause: {finding.cause}",
                  "- try (one at a time, e.g. `losslab train -o KEY=VALUE`):"]
        lines += [f"  - `{override}`: {reason}" for override, reason in finding.changes]
        lines.append("")
    return "\n".join(lines)


@dataclass
class DoctorResult:
    reports: dict[str, str]  # run id -> markdown
    findings: dict[str, list[Finding]]

    def text(self) -> str:
        sick = sum(1 for f in self.findings.values() if f)
        return "\n".join(self.reports.values()) + f"\n{len(self.reports)} run(s) diagnosed, {sick} with alarms"


def _target_runs(client: MlflowClient, target: str) -> list:
    """The runs ``target`` names: a run id (a parent: its single-fold children), else an experiment."""
    run = None
    if re.fullmatch(r"[0-9a-f]{32}", target):
        try:
            run = client.get_run(target)
        except MlflowException:
            run = None
    if run is not None:
        children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{target}'")
        folds = [r for r in children if re.fullmatch(r"-?\d+", r.data.tags.get("losslab.fold", ""))]
        return folds or [run]
    experiment = client.get_experiment_by_name(target)
    if experiment is None:
        raise LookupError(f"{target!r} is neither a run id nor an experiment in the tracking store "
                          f"{mlflow.get_tracking_uri()}")
    runs = client.search_runs([experiment.experiment_id], "tags.`losslab.entry_point` = 'train'")
    return [r for r in runs if re.fullmatch(r"-?\d+", r.data.tags.get("losslab.fold", ""))]


def run_doctor(target: str, tracking_uri: str | None = None, log: bool = True) -> DoctorResult:
    """Diagnose the runs ``target`` names; with ``log``, write ``doctor.md`` and the tag
    ``losslab.doctor`` to each."""
    mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
    client = MlflowClient()
    reports, all_findings = {}, {}
    for run in _target_runs(client, target):
        run_id, data = run.info.run_id, run.data
        findings = diagnose(dict(data.params), dict(data.tags), dict(data.metrics))
        name = data.tags.get("mlflow.runName", run_id)
        reports[run_id] = report_markdown(name, run_id, findings)
        all_findings[run_id] = findings
        if log:
            client.log_text(run_id, reports[run_id], "doctor.md")
            client.set_tag(run_id, "losslab.doctor", ",".join(f.alarm for f in findings) or HEALTHY)
    return DoctorResult(reports, all_findings)


__all__ = ["ATTENTION_COLLAPSED", "RULES", "Change", "DoctorResult", "Finding", "Rule", "diagnose", "report_markdown",
           "run_doctor"]
