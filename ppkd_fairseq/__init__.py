"""ppkd-fairseq: kNN-LM evaluation with plug-and-play knowledge distillation.

Load with ``--user-dir``; importing registers the ``ppkd_language_modeling``
task and the ``ppkd_distillation`` criterion with fairseq.
"""

from . import criterion  # noqa: F401
from . import task  # noqa: F401
