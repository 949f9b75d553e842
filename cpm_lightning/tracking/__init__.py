"""MLflow: the live metric view of a run, daily training logs, releases to the Model Registry,
and pulling released models back (docs/ARCHITECTURE.md, "MLflow")."""
