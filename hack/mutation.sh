#!/usr/bin/env bash
# Mutation testing with mutmut (`make mutation`; not part of `make test`): every small change
# mutmut makes to the modules below must turn a test red. Prints the score per module and
# writes it to .mutation/scores.json.
#
# Which tests: the fast ones, tests/unit and the trainer's outputs and reporting tests. mutmut
# runs, for each mutant, the tests that reach the mutated function; the trainer's checkpointing
# tests train a model (20-80 s each), which for its hundreds of mutants would take hours, so
# checkpointing.py and checkpoint_integrity.py are left out here (their behaviour is pinned by
# tests/trainer, which the held-out mutations run in full). The integration and e2e tests need a
# cluster and are not run: leader.py, tested only there, shows as "no tests".
#
# The code is staged as a src/ layout under .mutation/ (mutmut rewrites a copy of it; the
# checkout is never touched) and imported from there, ahead of the editable install.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
# MUTATION_DIR and MUTATION_MODULES (space-separated, as below) narrow a run, say to one module
# while writing its tests; MUTATION_TESTS likewise.
work="${MUTATION_DIR:-$repo/.mutation}"
read -r -a modules <<< "${MUTATION_MODULES:-finetune_operator/status.py finetune_operator/failures.py \
finetune_operator/children.py finetune_operator/progress.py finetune_operator/model.py finetune_operator/leader.py \
finetune_trainer/outputs.py finetune_trainer/reporting.py}"
read -r -a tests <<< "${MUTATION_TESTS:-tests/unit/ tests/trainer/test_trainer_outputs.py tests/trainer/test_trainer_reporting.py}"

# Pinned here rather than in constraints.txt, which the images are built from: a test-only tool
# must not change (and rebuild) them.
.venv/bin/pip install -q mutmut==3.8.1
rm -rf "$work"
mkdir -p "$work/src" "$work/tests/trainer"
cp -r operator/finetune_operator trainer-image/finetune_trainer cli/kubectl_finetune "$work/src/"
cp -r tests/unit tests/conftest.py tests/kubetools.py tests/spec_cases.py "$work/tests/"
cp tests/trainer/conftest.py tests/trainer/trainer_helpers.py tests/trainer/test_trainer_outputs.py \
   tests/trainer/test_trainer_reporting.py "$work/tests/trainer/"
find "$work" -name __pycache__ -prune -exec rm -rf {} +

quote() { local out=() x; for x in "$@"; do out+=("\"$x\""); done; local IFS=,; echo "[${out[*]}]"; }
paths=(); for m in "${modules[@]}"; do paths+=("src/$m"); done
cat > "$work/pyproject.toml" <<EOF
[tool.mutmut]
source_paths = $(quote "${paths[@]}")
pytest_add_cli_args_test_selection = $(quote "${tests[@]}")
also_copy = ["tests/", "src/"]
# The CRD drift test compares generated CRDs with the checkout's files, which are not staged.
pytest_add_cli_args = ["--ignore=tests/unit/test_crds.py", "-p", "no:cacheprovider"]

[tool.pytest.ini_options]
asyncio_mode = "auto"
asyncio_default_fixture_loop_scope = "session"
timeout = 600
EOF

cd "$work"
"$repo/.venv/bin/mutmut" run > run.log 2>&1 || { tail -40 run.log; exit 1; }
"$repo/.venv/bin/mutmut" results --all true > results.txt
"$repo/.venv/bin/python" - "${modules[@]}" <<'PY'
import collections, json, re, sys
counts = collections.defaultdict(collections.Counter)
for line in open("results.txt"):
    # Functions are x_NAME, methods xǁCLASSǁNAME.
    m = re.match(r"\s*([\w.]+?)\.x[_ǁ]\S+__mutmut_\d+: (.+)", line)
    if m:
        counts[m.group(1)][m.group(2).strip()] += 1
scores = {}
for path in sys.argv[1:]:
    module = path.removesuffix(".py").replace("/", ".")
    c = counts.get(module, collections.Counter())
    total = sum(c.values())
    scores[module] = {"mutants": total, **dict(c), "score": round(c["killed"] / total, 3) if total else None}
    print(f"{module:40s} {c['killed']:5d} killed of {total:5d}  "
          + (f"{100 * c['killed'] / total:5.1f}%" if total else "   -  ") + "  " + json.dumps(dict(c)))
json.dump(scores, open("scores.json", "w"), indent=1)
PY

# What each surviving mutant changed, per module (survivors/<module>.txt): the tests to write next.
"$repo/.venv/bin/python" - <<'PY'
import ast, collections, difflib, re
from pathlib import Path

survivors = collections.defaultdict(list)
for line in open("results.txt"):
    m = re.match(r"\s*([\w.]+?)\.(x[_ǁ]\S+?)__mutmut_(\d+): survived", line)
    if m:
        survivors[m.group(1)].append((m.group(2), m.group(3)))
Path("survivors").mkdir(exist_ok=True)
for module, mutants in survivors.items():
    source = (Path("mutants/src") / (module.replace(".", "/") + ".py")).read_text()
    lines = source.splitlines()
    defs = {n.name: lines[n.lineno - 1:n.end_lineno] for n in ast.walk(ast.parse(source))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    out = []
    for function, number in mutants:
        original, mutant = defs[f"{function}__mutmut_orig"], defs[f"{function}__mutmut_{number}"]
        mutant = [line.replace(f"__mutmut_{number}", "__mutmut_orig") for line in mutant]
        diff = list(difflib.unified_diff(original, mutant, lineterm="", n=1))[2:]
        out.append(f"## {module}.{function[2:].replace('ǁ', '.')} mutant {number}\n" + "\n".join(diff) + "\n")
    Path(f"survivors/{module}.txt").write_text("\n".join(out))
PY
echo "surviving mutants, per module: $work/survivors/"
