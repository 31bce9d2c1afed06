"""ppkd-fairseq: kNN-LM evaluation with plug-and-play knowledge distillation.

Load with ``--user-dir``; importing registers the ``ppkd_language_modeling``
task and the ``ppkd_distillation`` criterion with fairseq.
"""

from . import task  # noqa: F401
