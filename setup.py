"""The metadata is setup.cfg's; this file only adds one file to what is installed: the .pth line
that makes `lm_eval --model cpm-lightning` find the adapter (cpm_lightning/cli/lm_eval_hook.py).
lm-eval 0.4.13 reads no entry points, and a .pth file runs only from the top of site-packages,
where no package data goes, so build_py copies it there: into the wheel's root, or, for an
editable install (`pip install -e`), into the editable wheel, which setuptools assembles from
what `install` would write rather than from build_lib (setuptools' editable_wheel)."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = os.path.join("cpm_lightning", "cli", "cpm_lightning_lm_eval.pth")


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        root = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        self.copy_file(PTH, os.path.join(root, os.path.basename(PTH)))


setup(cmdclass={"build_py": BuildPyWithPth})
