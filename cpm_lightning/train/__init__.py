"""Training (docs/ARCHITECTURE.md, "Data flow of fit"): the run config's `model` and `eval`
groups (config), `CausalLM`, the LightningModule (module), the callbacks of every run
(callbacks), FSDP2 (sharding), and where the run config's groups meet the data package
(run_config)."""
