"""Where the GPUs live: the SLURM script, the Kubernetes manifests, the compose file.

No scheduler, cluster or container engine runs here, so these check what can be
checked offline: the files parse, the parts agree with each other and with the
CLI (image, environment, exit codes), nothing has a default password or a
published database, and the SLURM script itself runs, as SLURM would run it,
against the real PostgreSQL.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest
import yaml
from test_distributed import TINY, assert_distinct_candidates, assert_whole

from search import launch, run
from search.records import counts

from conftest import PG_URL, ROOT

SBATCH = ROOT / "deploy" / "slurm" / "search.sbatch"
K8S = ROOT / "deploy" / "k8s"
COMPOSE = ROOT / "docker" / "compose.yaml"
IMAGE = "budget-nas:0.1.0"


def manifests() -> list[dict]:
    docs = []
    for f in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(f.read_text()) if d]
    return docs


def containers(doc: dict) -> list[dict]:
    spec = doc["spec"]
    pod = spec["template"]["spec"] if "template" in spec else {}
    return pod.get("containers", [])


def test_manifests_parse_and_agree() -> None:
    docs = manifests()
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs if d["kind"] != "Kustomization")
    assert kinds == [
        ("Deployment", "budget-nas-dashboard"),
        ("Job", "budget-nas-create"),
        ("Job", "budget-nas-workers"),
        ("PersistentVolumeClaim", "budget-nas-artifacts"),
        ("Service", "budget-nas-dashboard"),
        ("Service", "budget-nas-db"),
        ("StatefulSet", "budget-nas-db"),
    ]
    kustom = next(d for d in docs if d["kind"] == "Kustomization")
    assert all((K8S / r).exists() for r in kustom["resources"])
    for d in (d for d in docs if d["kind"] != "Kustomization"):
        assert d.get("apiVersion") and d["metadata"].get("name"), d
        if d["kind"] in ("Deployment", "StatefulSet"):
            labels = d["spec"]["template"]["metadata"]["labels"]
            assert d["spec"]["selector"]["matchLabels"].items() <= labels.items()
        if d["kind"] == "Service":
            assert d["spec"]["type"] == "ClusterIP"  # nothing published
        for c in containers(d):
            assert c["name"] and c["image"]
            env = {e["name"]: e for e in c.get("env", [])}
            if c["image"] != "postgres:16":
                assert c["image"] == IMAGE
                url = env["NAS_STORAGE"]["value"]
                assert "$(POSTGRES_PASSWORD)" in url and "budget-nas-db:5432" in url
                names = list(env)
                assert names.index("POSTGRES_PASSWORD") < names.index("NAS_STORAGE")
            for e in env.values():
                assert "value" in e or e["valueFrom"]["secretKeyRef"]["name"] == "budget-nas-db"
            if "args" in c and c["image"] == IMAGE and "command" not in c:
                args = run.parse_args([*c["args"], "--storage", "sqlite:///x.db"])
                assert args.study_name == "cifar10-5M"


def test_manifests_validate_against_the_kubernetes_schema() -> None:
    """kubernetes-validate carries the API's JSON schemas: no cluster needed."""
    import kubernetes_validate

    for f in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if doc and doc["kind"] != "Kustomization":
                kubernetes_validate.validate(doc, "1.33.0", strict=True)


def test_workers_job_fails_on_deliberate_exits_and_has_a_gpu_each() -> None:
    job = next(d for d in manifests() if d.get("metadata", {}).get("name") == "budget-nas-workers")
    spec = job["spec"]
    assert spec["parallelism"] == spec["completions"] >= 1
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    (worker,) = containers(job)
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    fail = spec["podFailurePolicy"]["rules"][0]
    assert fail["action"] == "FailJob" and set(fail["onExitCodes"]["values"]) == {2, run.GAVE_UP}
    assert "--worker" not in worker["args"]  # a pod is a whole worker, not a child of one


def test_compose_has_no_default_password_and_no_published_database() -> None:
    text = COMPOSE.read_text()
    refs = re.findall(r"\$\{POSTGRES_PASSWORD[^}]*\}", text)
    assert refs and all(r == "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}" for r in refs)
    compose = yaml.safe_load(text)
    services = compose["services"]
    assert "ports" not in services["postgres"]
    assert services["dashboard"]["ports"] == ["127.0.0.1:8080:8080"]
    for name in ("worker", "create"):
        assert services[name]["restart"] == "no"  # exit 2 and 3 are deliberate
    for name in ("postgres", "dashboard"):
        assert services[name]["healthcheck"]["test"]
    assert compose["x-nas"]["image"] == IMAGE
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    setup = (ROOT / "scripts" / "setup").read_text()
    # The image installs the torch that scripts/setup installs, and does not run as root.
    image_torch = re.search(r"^ARG TORCH_VERSION=(\S+)", dockerfile, re.M)[1]
    assert image_torch == re.search(r"TORCH_VERSION:-([^}]+)\}", setup)[1]
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.M)
    assert users and users[-1] not in ("root", "0")


def sbatch(env: dict[str, str], python: Path) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("NAS_", "SLURM_", "CUDA_"))}
    return subprocess.run(
        ["bash", str(SBATCH)],
        env=base | {"NAS_PYTHON": str(python), "SLURM_SUBMIT_DIR": str(env.pop("DIR"))} | env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_sbatch_environment_handling(tmp_path) -> None:
    """The script with a stand-in interpreter that shows what it was given."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "argv: $*"\necho "storage: $NAS_STORAGE"\n')
    fake.chmod(0o755)
    secret = "postgresql+psycopg://nas:pw-9c1@db:5432/nas"
    env = {"DIR": tmp_path, "STUDY": "s", "TRIALS": "40", "NAS_STORAGE": secret}
    out = sbatch(env | {"CUDA_VISIBLE_DEVICES": "2,5,7", "NAS_ARGS": "--quick"}, fake)
    assert out.returncode == 0, out.stderr
    argv = next(line for line in out.stdout.splitlines() if line.startswith("argv:"))
    assert "--workers 3" in argv and "--study-name s --trials 40" in argv and "--quick" in argv
    assert "pw-9c1" not in argv and f"storage: {secret}" in out.stdout
    missing = sbatch({"DIR": tmp_path, "STUDY": "s"}, fake)
    assert missing.returncode != 0 and "export NAS_STORAGE=" in missing.stderr
    text = SBATCH.read_text()
    assert "#SBATCH --signal=B:TERM@" in text and 'exec "${NAS_PYTHON' in text


def test_workers_get_the_gpus_their_parent_was_given() -> None:
    assert [launch.gpu_of(i, 2, "2,5") for i in range(3)] == ["2", "5", "2"]
    assert [launch.gpu_of(i, 4, None) for i in range(4)] == ["0", "1", "2", "3"]


@pytest.mark.postgres
@pytest.mark.xdist_group("processes")
def test_two_array_tasks_join_one_study(pg_url, tmp_path) -> None:
    """The script run as SLURM runs two array tasks, against the real PostgreSQL."""
    name = f"test-sbatch-{uuid.uuid4().hex[:8]}"
    flags = " ".join(a for a in TINY if a != "--no-progress")
    common = ["--study-name", name, "--trials", "6", "--storage", pg_url]
    created = subprocess.run(
        [
            sys.executable,
            "-m",
            "search.run",
            *flags.split(),
            *common,
            "--create-only",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert created.returncode == 0, created.stderr
    try:
        env = {"STUDY": name, "TRIALS": "6", "NAS_STORAGE": pg_url, "WORKERS": "1"}
        env |= {"NAS_ARGS": flags, "SLURM_ARRAY_JOB_ID": "77", "PYTHONPATH": str(ROOT)}
        python = sys.executable
        env |= {"SLURM_SUBMIT_DIR": str(tmp_path), "NAS_PYTHON": python}
        procs = [
            subprocess.Popen(
                ["bash", str(SBATCH)],
                env=dict(os.environ) | env | {"SLURM_ARRAY_TASK_ID": str(task)},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for task in (0, 1)
        ]
        outs = [p.communicate(timeout=600)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        assert "task 0 of job 77" in outs[0] and "task 1 of job 77" in outs[1]
        trials = optuna.load_study(study_name=name, storage=pg_url).get_trials(deepcopy=False)
        assert_whole(trials, 6)
        assert_distinct_candidates(trials)
        workers = {t.user_attrs["worker"] for t in trials if "worker" in t.user_attrs}
        assert len(workers) == 2 and counts(trials)["failed"] == 0
    finally:
        optuna.delete_study(study_name=name, storage=PG_URL)
