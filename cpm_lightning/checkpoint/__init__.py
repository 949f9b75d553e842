"""Checkpoints and model directories on disk (docs/ARCHITECTURE.md, "Checkpoints"): the
`checkpoint` group's config (config), which checkpoint a run resumes and the directory as files
(directory), opening one without trusting it (files), what a checkpoint says about itself,
`checkpoint["cpm"]` (meta), writing and reading them (store), a checkpoint's tensors migrated to
the resuming run's architecture as they load (migrate_on_load), and the consolidated
model-directory format (modeldir)."""
