"""cluster/ and docs/cluster.md: every config parses, passes the validation its own tool applies (Ray's cluster
launcher schema, Ray's runtime_env checks, Ray's and gpfm-scale's CLI parsers) and refers only to entry points,
files and metric names that exist. No Ray instance is started.

Metric names come from the catalogue (`gpfm_scale.metrics.definitions.CATALOGUE`, every metric of every stage),
so a metric added there without a dashboard panel fails `test_every_catalogue_metric_has_a_panel`, naming it.
Ray's own metrics may appear in the dashboard only if listed in RAY_SYSTEM_METRICS (checked against the panels Ray
ships for its own dashboard).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import re
import shlex
import sys
import tomllib
from pathlib import Path

import click
import pytest
import yaml

from gpfm_scale.metrics.definitions import CATALOGUE, DEFAULT_PORT, DRIVER_REGISTRY, MetricSpec

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
DASHBOARD = CLUSTER / "grafana" / "gpfm-dashboard.json"
LAUNCHERS = ["aws.yaml", "gcp.yaml"]
GPU_NODES = {"aws.yaml": {"p4d.24xlarge", "p4de.24xlarge", "p5.48xlarge"},
             "gcp.yaml": {"a2-highgpu-8g", "a2-ultragpu-8g", "a3-highgpu-8g"}}
# GB of memory per GPU of each 8-GPU machine type: the recipe (ViT-L/14, 96 images per GPU, experts) needs 80.
GPU_MEMORY_GB = {"p4d.24xlarge": 40, "p4de.24xlarge": 80, "p5.48xlarge": 80,
                 "a2-highgpu-8g": 40, "a2-ultragpu-8g": 80, "a3-highgpu-8g": 80}
# (vCPUs, memory GiB) of the machine types the KubeRay pod sizes name (cloud providers' published figures).
MACHINES = {"a2-ultragpu-8g": (96, 1360 / 1.073741824), "p4de.24xlarge": (96, 1152), "p5.48xlarge": (192, 2048),
            "n2-standard-64": (64, 256 / 1.073741824), "m6i.16xlarge": (64, 256)}
# Ray system metrics the dashboard may query besides gpfm_* (documented in docs/cluster.md, "Metrics").
RAY_SYSTEM_METRICS = frozenset({"ray_object_store_memory", "ray_node_gpus_utilization"})
# file_mounts sources the user makes before `ray up` (docs/cluster.md, step 1); every other source must exist.
USER_MADE_MOUNTS = {"./dist", "~/.ray/auth_token"}
STAGE_ROWS = {"tiling": "Tiling", "pretrain": "Pretraining", "embed": "Embedding"}


def load_yaml(rel: str) -> dict:
    return yaml.safe_load((REPO / rel).read_text())


# ---------------------------------------------------------------- catalogue and PromQL helpers

def exposed_names() -> dict[str, str]:
    """Metric name -> the name Prometheus stores: counters get `_total` (prometheus_client and Ray alike)."""
    return {m.name: m.name + ("_total" if m.kind == "counter" else "") for m in CATALOGUE}


def test_catalogue_covers_every_driver_metric():
    """The catalogue is the dashboard's source of truth: nothing registered for the driver endpoint escapes it."""
    registered = {f.name for f in DRIVER_REGISTRY.collect()}
    assert registered and registered <= set(exposed_names())


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right",
             "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers that are not functions, keywords, labels or durations."""
    text = _STRING.sub(" ", expr)
    for pattern in (r"\{[^}]*\}", r"\[[^\]]*\]", _GROUPING.pattern, r"\$\{?\w+\}?"):
        text = re.sub(pattern, " ", text)
    return {m.group() for m in _IDENT.finditer(text)
            if m.group().lower() not in _KEYWORDS and not text[m.end():].lstrip().startswith("(")}


def test_promql_metric_names_on_a_hand_written_query():
    expr = ('sum by (status) (rate(gpfm_a_total{job="x"}[1m])) / on() group_left max(ray_b offset 5m) '
            '* 1e3 + histogram_quantile(0.95, sum by (le) (rate(c_bucket[$__rate_interval])))')
    assert promql_metric_names(expr) == {"gpfm_a_total", "ray_b", "c_bucket"}


# ---------------------------------------------------------------- Ray cluster launcher YAMLs

@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_config_passes_ray_up_validation(name):
    """The steps `ray up` runs before touching the cloud: defaults merged, then Ray's JSON schema + checks."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(load_yaml(f"cluster/{name}")))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_has_cpu_head_gpu_and_cpu_worker_types(name):
    cfg = load_yaml(f"cluster/{name}")
    types = cfg["available_node_types"]
    machine = {t: spec["node_config"].get("InstanceType") or spec["node_config"].get("machineType")
               for t, spec in types.items()}
    head = cfg["head_node_type"]
    assert types[head]["resources"] == {"CPU": 0}, "the head must not take tiling actors or training workers"
    assert machine[head] not in GPU_NODES[name]
    gpu = [t for t in types if machine[t] in GPU_NODES[name]]
    cpu = [t for t in types if t != head and machine[t] not in GPU_NODES[name]]
    assert len(gpu) == 1 and len(cpu) == 1, machine
    if name == "gcp.yaml":  # GCP does not detect resources from the machine type
        assert types[gpu[0]]["resources"]["GPU"] == 8
        assert "GPU" not in types[cpu[0]]["resources"]
    assert cfg["max_workers"] >= types[gpu[0]]["max_workers"] + types[cpu[0]]["max_workers"]


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_ray_start_commands_parse_and_export_metrics(name):
    """Every `ray start` line parses with Ray 2.60's own CLI and exports metrics on 8080 with token auth."""
    from ray.scripts.scripts import start

    cfg = load_yaml(f"cluster/{name}")
    for key, head in (("head_start_ray_commands", True), ("worker_start_ray_commands", False)):
        starts = [c for c in cfg[key] if "ray start" in c]
        assert len(starts) == 1, cfg[key]
        prefix, _, rest = starts[0].partition("ray start")
        assert "RAY_AUTH_MODE=token" in prefix
        assert "RAY_EXPORT_COUNTER_AS_GAUGE=0" in prefix, "a counter must reach Prometheus under one name"
        params = start.make_context("start", shlex.split(rest)).params
        assert params["metrics_export_port"] == 8080
        assert params["head"] is head
        if head:
            assert params["num_cpus"] == 0
            assert params["autoscaling_config"] == "~/ray_bootstrap_config.yaml"
        else:
            assert params["address"] == "$RAY_HEAD_IP:6379"


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_file_mounts_and_install_line(name):
    cfg = load_yaml(f"cluster/{name}")
    mounts = cfg["file_mounts"]
    for remote, local in mounts.items():
        if local not in USER_MADE_MOUNTS:
            assert (REPO / local).exists(), f"{name}: file_mounts {remote}: {local} does not exist"
    assert mounts["~/.ray/auth_token"] == "~/.ray/auth_token", "job client and nodes must share the token"
    dist_remote = next(r for r, loc in mounts.items() if loc == "./dist")
    install = next(c for c in cfg["setup_commands"] if "pip install" in c and "torch==" in c)
    import ray

    assert f"{dist_remote}/gpfm_scale-*.whl" in install
    assert f'"ray[data,train,default]=={ray.__version__}"' in install, "cluster Ray must match the client's"
    assert "gpfm_scale-*.whl)[all]" in install, "nodes need every extra (DeepSpeed, cuCIM, DALI)"
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [d for d in deps if d.startswith(("torch==", "torchvision=="))]
    assert len(pins) == 2 and all(pin in install for pin in pins), f"torch pins of pyproject {pins} not in {install}"
    setup = " ".join(cfg["setup_commands"])
    assert "ln -sfn /mnt/gpfm/weights /weights" in setup


def test_recipe_expert_weights_live_under_weights():
    """The launchers and KubeRay expose the shared weights folder as /weights: the recipe's paths must use it."""
    recipe = load_yaml("gpfm_scale/configs/vitl14_gpfm.yaml")
    paths = [e["weights"] for e in recipe["objective"]["model"]["experts"]]
    assert paths and all(p.startswith("/weights/") for p in paths), paths


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_default_gpu_type_has_the_memory_the_recipe_needs(name):
    types = load_yaml(f"cluster/{name}")["available_node_types"]
    machine = {t: spec["node_config"].get("InstanceType") or spec["node_config"].get("machineType")
               for t, spec in types.items()}
    gpu = [m for m in machine.values() if m in GPU_NODES[name]]
    assert gpu and all(GPU_MEMORY_GB[m] >= 80 for m in gpu), gpu


def test_aws_gpu_nodes_share_one_subnet_a_cluster_placement_group_and_efa():
    """NCCL between nodes needs EFA, one AZ and a cluster placement group. Ray's rule for NetworkInterfaces
    (ray/autoscaler/_private/aws/config.py, `_configure_subnets_and_groups_from_network_interfaces`; importing it
    needs boto3): subnets and security groups only per interface, and every interface has both."""
    node = load_yaml("cluster/aws.yaml")["available_node_types"]["gpu_8x"]
    cfg = node["node_config"]
    assert cfg["Placement"]["GroupName"], "GPU nodes must launch into a cluster placement group"
    nics = cfg["NetworkInterfaces"]
    assert {n["InterfaceType"] for n in nics} == {"efa"}
    assert len({n["SubnetId"] for n in nics}) == 1, "every GPU interface in one subnet (one availability zone)"
    cards = sorted(n["NetworkCardIndex"] for n in nics)
    assert cards == list(range(32 if cfg["InstanceType"] == "p5.48xlarge" else len(nics)))
    primary = [n for n in nics if n["DeviceIndex"] == 0]
    assert len(primary) == 1 and primary[0]["NetworkCardIndex"] == 0
    assert not {"SubnetId", "SubnetIds", "SecurityGroupIds"} & set(cfg)
    assert all(n["SubnetId"] and n["Groups"] for n in nics)
    setup = " ".join(node["worker_setup_commands"])
    assert "FI_PROVIDER=efa" in setup and "FI_EFA_USE_DEVICE_RDMA=1" in setup


def test_gcp_workers_carry_a_service_account_and_cpu_nodes_are_spot_not_preemptible():
    """Ray attaches a service account to the head only; `preemptible` VMs stop after 24 h, Spot VMs do not."""
    cfg = load_yaml("cluster/gcp.yaml")
    assert "preemptible" not in json.dumps(cfg)
    for name, spec in cfg["available_node_types"].items():
        if name == cfg["head_node_type"]:
            continue
        accounts = spec["node_config"].get("serviceAccounts")
        assert accounts and accounts[0]["email"].endswith(".iam.gserviceaccount.com"), name
        assert "https://www.googleapis.com/auth/cloud-platform" in accounts[0]["scopes"]
    sched = cfg["available_node_types"]["cpu_tiling"]["node_config"]["scheduling"]
    assert sched["provisioningModel"] == "SPOT" and sched["automaticRestart"] is False


def test_only_the_cpu_tiling_nodes_offer_the_tiling_resource():
    """`actor_resources: {tiling: 1}` (docs/cluster.md) must scale the CPU type alone, one actor per CPU there."""
    from gpfm_scale.tiling.config import TilingConfig

    key = "tiling"
    TilingConfig(actor_resources={key: 1})
    for name in LAUNCHERS:
        types = load_yaml(f"cluster/{name}")["available_node_types"]
        assert types["cpu_tiling"]["resources"] == {"CPU": 64, key: 64}, name
        assert [t for t, spec in types.items() if key in spec["resources"]] == ["cpu_tiling"], name
    groups = {g["groupName"]: g for g in load_yaml("cluster/kuberay/raycluster.yaml")["spec"]["workerGroupSpecs"]}
    declared = {n: json.loads(json.loads(g["rayStartParams"].get("resources", '"{}"'))) for n, g in groups.items()}
    cpus = groups["cpu-tiling"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]
    assert declared == {"gpu-8x": {}, "cpu-tiling": {key: int(cpus)}}
    doc = (REPO / "docs" / "cluster.md").read_text()
    assert "--set actor_resources='{tiling: 1}'" in doc


# ---------------------------------------------------------------- gpfm-scale commands (KubeRay, docs)

def gpfm_parser():
    """The parser behind the `gpfm-scale` entry point declared in pyproject.toml [project.scripts]."""
    target = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["gpfm-scale"]
    module = importlib.import_module(target.partition(":")[0])
    return module.build_parser()


def check_gpfm_command(argv: list[str], where: str) -> None:
    """Parse a `gpfm-scale ...` argv like the CLI would; its sub-command, flags and relative config must exist."""
    assert argv[0] == "gpfm-scale", argv
    try:
        args = gpfm_parser().parse_args(argv[1:])
    except SystemExit as err:
        pytest.fail(f"{where}: `{shlex.join(argv)}` does not parse with gpfm-scale's CLI (exit {err.code})")
    config = getattr(args, "config", None)
    if config and not config.startswith("/"):
        assert (REPO / config).is_file(), f"{where}: --config {config} is not a file of the repository"


def shell_segments(command: str) -> list[list[str]]:
    """A shell line split into simple commands at && ; | (env assignments and a .venv/bin/ prefix dropped)."""
    out, current = [], []
    for tok in shlex.split(command, comments=True) + ["&&"]:
        if tok in ("&&", ";", "||", "|"):
            while current and re.fullmatch(r"[A-Za-z_]\w*=.*", current[0]):
                current.pop(0)
            if current:
                out.append([current[0].removeprefix(".venv/bin/"), *current[1:]])
            current = []
        else:
            current.append(tok)
    return out


def test_kuberay_manifests():
    import ray

    cluster, job = load_yaml("cluster/kuberay/raycluster.yaml"), load_yaml("cluster/kuberay/rayjob.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = cluster["spec"]
    assert spec["rayVersion"] == ray.__version__ and spec["authOptions"] == {"mode": "token"}
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpus = {name: g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
            for name, g in groups.items()}
    assert sorted(gpus.values(), key=str) == ["8", None], gpus
    pods = [spec["headGroupSpec"], *groups.values()]
    for pod in pods:
        assert pod["rayStartParams"]["metrics-export-port"] == "8080"
    containers = [c for pod in pods for c in pod["template"]["spec"]["containers"]]
    assert len({c["image"] for c in containers}) == 1, "one image for every group"
    for c in containers:
        assert {"name": "RAY_EXPORT_COUNTER_AS_GAUGE", "value": "0"} in c["env"]
    for pod in pods:
        for container in pod["template"]["spec"]["containers"]:
            for seg in shell_segments(" ".join(container.get("command", []) + container.get("args", []))):
                if seg[0] == "gpfm-scale":
                    check_gpfm_command(seg, "raycluster.yaml")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    segments = shell_segments(job["spec"]["entrypoint"])
    workdir = re.search(r"^WORKDIR (\S+)$", (CLUSTER / "kuberay" / "Dockerfile").read_text(), re.MULTILINE).group(1)
    assert segments[0] == ["cd", workdir], "the entrypoint must run in the image's copy of the repository"
    commands = [s for s in segments if s[0] == "gpfm-scale"]
    assert [c[1] for c in commands] == ["pretrain"]
    check_gpfm_command(commands[0], "rayjob.yaml")
    yaml.safe_load(job["spec"]["runtimeEnvYAML"])


def _quantity_gib(q: str) -> float:
    units = {"Gi": 1.0, "Mi": 1 / 1024, "Ti": 1024.0, "G": 1 / 1.073741824, "M": 1 / 1073.741824}
    for suffix, scale in units.items():
        if q.endswith(suffix):
            return float(q[: -len(suffix)]) * scale
    return float(q) / 2**30


def _gke_allocatable(cpus: int, mem_gib: float) -> tuple[float, float]:
    """GKE's published reservations (the larger of GKE's and EKS's), less 3% for DaemonSets (GPU plugin, logging)."""
    cpu_res = 0.06 + 0.01 + 0.005 * 2 + 0.0025 * (cpus - 4)
    tiers = [(4, 0.25), (4, 0.20), (8, 0.10), (112, 0.06), (float("inf"), 0.02)]
    left, mem_res = mem_gib, 0.0
    for size, frac in tiers:
        part = min(left, size)
        mem_res, left = mem_res + part * frac, left - part
    return (cpus - cpu_res) * 0.97, (mem_gib - mem_res - 0.1) * 0.97


def test_kuberay_pods_fit_the_named_machines_and_carry_what_a_long_run_needs():
    cluster = load_yaml("cluster/kuberay/raycluster.yaml")
    spec = cluster["spec"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    fits = {"gpu-8x": ["a2-ultragpu-8g", "p4de.24xlarge", "p5.48xlarge"], "cpu-tiling": ["n2-standard-64", "m6i.16xlarge"]}
    for group, machines in fits.items():
        pod = groups[group]["template"]["spec"]
        req = pod["containers"][0]["resources"]["requests"]
        for machine in machines:
            cpus, mem = _gke_allocatable(*MACHINES[machine])
            assert float(req["cpu"]) <= cpus and _quantity_gib(req["memory"]) <= mem, (group, machine, req)
        limit = _quantity_gib(pod["containers"][0]["resources"]["limits"]["memory"])
        shm = next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"]
        assert _quantity_gib(shm["sizeLimit"]) <= limit / 2, "memory-backed /dev/shm counts against the pod's limit"
    # bucket access: one ServiceAccount for every pod, defined beside the cluster
    account = load_yaml("cluster/kuberay/serviceaccount.yaml")
    assert account["kind"] == "ServiceAccount"
    for pod in [spec["headGroupSpec"], *groups.values()]:
        assert pod["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]
    # slide staging on node-local disk, accounted for as ephemeral storage
    tiling = groups["cpu-tiling"]["template"]["spec"]
    container = tiling["containers"][0]
    assert _quantity_gib(container["resources"]["requests"]["ephemeral-storage"]) >= 100
    scratch = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}["scratch"]
    assert {"name": "TMPDIR", "value": scratch} in container["env"]
    # multi-day jobs survive a head restart
    assert spec["gcsFaultToleranceOptions"]["redisAddress"]
    # a RayJob can be submitted again: a generated name, retries, and a resuming entrypoint
    job = load_yaml("cluster/kuberay/rayjob.yaml")
    assert "name" not in job["metadata"] and job["metadata"]["generateName"]
    assert job["spec"]["backoffLimit"] >= 1 and "--resume" in job["spec"]["entrypoint"]


def test_prometheus_keeps_its_data_off_nfs():
    """Prometheus' TSDB is unsupported on NFS (EFS / Filestore, mounted at /mnt/gpfm)."""
    texts = [(CLUSTER / "prometheus" / "prometheus.yml").read_text(), (REPO / "docs" / "cluster.md").read_text()]
    paths = [m for t in texts for m in re.findall(r"--storage\.tsdb\.path=(\S+)", t)]
    assert paths and not any(p.startswith("/mnt/") for p in paths), paths


def test_podmonitor_driver_target_matches_what_the_driver_binds():
    """Prometheus scrapes the head pod's IP: a driver bound to 127.0.0.1 is unreachable, so the documented
    KubeRay commands with --metrics-port must also pass --metrics-host 0.0.0.0."""
    monitor = load_yaml("cluster/kuberay/podmonitor.yaml")
    ports = [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]]
    spec = load_yaml("cluster/kuberay/raycluster.yaml")["spec"]
    head_ports = {p["name"]: p["containerPort"] for p in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert head_ports["gpfm-driver"] == DEFAULT_PORT and "gpfm-driver" in ports
    for g in spec["workerGroupSpecs"]:
        assert all(p["name"] != "gpfm-driver" for p in g["template"]["spec"]["containers"][0]["ports"])
    doc = (REPO / "docs" / "cluster.md").read_text()
    kuberay = doc[doc.index("## KubeRay"):]
    commands = [line for line in kuberay.splitlines() if "gpfm-scale" in line and "--metrics-port" in line]
    assert commands and all("--metrics-host 0.0.0.0" in c for c in commands), commands


def test_dockerfile_copies_existing_paths_onto_the_pinned_ray_image():
    import ray

    text = (CLUSTER / "kuberay" / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray.__version__)}-py311$", text, re.MULTILINE)
    for line in re.findall(r"^COPY (.*)$", text, re.MULTILINE):
        sources = [t for t in line.split()[:-1] if not t.startswith("--")]
        for src in sources:
            assert (REPO / src).exists(), f"Dockerfile COPY {src}: not in the repository"


def test_runtime_env_is_valid_and_uploads_only_the_code(monkeypatch):
    from ray._private.runtime_env.packaging import PACKAGE_SIZE_WARNING, _dir_travel, _get_excludes
    from ray.runtime_env import RuntimeEnv

    env = load_yaml("cluster/runtime_env.yaml")
    RuntimeEnv(**env)  # Ray's own field and type checks (env_vars values must be strings, ...)
    assert env["working_dir"] == "."
    assert "DS_ACCELERATOR" not in env["env_vars"], "DeepSpeed must detect CUDA on GPU nodes"
    monkeypatch.chdir(REPO)
    files: list[Path] = []
    _dir_travel(REPO, [_get_excludes(REPO, env["excludes"])], lambda p: files.append(p) if p.is_file() else None,
                include_gitignore=True)
    uploaded = {p.relative_to(REPO).as_posix() for p in files}
    assert "gpfm_scale/configs/vitl14_gpfm.yaml" in uploaded and "gpfm_scale/cli.py" in uploaded
    heavy = sorted(u for u in uploaded if u.split("/")[0] in (".venv", ".git", "demo-output"))
    assert not heavy, heavy[:5]
    assert sum(p.stat().st_size for p in files) < PACKAGE_SIZE_WARNING


def ray_cli_params(argv: list[str]) -> dict:
    """Parse `ray ...` with Ray 2.60's click CLI down to the leaf command (no command runs); its params."""
    from ray.scripts.scripts import cli

    command, name, rest, parent = cli, "ray", argv[1:], None
    while True:
        ctx = command.make_context(name, list(rest), parent=parent)
        if not hasattr(command, "resolve_command"):
            return ctx.params
        name, command, rest = command.resolve_command(ctx, [*ctx.protected_args, *ctx.args])
        parent = ctx


def doc_shell_lines(rel: str) -> list[str]:
    blocks = re.findall(r"```(?:bash|sh|shell)\n(.*?)```", (REPO / rel).read_text(), re.DOTALL)
    return [line for block in blocks for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_cluster_doc_commands_parse(monkeypatch):
    """Every `ray` and `gpfm-scale` command of docs/cluster.md parses with the real CLIs; job entrypoints too."""
    monkeypatch.chdir(REPO)
    seen: dict[str, set[str]] = {"submit": set(), "gpfm": set()}

    def check(segment: list[str], line: str) -> None:
        if segment[0] == "gpfm-scale":
            check_gpfm_command(segment, f"docs/cluster.md: {line}")
            seen["gpfm"].add(segment[1])
        elif segment[0] == "ray":
            try:
                params = ray_cli_params(segment)
            except click.ClickException as err:
                pytest.fail(f"docs/cluster.md: `{line}` does not parse with Ray's CLI: {err}")
            if "entrypoint" in params:
                assert params["runtime_env"] == "cluster/runtime_env.yaml", line
                check(list(params["entrypoint"]), line)
                seen["submit"].add(params["entrypoint"][1])
            if segment[1] == "exec":
                for inner in shell_segments(params["cmd"]):
                    check(inner, line)

    for line in doc_shell_lines("docs/cluster.md"):
        for segment in shell_segments(line):
            check(segment, line)
    assert {"tile", "pretrain", "embed", "evaluate"} <= seen["submit"], seen


# ---------------------------------------------------------------- Prometheus

def apply_relabel(rule: dict, name: str) -> str:
    """Prometheus `replace` on __name__: the regex is anchored (RE2 full match), $1 is group 1."""
    match = re.fullmatch(rule["regex"], name)
    return rule["replacement"].replace("$1", match.group(1)) if match else name


@pytest.mark.parametrize("source", ["prometheus", "podmonitor"])
def test_relabel_gives_every_gpfm_metric_one_name(source):
    if source == "prometheus":
        job = next(j for j in load_yaml("cluster/prometheus/prometheus.yml")["scrape_configs"]
                   if j["job_name"] == "ray")
        (rule,) = job["metric_relabel_configs"]
        assert rule["source_labels"] == ["__name__"] and rule["target_label"] == "__name__"
    else:
        endpoint = load_yaml("cluster/kuberay/podmonitor.yaml")["spec"]["podMetricsEndpoints"][0]
        (rule,) = endpoint["metricRelabelings"]
        assert rule["sourceLabels"] == ["__name__"] and rule["targetLabel"] == "__name__"
    assert rule.get("action", "replace") == "replace"
    for name in exposed_names().values():
        assert apply_relabel(rule, "ray_" + name) == name
        assert apply_relabel(rule, name) == name
    for name in RAY_SYSTEM_METRICS:
        assert apply_relabel(rule, name) == name, "Ray's own metrics keep their names"


def test_prometheus_scrapes_ray_discovery_file_and_the_driver_port():
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    jobs = {j["job_name"]: j for j in load_yaml("cluster/prometheus/prometheus.yml")["scrape_configs"]}
    assert jobs["ray"]["file_sd_configs"] == [{"files": [f"/tmp/ray/{PROMETHEUS_SERVICE_DISCOVERY_FILE}"]}]
    targets = [t for sc in jobs["gpfm_driver"]["static_configs"] for t in sc["targets"]]
    assert targets == [f"localhost:{DEFAULT_PORT}"]


# ---------------------------------------------------------------- Grafana

def dashboard_panels() -> list[tuple[str, dict]]:
    """(row title, panel) for every non-row panel, in order."""
    row, out = "", []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        if panel["type"] == "row":
            row = panel["title"]
        else:
            out.append((row, panel))
    return out


def panel_names(panel: dict) -> set[str]:
    return set().union(*(promql_metric_names(t["expr"]) for t in panel["targets"]))


def test_every_catalogue_metric_has_a_panel():
    used = set().union(*(panel_names(p) for _, p in dashboard_panels()))
    missing = sorted(m for m, name in exposed_names().items() if name not in used)
    assert not missing, (f"metrics without a Grafana panel: {missing}; run "
                         "`.venv/bin/python cluster/grafana/build_dashboard.py`")


def test_dashboard_queries_only_defined_metric_names():
    known = set(exposed_names().values()) | RAY_SYSTEM_METRICS
    unknown = {f"{p['title']}: {n}" for _, p in dashboard_panels() for n in panel_names(p) - known}
    assert not unknown, f"queries name metrics the code does not define: {sorted(unknown)}"


def test_ray_system_metrics_allow_list_names_real_ray_metrics():
    import ray.dashboard.modules.metrics.dashboards.default_dashboard_panels as ray_panels

    source = Path(ray_panels.__file__).read_text()
    assert all(re.search(rf"\b{name}\b", source) for name in RAY_SYSTEM_METRICS)


def test_dashboard_panel_rules():
    """Counters through rate(..[1m]), never a gauge in rate(); each label shown in a legend; stage rows."""
    exposed = exposed_names()
    panels = dashboard_panels()
    for m in CATALOGUE:
        targets = [(row, t) for row, p in panels for t in p["targets"]
                   if exposed[m.name] in promql_metric_names(t["expr"])]
        texts = [t["expr"] for _, t in targets]
        if m.kind == "counter":
            assert any(f"rate({m.name}_total[1m])" in e for e in texts), (m.name, texts)
        else:
            assert not any(re.search(rf"rate\({m.name}\b", e) for e in texts), (m.name, texts)
        for label in m.labels:
            assert any(f"{{{{{label}}}}}" in t["legendFormat"] for _, t in targets), (m.name, label)
        stage_row = STAGE_ROWS.get(m.name.split("_")[1])
        if stage_row:
            assert {row for row, _ in targets} == {stage_row}, (m.name, {row for row, _ in targets})


def test_dashboard_structure():
    dash = json.loads(DASHBOARD.read_text())
    assert 36 <= dash["schemaVersion"] <= 41
    (var,) = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
    assert (var["name"], var["query"]) == ("datasource", "prometheus")
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    rows = [p["title"] for p in dash["panels"] if p["type"] == "row"]
    assert set(STAGE_ROWS.values()) <= set(rows)
    for _, panel in dashboard_panels():
        assert panel["datasource"]["uid"] == "${datasource}"
        assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24


def load_builder():
    """cluster/grafana/build_dashboard.py, imported from its path (cluster/ is not a package)."""
    name = "gpfm_cluster_build_dashboard"
    if name not in sys.modules:  # registered first: its dataclasses look their module up while being defined
        spec = importlib.util.spec_from_file_location(name, CLUSTER / "grafana" / "build_dashboard.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def test_dashboard_json_is_what_the_generator_writes():
    assert json.loads(DASHBOARD.read_text()) == load_builder().build_dashboard(CATALOGUE), (
        "cluster/grafana/gpfm-dashboard.json is stale: run `.venv/bin/python cluster/grafana/build_dashboard.py`")


def test_generator_rules_on_a_small_catalogue():
    """Hand-written expected queries: labelled counter, per-rank gauge, plain counter, metric of no stage row."""
    catalogue = [MetricSpec("gpfm_tiling_things", "counter", "Things.", ("status",)),
                 MetricSpec("gpfm_pretrain_rank_seconds", "gauge", "Per rank.", ("rank",), "ray_worker"),
                 MetricSpec("gpfm_embed_read_bytes", "counter", "Read."),
                 MetricSpec("gpfm_objectstore_spilled_bytes", "gauge", "Spilled.")]
    got, row = {}, ""
    for panel in load_builder().build_dashboard(catalogue)["panels"]:
        if panel["type"] == "row":
            row = panel["title"]
            continue
        targets = [(t["expr"], t["legendFormat"]) for t in panel["targets"]]
        if not any(promql_metric_names(e) & RAY_SYSTEM_METRICS for e, _ in targets):
            got[panel["title"]] = (row, panel["type"], panel["fieldConfig"]["defaults"]["unit"], targets)
    assert got == {
        "Things per second (1m rate) by status": (
            "Tiling", "timeseries", "short", [("sum by (status) (rate(gpfm_tiling_things_total[1m]))", "{{status}}")]),
        "Things (total) by status": (
            "Tiling", "stat", "short", [("sum by (status) (gpfm_tiling_things_total)", "{{status}}")]),
        "Rank seconds by rank": (
            "Pretraining", "timeseries", "s", [("max by (rank) (gpfm_pretrain_rank_seconds)", "{{rank}}")]),
        "Read bytes per second (1m rate)": (
            "Embedding", "timeseries", "Bps",
            [("sum(rate(gpfm_embed_read_bytes_total[1m]))", "gpfm_embed_read_bytes")]),
        "Objectstore spilled bytes": (
            "Ray cluster", "timeseries", "bytes",
            [("max(gpfm_objectstore_spilled_bytes)", "gpfm_objectstore_spilled_bytes")]),
    }
