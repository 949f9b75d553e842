"""The community proposal registry (docs/ARCHITECTURE.md, "The registry"): YAML proposals that assemble what is trained.

schema.py reads one proposal file strictly; keys.py checks its `changes` against the run
config's typed signatures; resolve.py checks proposals against each other and resolves the
accepted ones at a step; apply.py applies them to a run; commands.py is `cpm-lightning proposals`.
"""
