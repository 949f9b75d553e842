"""Makes `lm_eval --model cpm-lightning` find lm_eval_adapter.py.

lm-eval 0.4.13 looks models up in its own registry only, which `lm_eval.models` fills when it is
imported (later releases read the `lm_eval.models` entry points of installed packages). This
module, imported at interpreter start by the line that `python -m cpm_lightning.cli.lm_eval_hook`
writes into site-packages as a .pth file (`make install` runs it), adds the adapter to that
registry right after `lm_eval.models` is imported, as a lazy entry: nothing of lm-eval, torch or
the adapter is imported until lm-eval asks for the model. It imports nothing else itself: every
Python start in the environment runs it.
"""

from __future__ import annotations

import sys

NAME, TARGET = "cpm-lightning", "cpm_lightning.cli.lm_eval_adapter:CPMLightningLM"
PTH_FILE = "cpm_lightning_lm_eval.pth"
# The .pth line: a no-op where cpm-lightning is not importable (uninstalled, another checkout).
PTH_LINE = ("import importlib.util as u; u.find_spec('cpm_lightning') and u.find_spec('cpm_lightning.cli.lm_eval_hook') "
            "and __import__('cpm_lightning.cli.lm_eval_hook')\n")


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


def write_pth() -> str:
    """Write the .pth file into this interpreter's site-packages; returns its path."""
    import sysconfig
    from pathlib import Path

    path = Path(sysconfig.get_paths()["purelib"]) / PTH_FILE
    path.write_text(PTH_LINE)
    return str(path)


if __name__ == "__main__":
    print(f"wrote {write_pth()}: `lm_eval --model cpm-lightning` finds cpm-lightning's adapter")
