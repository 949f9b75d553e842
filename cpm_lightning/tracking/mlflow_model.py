"""The MLflow pyfunc model of a release, logged as a *model from code*: MLflow stores this file
(not a pickled object) and the model directory as its artifact `model_dir`.

    mlflow.pyfunc.load_model("NAME").predict(["Once upon a time"])

on a directory `cpm-lightning pull models:/NAME@stable --dst NAME` wrote returns one
continuation per prompt (by the variant `pull --variant` wrote, if it wrote one). Params (all
optional): max_new_tokens, temperature (0 is greedy), top_k, top_p (0 turns each off), seed.
`load_model(..., model_config={"dtype": "bfloat16", "quantize": "int8", "group_size": 128})`
holds the model as `generate --dtype/--quantize/--group-size` does (each key optional).

MLflow runs the copy of this file stored with the release, and `mlflow.pyfunc.load_model` on a
models:/ URI runs it straight from the artifact store, before anything has checked it; `pull`
verifies it first (docs/ARCHITECTURE.md, "Releases"). A check in this file could not help: who
can change the stored copy can change the check.
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel

PARAMS = {"max_new_tokens": 100, "temperature": 0.8, "top_k": 0, "top_p": 0.0, "seed": 0}
MODEL_CONFIG = {"dtype": None, "quantize": None, "group_size": 128}
"""The release is logged with these (None: as stored): MLflow lets `load_model` override only the
keys a model was logged with."""


class CPMGenerator(PythonModel):
    def load_context(self, context):
        from pathlib import Path

        import torch

        from cpm_lightning.checkpoint.modeldir import load_model_dir
        from cpm_lightning.core.precision import Precision
        from cpm_lightning.tracking.integrity import release_model_dir

        config = {**MODEL_CONFIG, **(context.model_config or {})}  # MLflow drops keys MODEL_CONFIG lacks

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        variants = context.artifacts.get("variants")
        directory = release_model_dir(Path(context.artifacts["model_dir"]), Path(variants) if variants else None)
        self.model, self.tokenizer = load_model_dir(directory, self.device, Precision(**config))

    def predict(self, context, model_input, params=None):
        import torch

        from cpm_lightning.inference.generate import check_sampling, sample

        p = {**PARAMS, **(params or {})}
        settings = (int(p["max_new_tokens"]), float(p["temperature"]), int(p["top_k"]) or None,
                    float(p["top_p"]) or None)
        check_sampling(*settings, int(p["seed"]))
        # A list of strings arrives as a one-column DataFrame once the signature is enforced.
        prompts = model_input.iloc[:, 0].tolist() if hasattr(model_input, "iloc") else list(model_input)
        out = []
        for prompt in prompts:
            generator = torch.Generator().manual_seed(int(p["seed"]))
            ids = sample(self.model, self.tokenizer.encode(prompt), *settings, self.tokenizer.eos_id, generator)
            out.append(self.tokenizer.decode(ids))
        return out


mlflow.models.set_model(CPMGenerator())
