"""Makes `lm_eval --model cpm-lightning` find lm_eval_adapter.py.

lm-eval 0.4.13 looks models up in its own registry only, which `lm_eval.models` fills when it is
imported (later releases read the `lm_eval.models` entry points of installed packages). This
module, imported at interpreter start by the line of `cpm_lightning_lm_eval.pth` (beside it; the
install puts it at the top of site-packages, setup.py), adds the adapter to that registry right
after `lm_eval.models` is imported, as a lazy entry: nothing of lm-eval, torch or the adapter is
imported until lm-eval asks for the model. It imports nothing else itself: every Python start in
the environment runs it. The .pth line is a no-op where cpm-lightning is not importable.
"""

from __future__ import annotations

import sys

NAME, TARGET = "cpm-lightning", "cpm_lightning.cli.lm_eval_adapter:CPMLightningLM"


class RegisterAfterImport:
    """A meta path finder that finds `lm_eval.models` with the other finders and registers the
    adapter once that module has run."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "lm_eval.models":
            return None
        for finder in sys.meta_path:
            spec = finder.find_spec(fullname, path, target) if finder is not self and hasattr(finder, "find_spec") else None
            if spec is not None:
                break
        else:
            return None
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            from lm_eval.api.registry import model_registry

            if NAME not in model_registry:
                model_registry.register(NAME, target=TARGET)

        spec.loader.exec_module = exec_module  # this spec's loader only
        return spec


if not any(isinstance(f, RegisterAfterImport) for f in sys.meta_path):
    sys.meta_path.insert(0, RegisterAfterImport())
