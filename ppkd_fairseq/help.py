"""Show the PP-KD options in ``fairseq-eval-lm --user-dir ppkd_fairseq --help``.

fairseq adds a task's options to the parser only after a first parse, and
``--help`` exits during that first parse, so no task's options reach the
help text. When ``-h`` or ``--help`` is on the command line, importing the
user dir wraps ``fairseq.options.parse_args_and_arch`` (which every fairseq
command calls with its parser right after importing the user dir) so that
it first adds the PP-KD options to the parser as a group. Without
``--help`` nothing is wrapped and fairseq adds the options through the task.
"""

import dataclasses
import sys


def _add_group(parser, config_class, title):
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(config_class):
        if not f.name.startswith("ppkd_"):
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        group.add_argument(
            "--" + f.name.replace("_", "-"),
            default=default,
            help=f"{f.metadata.get('help', '')} (default: {default})",
        )


def add_options_to_help(config_class, title):
    """Make the next help text include the ``ppkd_*`` fields of ``config_class``."""
    if not any(arg in ("-h", "--help") for arg in sys.argv[1:]):
        return False
    import fairseq.options as options

    original = options.parse_args_and_arch
    if getattr(original, "ppkd_help", False):
        return False

    def parse_args_and_arch(parser, *args, **kwargs):
        _add_group(parser, config_class, title)
        return original(parser, *args, **kwargs)

    parse_args_and_arch.ppkd_help = True
    options.parse_args_and_arch = parse_args_and_arch
    return True
