"""The MLflow params of a run resumed with other values (a `live` segment after a migration):
params cannot change, so the values now are the run's tags of the same names (issue 22 item 6)."""

from __future__ import annotations

from mlflow import MlflowClient

from cpm_lightning.tracking.logger import CPMLogger

FF_DIM = "model/arch/ff_dim"


def start(tmp_path, run_id: str | None, ff_dim: int) -> str:
    """One start of the run (a segment): logs its hyperparameters and ends; the run's id."""
    logger = CPMLogger(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment_name="params", run_name=None,
                       run_id=run_id, fallback_dir=tmp_path, flush_timeout=30)
    logger.log_hyperparams({"model": {"arch": {"ff_dim": ff_dim, "dim": 64}}})
    logger.finalize()
    return logger.run_id


def test_a_value_changed_since_the_first_start_is_the_tag_of_its_name(tmp_path, capsys):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = start(tmp_path, None, 128)
    assert FF_DIM not in client.get_run(run_id).data.tags
    start(tmp_path, run_id, 160)  # the model grew
    data = client.get_run(run_id).data
    assert (data.params[FF_DIM], data.tags[FF_DIM]) == ("128", "160")
    assert "model/arch/dim" not in data.tags
    assert ("changed since: model/arch/ff_dim (the run's tags of the same names have the values now)"
            in capsys.readouterr().err)
    start(tmp_path, run_id, 128)  # a rollback to before the migration
    data = client.get_run(run_id).data
    assert (data.params[FF_DIM], data.tags[FF_DIM]) == ("128", "128")
