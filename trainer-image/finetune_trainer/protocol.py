"""The trainer's side of the contract with the operator (torch-free).

Exit codes, file names and the progress-line prefix live here so the operator can import
them instead of copying magic values.
"""

# Exit codes. Kubernetes shows them on the pod; the operator maps them to conditions.
EXIT_OK = 0
EXIT_INTERNAL_ERROR = 1  # a bug or an environment failure: a traceback is printed
EXIT_USER_ERROR = 2  # bad config or bad data: one clear line, no traceback
EXIT_PREEMPTED = 143  # SIGTERM: a checkpoint was saved, rerunning resumes (128 + 15)

RESULT_FILE = "result.json"
MODEL_MANIFEST_FILE = "model.yaml"

# When reporting.progressFile is null, each progress record goes to stdout as one line:
#   FINETUNE_PROGRESS {"step": 3, "totalSteps": 10, ...}
PROGRESS_PREFIX = "FINETUNE_PROGRESS "

# Kubernetes truncates termination messages longer than this.
TERMINATION_MESSAGE_LIMIT = 4096
