#!/usr/bin/env bash
# One prepared session on a lent GPU machine: what matters measured first, the whole script inside 8 minutes of
# device time (install included), each part under its own time limit, JSON under $OUT.
#
#   benchmarks/gpu_session.sh prepare   HERE, once (needs PyPI): fills build/gpu-deps/ (git-ignored) with what the
#                                       device image lacks: ray (trimmed, .tar.xz: its 79 MB wheel is over the
#                                       64 MiB a device call carries), deepspeed (pure Python, from .venv), and
#                                       cp312 wheels of pydantic, jsonschema, simplejpeg, ... at .venv's versions.
#   benchmarks/gpu_session.sh plan      HERE or there: prints the parts, their order, limits and commands; runs
#                                       nothing (the dry run).
#   benchmarks/gpu_session.sh           THERE: device `run` with command "bash benchmarks/gpu_session.sh",
#                                       carry ["build/gpu-deps"], timeout_s 600 (the script ends by BUDGET_S).
#
# Order (PARTS): the ViT-L/14 objective benchmark (MFU, images/s, peak memory, parameter dtypes: fp32 teacher),
# then the embedding benchmark (ViT-L/14 bf16 images/s), then the `-m gpu` tests, then the pretrain job benchmark.
# Time: the session has BUDGET_S seconds from its start (default 450); each part runs under
# `timeout min(its cap, what is left - KILL_GRACE_S)` and is skipped when under MIN_PART_S would be left, so the
# script is over within BUDGET_S + a few seconds (< 8 min) whatever hangs. A part cut short still counts: its JSON
# says so.
# Files back in $OUT (at most 8 come back): summary.json (device, versions, per part: rc, seconds, limit, timed
# out, skipped), one <part>.json per part (the benchmark's own JSON; for pytest_gpu the junit counts and failures;
# a part that wrote none gets {"error": ...} with its log's tail), session.log (every part's output, head and tail).
# Not installable there (too large to carry): nvidia-dali (~600 MB) and cuCIM; their gpu tests skip or error at
# collection, and the data loaders fall back to the torch/CPU paths. Figures go in benchmarks/RESULTS.md with the
# date and the device line of summary.json.
set -uo pipefail
cd "$(dirname "$0")/.."
DEPS=build/gpu-deps
PY=${PY:-python3}
BUDGET_S=${BUDGET_S:-450}
KILL_GRACE_S=10  # `timeout -k`: a part that ignores SIGTERM is killed this long after its limit
MIN_PART_S=15
PARTS=(objective:110 embed:100 pytest_gpu:60 pretrain:240)  # name:cap seconds, in the order they run

part_objective() {  # ViT-L/14 + UNI/Phikon/CONCH at random init, batch 32, bf16 autocast over fp32 parameters
    $PY benchmarks/bench_objective.py --preset vitl --device cuda --warmup 2 --repeats 5 --json "$OUT/objective.json"
}
part_embed() {  # CPU section cut to one small run; then ViT-L/14 bf16 model-only and stage images/s
    $PY benchmarks/bench_embed.py --models tiny --workers 8 --repeats 1 --tiles 256 --gpu --gpu-tiles 8192 \
        --json "$OUT/embed.json"
}
part_pytest_gpu() {
    $PY -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors --junitxml=/tmp/pytest_gpu.xml tests
}
part_pretrain() {  # bf16 job vs plain loop; a failed bf16 job is rerun in fp32; the JSON is rewritten per run
    $PY benchmarks/bench_pretrain.py --no-cpu --gpu --json "$OUT/pretrain.json"
}
export -f part_objective part_embed part_pytest_gpu part_pretrain

prepare() {
    local venv=.venv/bin/python tmp
    tmp=$(mktemp -d)
    rm -rf "$DEPS" && mkdir -p "$DEPS/wheels"
    local pkgs=() p
    for p in pydantic pydantic-core annotated-types typing-inspection hjson simplejpeg braceexpand jsonschema \
             jsonschema-specifications referencing rpds-py tensorboardX; do
        pkgs+=("$p==$($venv -c "import importlib.metadata as m; print(m.version('$p'))")")
    done
    local plat=(--only-binary=:all: --no-deps --python-version 3.12 --implementation cp
                --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    $venv -m pip download -q "${plat[@]}" -d "$DEPS/wheels" "${pkgs[@]}" || return 1
    local ray_version site
    ray_version=$($venv -c "import ray; print(ray.__version__)")
    $venv -m pip download -q "${plat[@]}" -d "$tmp" "ray==$ray_version" || return 1
    unzip -q "$tmp"/ray-*.whl -d "$tmp/ray"  # unzip keeps the binaries' exec bits (raylet, gcs_server)
    rm -rf "$tmp"/ray/ray/{jars,rllib,serve,llm,dashboard/client}
    tar -C "$tmp/ray" -cJf "$DEPS/ray.tar.xz" .
    site=$($venv -c "import importlib.util as u, os; print(os.path.dirname(os.path.dirname(u.find_spec('deepspeed').origin)))")
    tar -C "$site" -cJf "$DEPS/deepspeed.tar.xz" --exclude=__pycache__ deepspeed \
        "$(cd "$site" && ls -d deepspeed-*.dist-info)"
    rm -rf "$tmp"
    du -sh "$DEPS"
    echo "carry [\"$DEPS\"] (the working tree and it must stay under 64 MiB)"
}

install_deps() {  # limit: 90 s in all (pip from local wheels, then two .tar.xz)
    local site=/tmp/gpfm-site
    if [ ! -d "$DEPS" ]; then
        echo "no $DEPS: run 'benchmarks/gpu_session.sh prepare' on the CPU machine and carry it"
        return 1
    fi
    timeout -k 5 45 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "$DEPS"/wheels/*.whl || return 1
    timeout -k 5 45 $PY - "$site" "$DEPS"/*.tar.xz <<'EOF' || return 1
import sys, tarfile
for archive in sys.argv[2:]:
    with tarfile.open(archive) as tar:
        tar.extractall(sys.argv[1], filter="fully_trusted")
EOF
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
}

# run_part NAME CAP: the part's function under `timeout`, clamped to the budget left; output into session.log
# (head and tail), a record into /tmp/gpu-session-parts.jsonl, and $OUT/NAME.json made sure of.
run_part() {
    local name=$1 cap=$2 left limit start rc=0 skipped=0
    left=$((DEADLINE - $(date +%s) - KILL_GRACE_S))
    limit=$((cap < left ? cap : left))
    start=$(date +%s)
    if [ "$limit" -lt "$MIN_PART_S" ]; then
        skipped=1 rc=-1
        echo "=== $name skipped: ${left} s of the budget left" | tee -a "$OUT/session.log"
        : >"/tmp/part-$name.log"
    else
        echo "=== $name (limit ${limit} s)" | tee -a "$OUT/session.log"
        timeout -k "$KILL_GRACE_S" "$limit" bash -c "part_$name" >"/tmp/part-$name.log" 2>&1
        rc=$?
        if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then  # killed: stop the Ray processes it left holding the GPU
            timeout 10 $PY -m ray.scripts.scripts stop --force >>"/tmp/part-$name.log" 2>&1
        fi
        { head -c 300000 "/tmp/part-$name.log"; echo "[...]"; tail -c 1500000 "/tmp/part-$name.log"; } \
            >>"$OUT/session.log"
    fi
    $PY - "$OUT" "$name" "$rc" "$(($(date +%s) - start))" "$limit" "$skipped" <<'EOF'
import json, os, sys
import xml.etree.ElementTree as ET
out, name, rc, seconds, limit, skipped = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), \
    int(sys.argv[5]), sys.argv[6] == "1"
record = {"part": name, "rc": rc, "seconds": seconds, "limit_s": limit, "timed_out": rc in (124, 137),
          "skipped": skipped}
path = os.path.join(out, f"{name}.json")
if name == "pytest_gpu" and os.path.exists("/tmp/pytest_gpu.xml"):
    suite = ET.parse("/tmp/pytest_gpu.xml").getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    failed = [{"test": f"{case.get('classname')}::{case.get('name')}", "message": (bad.get("message") or "")[:500]}
              for case in suite.iter("testcase") for bad in case if bad.tag in ("failure", "error")]
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    json.dump({**record, **counts, "failed": failed}, open(path, "w"), indent=2)
elif not os.path.exists(path):
    with open(f"/tmp/part-{name}.log", errors="replace") as log:
        tail = log.read()[-3000:]
    why = "skipped: budget spent" if skipped else "timed out" if record["timed_out"] else "no JSON written"
    json.dump({**record, "error": why, "log_tail": tail}, open(path, "w"), indent=2)
with open("/tmp/gpu-session-parts.jsonl", "a") as fh:
    fh.write(json.dumps(record) + "\n")
print(f"{name} rc={rc} {seconds} s (limit {limit} s){' SKIPPED' if skipped else ''}")
EOF
}

write_summary() {
    $PY - "$OUT" "$BUDGET_S" "$INSTALL_RC" "$(($(date +%s) - START))" <<'EOF'
import json, platform, subprocess, sys
out, budget, install_rc, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def run(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"unavailable: {err}"
versions = run(sys.executable, "-c", "import importlib.metadata as m, torch; print(torch.__version__, "
               "torch.version.cuda, *(m.version(p) for p in ('ray', 'deepspeed')))")
parts = [json.loads(line) for line in open("/tmp/gpu-session-parts.jsonl")]
summary = {"budget_s": budget, "total_s": total, "install_rc": install_rc, "python": platform.python_version(),
           "device": run("nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"),
           "torch_cuda_ray_deepspeed": versions, "parts": parts}
json.dump(summary, open(f"{out}/summary.json", "w"), indent=2)
print(json.dumps(summary, indent=2))
EOF
}

session() {
    START=$(date +%s)
    DEADLINE=$((START + BUDGET_S))
    OUT=${OUT:-$PWD/out/gpu-session}
    mkdir -p "$OUT"
    rm -f /tmp/gpu-session-parts.jsonl /tmp/pytest_gpu.xml
    export OUT PY DS_ACCELERATOR=cuda DS_BUILD_OPS=0 RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
    export TORCH_EXTENSIONS_DIR=/tmp/torch-extensions PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    echo "=== install" | tee -a "$OUT/session.log"
    install_deps >>"$OUT/session.log" 2>&1  # not in a subshell: it exports PYTHONPATH into this shell
    INSTALL_RC=$?
    echo "install rc=$INSTALL_RC $(($(date +%s) - START)) s" | tee -a "$OUT/session.log"
    local part
    for part in "${PARTS[@]}"; do
        run_part "${part%%:*}" "${part##*:}"
    done
    write_summary
}

plan() {
    local part total=0
    echo "budget ${BUDGET_S} s from the start, install included (install: up to 90 s); a part gets"
    echo "min(cap, budget left - ${KILL_GRACE_S} s) and is skipped under ${MIN_PART_S} s; \$OUT files: summary.json," \
         "session.log and one <part>.json each"
    for part in "${PARTS[@]}"; do
        total=$((total + ${part##*:}))
        echo "--- ${part%%:*}: cap ${part##*:} s"
        declare -f "part_${part%%:*}" | sed -n '3,$p' | sed '$d'
    done
    echo "caps sum to ${total} s; the budget, not the caps, bounds the session"
}

case "${1:-session}" in
    prepare) prepare ;;
    plan) plan ;;
    session) session ;;
    *) echo "usage: $0 [prepare|plan|session]" >&2; exit 2 ;;
esac
