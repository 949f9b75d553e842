"""Layer 0 (docs/ARCHITECTURE.md, "Layers"): what every other package may use and which uses
nothing of the project: `UserError` (errors), the declared ranges of config numbers (ranges),
YAML read as plain data (strict_yaml), the fused loss (loss), peak FLOP/s (perf), per-chunk
sha256 of files (file_hashes), and the tokenizer interface (tokenizer)."""
