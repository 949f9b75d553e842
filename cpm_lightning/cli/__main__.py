"""`python -m cpm_lightning.cli`: what `live` starts a segment with (docs/ARCHITECTURE.md, "Live training")."""

from cpm_lightning.cli.main import main

main()
