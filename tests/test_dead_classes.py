"""Dead classes are decided in one place (engine.metrics.dead_class_names); the run's tags agree with
the prediction counts it logged."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from losslab.pipelines.train import run_train


def test_train_tags_the_classes_whose_logged_prediction_count_is_zero(make_config, small_cache):
    # lr ~ 0 keeps the prior-initialised bias: the untrained model predicts the majority class
    cfg = make_config("train.epochs=2", "optim.lr=1e-12", "tracking.log_model=false", experiment="dead-classes")
    fold = run_train(cfg, info=small_cache).folds[0]
    client = MlflowClient()
    run = client.get_run(fold.run_id)
    for epoch in range(2):
        counts = {c: [m.value for m in client.get_metric_history(fold.run_id, f"val/pred_count_{c}") if m.step == epoch][0]
                  for c in small_cache.class_names}
        zero = [c for c, n in counts.items() if n == 0]  # independent of the code under test
        assert sum(counts.values()) == int((small_cache.index["fold"] == 0).sum())
        assert run.data.tags.get(f"losslab.zero_predictions.epoch_{epoch}", "") == ",".join(zero)
    assert zero, "the lr-0 model was expected to leave a class unpredicted"
    assert run.data.tags["losslab.dead_classes"] == ",".join(zero)
    assert run.data.tags["losslab.alarm.dead_class"].startswith(f"class(es) {', '.join(zero)} predicted 0 times")
