"""The verbs (docs/ARCHITECTURE.md, "Layers"): the entry point and its verb table (main),
LightningCLI's fit/validate/test (fit), the other model and data verbs (tools), proposal trials
(trial), EleutherAI's harness adapter and its import hook (lm_eval_adapter, lm_eval_hook), and
the model and tokenizer of any source a verb takes: checkpoint, model directory, pulled release
or models:/ URI (loader).
Nothing imports this package."""
