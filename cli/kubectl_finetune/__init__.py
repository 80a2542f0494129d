"""`kubectl finetune`: run FineTuneJobs locally and follow them in a cluster.

    kubectl finetune run --local JOB.yaml --volume CLAIM=DIR ...
    kubectl finetune list [-n NS] | status NAME | watch NAME | logs NAME

Modules: `main` (arguments, one-line errors), `local` (run --local), `cluster` (list, status,
watch, logs), `progress` (the progress bar and the trainer's progress lines). Every fact shared
with the trainer or the operator (file names, the progress prefix, labels, the container name,
the duration format) is imported from its owner, never typed here. The operator image does not
include this package.
"""


class CliError(Exception):
    """A user-facing error: printed as one line on stderr, with a non-zero exit."""
