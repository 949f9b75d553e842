"""`cpm-lightning live` (docs/ARCHITECTURE.md, "Live training"): a supervisor that runs `fit` as
consecutive segments, folds accepted proposals in at their step, restarts after crashes, rolls
back from divergence, and keeps the change ledger.

config.py    the run config's `live` group
settings.py  what the supervisor needs of a run config, read without Lightning
ledger.py    the change ledger (changes.jsonl) and its copy in MLflow
protocol.py  the files the supervisor and a segment talk through
watch.py     following the registry: git pull, what can be applied, the snapshot a segment reads
supervisor.py the segments, restarts, rollbacks and suspensions
segment.py   the callback inside a segment (imports Lightning; the supervisor does not)
publish.py   publishing on a schedule: daily and weekly reports, nightly releases, the site
commands.py  `live` and `live status`
"""
