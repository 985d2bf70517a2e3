"""The PEP 517 build backend: setuptools, minus one informational message.

pyproject.toml maps the folders gateway/ and drivers/ onto the import names storelink and storelink.drivers
(``package-dir``). For such a mapping every editable install prints setuptools' "Editable installation" notice
(an ``InformationOnly`` warning: nothing is wrong, the import hook works), which a newcomer would read as a
problem in the output of scripts/test.sh. Only that category is silenced; deprecations and real warnings show.
"""

import warnings

from setuptools.build_meta import *  # noqa: F403  (the PEP 517 hooks, unchanged)
from setuptools.warnings import InformationOnly

warnings.filterwarnings("ignore", category=InformationOnly)
