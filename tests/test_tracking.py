"""MLflow tracking against a real `mlflow server` on 127.0.0.1 and a plain sqlite store, with real Ray trials."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import ray
from mlflow.tracking import MlflowClient
from PIL import Image
from ray import tune
from safetensors.torch import load_file

from raylora.config import demo_config
from raylora.names import STEP
from raylora.report import write_report
from raylora.sweep import Resources, Sweep, experiment_path, run_sweep
from raylora.tracking import REDACTED, MlflowTracker, load_adapter, redact

CANARY = "hf_CANARYcanary0123456789secret"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real tracking server process on loopback, stopped by its pid at the end."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=(root / "server.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
    yield url
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


class KillTrialOnce(tune.Callback):
    """SIGKILLs the process of the trial with rank 4 at its first report: it must end FAILED, not RUNNING."""

    def __init__(self) -> None:
        self.killed: str | None = None

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.killed is None and trial.config.get("adapter.r") == 4:
            self.killed = trial.trial_id
            os.kill(result["pid"], signal.SIGKILL)


@pytest.fixture(scope="module")
def tracked_sweep(mlflow_server, ray_cluster, tmp_path_factory):
    """Four concurrent trials (0.5 CPU each) logged to the server; one of them killed mid-run."""
    os.environ["HF_TOKEN"] = CANARY  # a secret in the environment of the driver and the trials
    base = demo_config()
    base.training.max_steps = 20
    base.training.eval_every = 10
    base.training.log_every = 2
    base.training.eval_batches = 2
    base.model.token = CANARY  # and in the config
    sweep = Sweep(
        name="tracked",
        base=base,
        search_space={"adapter.r": tune.grid_search([4, 8, 16, 32])},
        search_alg="grid",
        scheduler="fifo",
        num_samples=1,
        max_failures=0,
        max_concurrent_trials=4,
        resources=Resources(workers=1, cpus_per_worker=0.5),
        storage_path=str(tmp_path_factory.mktemp("storage")),
    )
    tracker = MlflowTracker(sweep, tracking_uri=mlflow_server, experiment_path=experiment_path(sweep))
    killer = KillTrialOnce()
    result = run_sweep(sweep, callbacks=[tracker, killer], verbose=0)
    yield sweep, tracker, killer, result
    os.environ.pop("HF_TOKEN", None)


def _children(client: MlflowClient, tracker: MlflowTracker):
    return client.search_runs(
        [tracker.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{tracker.parent_run_id}'"
    )


def test_one_parent_and_one_child_per_trial_with_their_metrics(tracked_sweep, mlflow_server):
    sweep, tracker, killer, result = tracked_sweep
    client = MlflowClient(tracking_uri=mlflow_server)
    runs = client.search_runs([tracker.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.run_id == tracker.parent_run_id
    children = _children(client, tracker)
    assert len(children) == 4
    parent = parents[0]
    for key in (
        "base_model",
        "base_model_revision",
        "dataset_fingerprint",
        "version.torch",
        "version.peft",
        "version.ray",
        "version.bitsandbytes",
        "version.transformers",
        "sweep.scheduler",
        "search_space.adapter.r.grid_search",
    ):
        assert key in parent.data.params, key
    assert parent.info.status == "FINISHED"
    finished = [c for c in children if c.data.tags.get("raylora.trial_id") != killer.killed]
    for child in finished:
        assert child.info.status == "FINISHED"
        for key in (
            "trainable_params",
            "total_params",
            "trainable_percent",
            "final_peak_memory_gib",
            "wall_time_s",
            "tokens_seen",
            "final_eval_loss",
        ):
            assert key in child.data.metrics, key
        for key in (
            "rank",
            "alpha",
            "learning_rate",
            "dropout",
            "target_modules",
            "target_modules_resolved",
            "qlora",
            "batch_size",
            "max_length",
            "workers",
        ):
            assert key in child.data.params, key
        assert "self_attn.q_proj" in child.data.params["target_modules_resolved"]
        # what the trial did with its base, from the plan written beside its adapter
        assert child.data.params["model.attn_implementation"] == "sdpa"


def test_no_metric_point_is_lost_with_four_concurrent_trials(tracked_sweep, mlflow_server):
    sweep, tracker, killer, result = tracked_sweep
    client = MlflowClient(tracking_uri=mlflow_server)
    for child in _children(client, tracker):
        if child.data.tags.get("raylora.trial_id") == killer.killed:
            continue
        train_steps = [m.step for m in client.get_metric_history(child.info.run_id, "train_loss")]
        eval_steps = [m.step for m in client.get_metric_history(child.info.run_id, "eval_loss")]
        assert sorted(train_steps) == list(range(2, 21, 2)), train_steps
        assert sorted(eval_steps) == [10, 20]
        for key in ("lr", "grad_norm", "tokens_per_sec"):
            assert len(client.get_metric_history(child.info.run_id, key)) == 10, key


def test_a_killed_trial_ends_failed_not_running(tracked_sweep, mlflow_server):
    sweep, tracker, killer, result = tracked_sweep
    client = MlflowClient(tracking_uri=mlflow_server)
    assert killer.killed is not None
    (killed,) = [
        c for c in _children(client, tracker) if c.data.tags.get("raylora.trial_id") == killer.killed
    ]
    assert killed.info.status == "FAILED"
    assert all(c.info.status != "RUNNING" for c in _children(client, tracker))


def test_trainable_param_metric_equals_an_independent_count(tracked_sweep, mlflow_server, tiny_llama_path):
    sweep, tracker, killer, result = tracked_sweep
    client = MlflowClient(tracking_uri=mlflow_server)
    config = json.loads(Path(tiny_llama_path, "config.json").read_text())
    hidden, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = hidden // config["num_attention_heads"] * config["num_key_value_heads"]
    # all-linear on Llama: q, k, v, o, gate, up, down; a LoRA pair adds r * (d_in + d_out) per layer.
    shapes = [
        (hidden, hidden),
        (hidden, kv),
        (hidden, kv),
        (hidden, hidden),
        (hidden, inter),
        (hidden, inter),
        (inter, hidden),
    ]
    for child in _children(client, tracker):
        if child.data.tags.get("raylora.trial_id") == killer.killed:
            continue
        r = int(child.data.params["rank"])
        # plus the demo config's lm_head, trained in full (modules_to_save): vocab x hidden, no bias.
        expected = layers * sum(r * (d_in + d_out) for d_in, d_out in shapes) + config["vocab_size"] * hidden
        assert child.data.metrics["trainable_params"] == expected


def test_adapter_artifacts_load_into_the_base_and_the_best_is_registered(
    tracked_sweep, mlflow_server, tmp_path
):
    sweep, tracker, killer, result = tracked_sweep
    client = MlflowClient(tracking_uri=mlflow_server)
    parent = client.get_run(tracker.parent_run_id)
    best_run = parent.data.tags["raylora.best_run_id"]
    assert parent.data.tags["raylora.best_trial_id"] == result.best.trial_id
    local = Path(client.download_artifacts(best_run, "adapter", str(tmp_path)))
    names = sorted(p.name for p in local.iterdir())
    assert (
        "adapter_model.safetensors" in names and "adapter_config.json" in names and "tokenizer.json" in names
    )
    assert "trainer_state.pt" not in names and not any(n.startswith("model") for n in names)  # adapter only
    weights = load_file(str(local / "adapter_model.safetensors"))
    # LoRA pairs plus the demo config's fully trained lm_head (modules_to_save); no other base weight.
    assert weights and all("lora_" in k or k == "base_model.model.lm_head.weight" for k in weights), sorted(
        weights
    )
    versions = client.search_model_versions(f"name = '{sweep.name}-adapter'")
    assert [v.run_id for v in versions] == [best_run]

    model, tokenizer = load_adapter(best_run, tracking_uri=mlflow_server)
    ids = tokenizer("Uppercase: cat", return_tensors="pt")["input_ids"]
    out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4


def test_the_canary_token_reaches_no_param_tag_or_artifact(tracked_sweep, mlflow_server, tmp_path):
    sweep, tracker, killer, result = tracked_sweep
    client = MlflowClient(tracking_uri=mlflow_server)
    runs = client.search_runs([tracker.experiment_id])
    for run in runs:
        for key, value in {**run.data.params, **run.data.tags}.items():
            assert CANARY not in value, f"{key} of run {run.info.run_id} leaks the token"
        local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / run.info.run_id)))
        for file in local.rglob("*"):
            if file.is_file():
                assert CANARY.encode() not in file.read_bytes(), f"artifact {file} leaks the token"
    assert client.get_run(tracker.parent_run_id).data.params["base.model.token"] == REDACTED


def test_report_writes_decodable_plots_and_logs_them(tracked_sweep, mlflow_server, tmp_path):
    sweep, tracker, killer, result = tracked_sweep
    files = write_report(tracker.parent_run_id, tmp_path / "report", tracking_uri=mlflow_server)
    pngs = [f for f in files if f.suffix == ".png"]
    assert len(pngs) == 6
    for png in pngs:
        with Image.open(png) as image:
            image.verify()
        with Image.open(png) as image:
            assert image.size[0] >= 400 and image.size[1] >= 300, (png, image.size)
    table = (tmp_path / "report" / "trials.csv").read_text().splitlines()
    assert len(table) == 5  # header + 4 trials
    logged = {
        a.path
        for a in MlflowClient(tracking_uri=mlflow_server).list_artifacts(tracker.parent_run_id, "report")
    }
    assert "report/loss_curves.png" in logged and "report/trials.md" in logged


def test_a_plain_sqlite_store_and_an_unreachable_server(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the embedded default: sqlite:///mlflow.db in the working directory
    base = demo_config()
    base.training.max_steps = 10
    base.training.eval_every = 10
    base.training.eval_batches = 1
    sweep = Sweep(
        name="plain",
        base=base,
        search_space={"adapter.r": 4},
        scheduler="fifo",
        num_samples=1,
        storage_path=str(tmp_path / "storage"),
    )
    tracker = MlflowTracker(sweep, experiment_path=experiment_path(sweep))
    run_sweep(sweep, callbacks=[tracker], verbose=0)
    client = MlflowClient(tracking_uri="sqlite:///mlflow.db")
    (child,) = _children(client, tracker)
    assert child.info.status == "FINISHED" and (tmp_path / "mlflow.db").exists()
    steps = [m.step for m in client.get_metric_history(child.info.run_id, "eval_loss")]
    assert steps == [10]

    # A server that goes away mid-sweep and comes back: training goes on, the tracker warns, and the
    # calls that failed meanwhile are replayed, so the run ends complete.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    base.training.max_steps = 20
    down = Sweep(
        name="flaky",
        base=base,
        search_space={"adapter.r": 4},
        scheduler="fifo",
        num_samples=1,
        storage_path=str(tmp_path / "storage"),
    )
    tracker = MlflowTracker(down, tracking_uri="sqlite:///mlflow.db", experiment_path=experiment_path(down))

    class Outage(tune.Callback):
        """Points the tracker at a port where nothing listens for the first eval, then restores it."""

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if result[STEP] == 10:
                self.working, tracker.client = (
                    tracker.client,
                    MlflowClient(f"http://127.0.0.1:{_free_port()}"),
                )

        def on_trial_complete(self, iteration, trials, trial, **info):
            tracker.client = self.working

    # The outage callback runs before the tracker for each event, so the step-10 report meets the outage.
    with pytest.warns(UserWarning, match="training goes on"):
        outcome = run_sweep(down, callbacks=[Outage(), tracker], verbose=0)
    assert outcome.trials[0].step == 20 and outcome.trials[0].status != "ERROR"
    (child,) = _children(client, tracker)
    assert child.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(child.info.run_id, "eval_loss")) == [10, 20]


def test_redaction_masks_secret_names_and_secret_values(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-value-123")
    masked = redact(
        {"hf_token": "abc", "nested": {"api_key": "k"}, "url": "s3://x?sig=aws-secret-value-123", "r": 8}
    )
    assert masked == {
        "hf_token": REDACTED,
        "nested": {"api_key": REDACTED},
        "url": f"s3://x?sig={REDACTED}",
        "r": 8,
    }
    assert STEP == "step"
