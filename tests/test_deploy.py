"""The files under deploy/ and the cluster docs: valid for the tools that read them, and in step with the CLI.

No cluster and no network: the cluster-launcher YAML is validated against the schema that the installed ray
ships, the KubeRay manifests are checked for the structure the docs rely on, and every `raylora ...` command
line written in deploy/ and in the cluster docs is parsed by raylora's own argument parser.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from raylora.cli import _build_parser

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
RAYCLUSTER = DEPLOY / "kuberay" / "raycluster.yaml"
RAYJOB = DEPLOY / "kuberay" / "rayjob.yaml"
LAUNCHER = DEPLOY / "cluster-launcher" / "aws.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
DRAFT = ROOT / "docs" / "cluster_readme_draft.md"
README_SECTION = "## From laptop to cluster"
IMAGE_DIR = "/home/ray/raylora/"  # where deploy/Dockerfile puts the repository
SHARED_MOUNT = "/mnt/raylora"  # the ReadWriteMany volume of the KubeRay manifests
OFFICIAL_TAG = re.compile(r"rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py3(?P<py>\d+)-cu(?P<cuda>\d{3})")


def ray_minor() -> str:
    return ".".join(importlib.metadata.version("ray").split(".")[:2])


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def one(path: Path, kind: str) -> dict:
    docs = [doc for doc in load_all(path) if doc.get("kind") == kind]
    assert len(docs) == 1, f"{path.name}: expected one {kind}, found {len(docs)}"
    return docs[0]


def cluster_specs() -> list[tuple[str, dict]]:
    """The RayCluster specs: the standalone cluster's and the one the RayJob creates."""
    return [
        ("raycluster.yaml", one(RAYCLUSTER, "RayCluster")["spec"]),
        ("rayjob.yaml", one(RAYJOB, "RayJob")["spec"]["rayClusterSpec"]),
    ]


def pod_specs(spec: dict) -> list[tuple[str, dict]]:
    pods = [("head", spec["headGroupSpec"]["template"]["spec"])]
    pods += [(group["groupName"], group["template"]["spec"]) for group in spec["workerGroupSpecs"]]
    return pods


# ---------------------------------------------------------------- command lines in the docs and manifests


def doc_sources() -> dict[str, str]:
    """Every text that shows `raylora` commands to a user of a cluster."""
    sources = {str(p.relative_to(ROOT)): p.read_text() for p in sorted(DEPLOY.rglob("*.yaml"))}
    sources["deploy/README.md"] = (DEPLOY / "README.md").read_text()
    if DRAFT.exists():
        sources[str(DRAFT.relative_to(ROOT))] = DRAFT.read_text()
    readme = (ROOT / "README.md").read_text()
    if README_SECTION in readme:  # the draft once merged: the section up to the next level-2 heading
        section = readme.split(README_SECTION, 1)[1].split("\n## ", 1)[0]
        sources["README.md (From laptop to cluster)"] = section
    return sources


def command_lines(text: str) -> list[str]:
    """`raylora ...` commands in a text: lines that start with one (after `#`, `$` or indentation), what
    follows ` -- ` in a `ray job submit` line, and inline code spans."""
    found = []
    for raw in text.splitlines():
        line = raw.strip().lstrip("#$").strip()
        if line.startswith("raylora "):
            found.append(line)
        elif " -- raylora " in line:
            found.append("raylora " + line.split(" -- raylora ", 1)[1])
    found += re.findall(r"`(raylora [^`]+)`", text)
    return found


def entrypoints() -> list[str]:
    return [one(RAYJOB, "RayJob")["spec"]["entrypoint"]]


def subcommands() -> set[str]:
    parser = _build_parser()
    return set(next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices)


def parse(command: str) -> argparse.Namespace:
    argv = shlex.split(command, comments=True)
    assert argv[0] == "raylora", command
    try:
        return _build_parser().parse_args(argv[1:])
    except SystemExit as error:  # argparse reports a bad command line by exiting
        raise AssertionError(f"`{command}` does not parse with the raylora CLI (exit {error.code})") from None


def all_commands() -> list[tuple[str, str]]:
    found = [(name, cmd) for name, text in doc_sources().items() for cmd in command_lines(text)]
    return found + [("rayjob.yaml entrypoint", cmd) for cmd in entrypoints()]


def test_the_docs_show_every_cluster_command():
    """The extraction finds what the docs must show; an empty list would make the parse test vacuous."""
    shown = {tuple(shlex.split(cmd, comments=True)[1:3]) for _, cmd in all_commands()}
    for expected in [("submit",), ("run",), ("jobs", "status"), ("jobs", "logs"), ("jobs", "stop")]:
        assert any(s[: len(expected)] == expected for s in shown), f"no `raylora {' '.join(expected)}` shown"
    assert any(name.endswith("draft.md") or name.startswith("README.md") for name, _ in all_commands()), (
        "neither docs/cluster_readme_draft.md nor README.md's cluster section shows a raylora command"
    )


@pytest.mark.parametrize("where, command", all_commands(), ids=lambda v: v if len(v) < 60 else v[:57] + "...")
def test_command_parses_with_the_cli(where, command):
    argv = shlex.split(command, comments=True)
    if len(argv) < 3:  # a mention of a subcommand in prose, e.g. `raylora submit`
        assert argv[1:] and argv[1] in subcommands(), f"{where}: `{command}` names no raylora subcommand"
        return
    args = parse(command)
    if args.command in ("run", "submit"):
        sweep = args.sweep_file.removeprefix(IMAGE_DIR)
        assert (ROOT / sweep).is_file(), f"{where}: `{command}` names {args.sweep_file}, which is not shipped"
        if args.storage_path is not None:
            assert args.storage_path.startswith(("s3://", "gs://", SHARED_MOUNT + "/")), (
                f"{where}: `{command}`: a cluster's --storage-path must be shared (s3://, gs:// or {SHARED_MOUNT})"
            )
    if args.command in ("submit", "jobs") and args.address is not None:
        assert re.fullmatch(r"https?://[^/\s]+:8265", args.address), (
            f"{where}: dashboard address {args.address}"
        )
    if args.command == "jobs" and args.action != "list":
        assert args.job_id, f"{where}: `{command}` needs a JOB_ID"


def test_a_bad_command_line_is_caught():
    """The parse test fails on drift: an option the CLI does not have is refused."""
    with pytest.raises(AssertionError, match="does not parse"):
        parse("raylora submit sweeps/quickstart.py --no-such-option")


# ---------------------------------------------------------------- cluster launcher


def test_cluster_launcher_yaml_validates_against_rays_schema():
    spec = importlib.util.find_spec("ray")
    schema_path = Path(spec.origin).parent / "autoscaler" / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    config = yaml.safe_load(LAUNCHER.read_text())
    jsonschema.validate(config, schema)
    assert config["provider"]["type"] == "aws"
    assert config["head_node_type"] in config["available_node_types"]


def test_cluster_launcher_token_dashboard_and_install():
    config = yaml.safe_load(LAUNCHER.read_text())
    # the token file travels to every node, and every ray start runs in token mode reading that file
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert len(starts) == 1, key
        assert "RAY_AUTH_MODE=token" in starts[0], f"{key}: a node without token mode cannot join"
        assert "RAY_AUTH_TOKEN_PATH=$HOME/.ray/auth_token" in starts[0], key
    head_start = next(c for c in config["head_start_ray_commands"] if "ray start" in c)
    assert "--head" in head_start and "--dashboard-host=127.0.0.1" in head_start
    assert "--dashboard-port=8265" in head_start
    # the repository is synced and installed on every node, and trials stay off the head
    assert config["file_mounts"]["~/raylora"] == "."
    assert any("pip install -e ~/raylora" in c for c in config["setup_commands"])
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}
    workers = [t for k, t in config["available_node_types"].items() if k != config["head_node_type"]]
    assert workers and all(t["min_workers"] <= t["max_workers"] for t in workers)


# ---------------------------------------------------------------- images


def official_tags() -> list[tuple[str, re.Match]]:
    tags = []
    for path in (DOCKERFILE, LAUNCHER):
        for match in OFFICIAL_TAG.finditer(path.read_text()):
            tags.append((path.name, match))
    return tags


def test_images_are_the_installed_rays_version():
    tags = official_tags()
    assert {name for name, _ in tags} == {"Dockerfile", "aws.yaml"}
    for name, match in tags:
        assert match["ray"].rsplit(".", 1)[0] == ray_minor(), f"{name}: {match[0]} is not ray {ray_minor()}"
        assert int(match["py"]) >= 11, f"{name}: {match[0]}: raylora needs Python 3.11+"
    launcher_image = yaml.safe_load(LAUNCHER.read_text())["docker"]["image"]
    assert OFFICIAL_TAG.fullmatch(launcher_image), launcher_image
    # the KubeRay pods run the image deploy/Dockerfile builds; its tag names the Ray version
    for where, spec in cluster_specs():
        assert spec["rayVersion"].rsplit(".", 1)[0] == ray_minor(), where
        for pod_name, pod in pod_specs(spec):
            image = pod["containers"][0]["image"]
            assert image.endswith(f"-ray{ray_minor()}"), f"{where} {pod_name}: {image}"


def test_dockerfile_installs_raylora_and_bakes_in_no_secret():
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG RAY_IMAGE=(\S+)$", text, re.MULTILINE)
    assert base and OFFICIAL_TAG.fullmatch(base[1]) and "FROM ${RAY_IMAGE}" in text
    copied = {word for line in re.findall(r"^COPY (.*)$", text, re.MULTILINE) for word in line.split()}
    assert {"pyproject.toml", "raylora", "sweeps"} <= copied, "the image must hold the package and the sweeps"
    assert re.search(r"pip install [^\n]*\s\.\s", text) and "bitsandbytes" in text
    for line in re.findall(r"^(?:ENV|ARG) .*$", text, re.MULTILINE):
        assert not re.search(r"token|secret|password|key", line, re.IGNORECASE), line


# ---------------------------------------------------------------- KubeRay manifests


def test_kuberay_kinds_and_api_version():
    kinds = [("v1", "PersistentVolumeClaim")]
    assert [(d["apiVersion"], d["kind"]) for d in load_all(RAYCLUSTER)] == [
        *kinds,
        ("ray.io/v1", "RayCluster"),
    ]
    assert [(d["apiVersion"], d["kind"]) for d in load_all(RAYJOB)] == [*kinds, ("ray.io/v1", "RayJob")]
    # applying both files must not fight over the claim
    assert one(RAYCLUSTER, "PersistentVolumeClaim") == one(RAYJOB, "PersistentVolumeClaim")
    job = one(RAYJOB, "RayJob")["spec"]
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0
    assert "clusterSelector" not in job  # it creates its own cluster from rayClusterSpec


def test_head_exposes_the_dashboard_and_runs_no_trials():
    for where, spec in cluster_specs():
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0", where
        container = head["template"]["spec"]["containers"][0]
        ports = {p["containerPort"]: p.get("name") for p in container["ports"]}
        assert ports.get(8265) == "dashboard", f"{where}: head must expose the dashboard on 8265"
        assert 6379 in ports, where
        assert "nvidia.com/gpu" not in json.dumps(container.get("resources", {})), where


def test_worker_groups_have_gpus_and_sane_bounds():
    for where, spec in cluster_specs():
        for group in spec["workerGroupSpecs"]:
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], where
            container = group["template"]["spec"]["containers"][0]
            assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1, where
            assert (
                container["resources"]["requests"]["nvidia.com/gpu"]
                == container["resources"]["limits"]["nvidia.com/gpu"]
            )


def test_ray_start_params_are_strings():
    """KubeRay's rayStartParams is map[string]string: an unquoted number is refused by the API server."""
    for where, spec in cluster_specs():
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for group in groups:
            for key, value in group["rayStartParams"].items():
                assert isinstance(value, str), f"{where}: rayStartParams.{key} must be a quoted string"


def token_source(spec: dict, container: dict) -> str:
    """Where a Ray container's token comes from: the operator (authOptions) or the env it declares."""
    env = {e["name"]: e for e in container.get("env", [])}
    declared = {name: env[name] for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN") if name in env}
    if spec.get("authOptions", {}).get("mode") == "token":
        # the operator sets both only where they are absent: a declared one would override the cluster's
        assert not declared, f"{container['name']} declares {sorted(declared)} beside authOptions"
        return f"operator secret {spec['authOptions'].get('secretName', '<cluster name>')}"
    assert declared.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{container['name']}: no token mode"
    ref = declared["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    return f"secret {ref['name']}/{ref['key']}"


def test_every_ray_container_gets_the_same_token():
    for where, spec in cluster_specs():
        version = tuple(int(part) for part in spec["rayVersion"].split(".")[:2])
        assert version >= (2, 52), f"{where}: token auth (authOptions) needs Ray 2.52+"
        sources = {}
        for pod_name, pod in pod_specs(spec):
            containers = pod["containers"]
            assert containers[0]["name"].startswith("ray-"), (
                f"{where} {pod_name}: Ray container must be first"
            )
            for container in containers:
                sources[(pod_name, container["name"])] = token_source(spec, container)
        assert len(set(sources.values())) == 1, f"{where}: token sources differ: {sources}"


def test_shared_volume_is_mounted_at_the_same_path_everywhere():
    claim = one(RAYCLUSTER, "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for where, spec in cluster_specs():
        mounts = set()
        for pod_name, pod in pod_specs(spec):
            volumes = {
                v["name"]
                for v in pod["volumes"]
                if v.get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"]
            }
            assert len(volumes) == 1, f"{where} {pod_name}: the shared claim is not a volume"
            paths = [m["mountPath"] for m in pod["containers"][0]["volumeMounts"] if m["name"] in volumes]
            assert len(paths) == 1, (
                f"{where} {pod_name}: the shared volume is not mounted in the Ray container"
            )
            mounts.add(paths[0])
        assert mounts == {SHARED_MOUNT}, f"{where}: mounted at {mounts}"
    entrypoint = parse(one(RAYJOB, "RayJob")["spec"]["entrypoint"])
    assert entrypoint.storage_path.startswith(SHARED_MOUNT + "/")


def test_pods_get_the_hf_token_from_a_secret_and_mlflow_in_cluster():
    for where, spec in cluster_specs():
        for pod_name, pod in pod_specs(spec):
            env = {e["name"]: e for e in pod["containers"][0]["env"]}
            assert "secretKeyRef" in env["HF_TOKEN"]["valueFrom"], f"{where} {pod_name}"
            assert "value" not in env["HF_TOKEN"], f"{where} {pod_name}: HF_TOKEN written in the manifest"
            uri = env["MLFLOW_TRACKING_URI"]["value"]
            assert re.fullmatch(r"http://[\w.-]+\.svc\.cluster\.local:\d+", uri), f"{where} {pod_name}: {uri}"
            for e in pod["containers"][0]["env"]:
                assert "value" not in e or isinstance(e["value"], str), (
                    f"{where}: env {e['name']} not a string"
                )
