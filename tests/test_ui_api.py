"""The web UI's API (Starlette TestClient): configs, validation next to keys, saving, runs, watch, file access."""

from __future__ import annotations

import json
import os
import socket
import time
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the web UI needs its extra: pip install -e '.[ui]'")
from starlette.testclient import TestClient  # noqa: E402

from wantrainer.ui.app import create_app  # noqa: E402
from wantrainer.ui.runs import parse_progress  # noqa: E402


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The demo's kit, media and demo.toml (a normal config) in a fresh folder."""
    from wantrainer.devkit.demo import prepare

    root = tmp_path_factory.mktemp("ui_root")
    config = prepare(root, steps=4)
    text = config.read_text()
    config.write_text(text.replace("# Written by", "# my own comment, kept on save\n# Written by"))
    return root, config


@pytest.fixture()
def client(workspace):
    root, _ = workspace
    with TestClient(create_app([root])) as c:
        yield c


def test_schema_lists_sections_fields_and_choices(client):
    schema = client.get("/api/schema").json()
    sections = {s["name"]: {f["key"]: f for f in s["fields"]} for s in schema["sections"]}
    lr = sections["optimizer"]["learning_rate"]
    assert lr["kind"] == "number" and lr["default"] > 0 and lr["doc"]
    assert sections["model"]["target_model"]["choices"] == ["wan21", "wan22"]
    assert {f["key"] for f in schema["sample_prompt"]} >= {"text", "width", "height"}
    assert "image_directory" in {f["key"] for f in schema["dataset_entry"]}


def test_lists_and_opens_configs(client, workspace):
    root, config = workspace
    listed = client.get("/api/configs").json()["configs"]
    assert str(config) in [c["path"] for c in listed]
    opened = client.get("/api/config", params={"path": "demo.toml"}).json()
    assert opened["path"] == str(config) and opened["data"]["output_name"] == "demo_lora"
    assert opened["ok"] is True, opened["problems"]
    assert opened["commands"] == {"cache-latents": [], "cache-text": [], "train": [], "sample": []}
    assert opened["output_dir"] == str(root / "output")


def test_validate_names_the_key_of_each_problem(client, workspace):
    _, config = workspace
    data = tomllib.loads(config.read_text())
    data["learning_rate"] = "fast"
    data["network_dimm"] = 4
    data["datasets"]["train"][0]["image_directory"] = "nowhere"
    res = client.post("/api/validate", json={"path": str(config), "data": data}).json()
    keys = {p["key"] for p in res["problems"]}
    assert not res["ok"] and {"learning_rate", "network_dimm"} <= keys
    assert any("network_dim" in p["message"] for p in res["problems"] if p["key"] == "network_dimm")  # the near name
    # schema clean, a folder missing: the files check of `validate` names the dataset key
    data = tomllib.loads(config.read_text())
    data["datasets"]["train"][0]["image_directory"] = "nowhere"
    res = client.post("/api/validate", json={"path": str(config), "data": data}).json()
    assert res["schema_ok"] and not res["ok"]
    assert [p["key"] for p in res["problems"]] == ["datasets.train[0].image_directory"]
    assert "nowhere" in res["text"] and "my own comment" in res["text"]
    # files in place, a command not ready: validate's train verdict, at its key
    data = tomllib.loads(config.read_text())
    del data["dit"]
    res = client.post("/api/validate", json={"path": str(config), "data": data}).json()
    assert not res["ok"] and res["commands"]["cache-latents"] == [] and res["commands"]["train"]
    assert [p["key"] for p in res["problems"]] == ["dit"]


def test_invalid_toml_is_refused_with_the_line(client, workspace):
    _, config = workspace
    res = client.post("/api/validate", json={"path": str(config), "text": "learning_rate = = 1\n"})
    assert res.status_code == 422 and "line 1" in res.json()["error"]
    res = client.post("/api/save", json={"path": str(config), "text": "learning_rate = = 1\n"})
    assert res.status_code == 422
    assert "my own comment" in config.read_text()  # untouched


def test_save_keeps_comments_and_refuses_unknown_keys(client, workspace):
    _, config = workspace
    before = config.read_text()
    data = tomllib.loads(before)
    data["network_dimm"] = 4
    res = client.post("/api/save", json={"path": str(config), "data": data})
    assert res.status_code == 422 and res.json()["problems"][0]["key"] == "network_dimm"
    assert config.read_text() == before
    data = tomllib.loads(before)
    data["learning_rate"] = 0.005
    data["datasets"]["train"][1]["num_repeats"] = 3
    del data["seed"]
    saved = client.post("/api/save", json={"path": str(config), "data": data}).json()
    text = config.read_text()
    assert tomllib.loads(text) == data and saved["data"] == data
    assert "# my own comment, kept on save" in text and "learning_rate = 0.005" in text
    assert "seed = 42" not in text
    changed = [line for line in text.splitlines() if line not in before.splitlines()]
    assert len(changed) == 2, changed  # only the two changed values are new lines
    config.write_text(before)


def test_new_config_and_paths_outside_the_root_are_refused(client, workspace, tmp_path):
    root, _ = workspace
    assert client.post("/api/save", json={"path": "fresh.toml", "data": {"seed": 3}}).status_code == 400  # no create
    made = client.post("/api/save", json={"path": "sub/fresh.toml", "data": {"seed": 3}, "create": True})
    assert made.status_code == 200 and (root / "sub" / "fresh.toml").read_text().strip() == "seed = 3"
    outside = tmp_path / "outside.toml"
    outside.write_text("seed = 1\n")
    for method, url, kwargs in [
        ("get", "/api/config", {"params": {"path": str(outside)}}),
        ("get", "/api/config", {"params": {"path": "../" + outside.name}}),
        ("get", "/api/file", {"params": {"path": "/etc/passwd"}}),
        ("get", "/api/watch", {"params": {"config": str(outside)}}),
        ("post", "/api/save", {"json": {"path": str(tmp_path / "x.toml"), "data": {}, "create": True}}),
        ("post", "/api/validate", {"json": {"path": str(outside), "data": {}}}),
        ("post", "/api/runs", {"json": {"config": str(outside), "command": "train"}}),
    ]:
        res = getattr(client, method)(url, **kwargs)
        assert res.status_code == 403, (url, res.text)
        assert "outside the folders" in res.json()["error"]
    link = root / "escape.toml"
    link.symlink_to(outside)
    assert client.get("/api/config", params={"path": "escape.toml"}).status_code == 403
    assert not (tmp_path / "x.toml").exists()


def test_bad_requests(client, workspace):
    _, config = workspace
    assert client.post("/api/validate", content=b"not json", headers={"content-type": "application/json"}).status_code == 400
    assert client.post("/api/runs", json={"config": str(config), "command": "rm"}).status_code == 400
    assert client.get("/api/runs/999").status_code == 400
    assert client.get("/api/config").status_code == 400


def _wait(client, run_id, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        run = client.get(f"/api/runs/{run_id}").json()
        if run["returncode"] is not None and run["ended"]:
            return run
        time.sleep(0.5)
    raise AssertionError(f"run {run_id} did not end: {run}")


def test_runs_one_per_output_folder_and_stop(client, workspace):
    _, config = workspace
    first = client.post("/api/runs", json={"config": str(config), "command": "train"})
    assert first.status_code == 201
    run_id = first.json()["id"]
    second = client.post("/api/runs", json={"config": str(config), "command": "cache-text"})
    assert second.status_code == 409 and "in use" in second.json()["error"]
    assert [r["id"] for r in client.get("/api/runs").json()["runs"]][0] == run_id
    stopped = client.post(f"/api/runs/{run_id}/stop").json()
    assert stopped["status"] in ("stopping", "stopped")
    run = _wait(client, run_id)
    # stopped at once, while the child still imports: the stop waits for the CLI's main(), then 130, no traceback
    assert run["returncode"] == 130 and run["status"] == "stopped", run["lines"][-12:]
    assert not any("Traceback" in line for line in run["lines"]), run["lines"]
    assert run["lines"][-1] == f"[exit code {run['returncode']}: stopped]"
    # a finished run frees the folder; a config the schema rejects is refused before anything starts
    validate = client.post("/api/runs", json={"config": str(config), "command": "validate"}).json()
    done = _wait(client, validate["id"])
    assert done["returncode"] == 0 and any(line.startswith("config OK") for line in done["lines"]), done["lines"]


def test_doctor_from_the_page_writes_its_plots(client, workspace):
    root, config = workspace
    run = client.post("/api/runs", json={"config": str(config), "command": "doctor"}).json()
    done = _wait(client, run["id"])
    assert done["returncode"] == 0, done["lines"]
    plots = client.get("/api/watch", params={"config": str(config)}).json()["doctor"]
    assert {p["name"] for p in plots} >= {"doctor_train_0.png", "doctor_val_0.png"}


def test_estimate_and_validate_run_beside_a_training_run(client, workspace):
    root, demo = workspace
    config = root / "beside.toml"  # its own output folder: what this run saves stays out of the other tests
    config.write_text(demo.read_text().replace('output_name = "demo_lora"', 'output_name = "beside"'))
    train = client.post("/api/runs", json={"config": str(config), "command": "train"})
    assert train.status_code == 201
    try:
        estimate = client.post("/api/runs", json={"config": str(config), "command": "estimate"})
        validate = client.post("/api/runs", json={"config": str(config), "command": "validate"})
        assert estimate.status_code == 201 and validate.status_code == 201, (estimate.json(), validate.json())
        done = _wait(client, estimate.json()["id"])
        assert done["returncode"] == 0, done["lines"]
        peak = next(line for line in done["lines"] if line.strip().startswith("peak"))
        assert "GB" in peak and "DiT weights" in "\n".join(done["lines"])
        assert _wait(client, validate.json()["id"])["returncode"] == 0
        # a command that writes into the folder is still refused while the training runs
        if client.get(f"/api/runs/{train.json()['id']}").json()["returncode"] is None:
            assert client.post("/api/runs", json={"config": str(config), "command": "doctor"}).status_code == 409
    finally:
        client.post(f"/api/runs/{train.json()['id']}/stop")
        _wait(client, train.json()["id"])


def test_info_says_whether_estimate_exists(client, workspace):
    import subprocess
    import sys

    info = client.get("/api/info").json()
    assert info["roots"] == [str(workspace[0])]
    present = subprocess.run([sys.executable, "-m", "wantrainer.cli", "estimate", "--help"],
                             capture_output=True).returncode == 0
    assert info["estimate"] is present


def test_train_refused_while_the_cli_lock_is_held(client, workspace):
    root, config = workspace
    out = root / "output"
    out.mkdir(exist_ok=True)
    lock = out / ".demo_lora.lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "now"}))
    try:
        res = client.post("/api/runs", json={"config": str(config), "command": "train"})
        assert res.status_code == 409 and str(os.getpid()) in res.json()["error"]
        assert client.get("/api/watch", params={"config": str(config)}).json()["lock"]["pid"] == os.getpid()
    finally:
        lock.unlink()


def test_watch_reads_event_files_samples_and_saves(client, workspace):
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    root, config = workspace
    out = root / "output"
    writer = SummaryWriter(log_dir=str(out / "logs"), filename_suffix=".demo_lora")
    for step in range(1, 6):
        writer.add_scalar("loss/current", 1.0 / step, step)
        writer.add_scalar("lr/group0", 1e-2, step)
    writer.add_scalar("val/loss", 0.5, 5)
    writer.add_scalar("val/loss_t500", 0.4, 5)
    writer.close()
    (out / "sample").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(out / "sample" / "demo_lora_000005_00.png")
    (out / "demo_lora-step00000005.safetensors").write_bytes(b"x")
    (out / "demo_lora-step00000005-state").mkdir()
    (out / "other-step00000005.safetensors").write_bytes(b"x")
    w = client.get("/api/watch", params={"config": str(config)}).json()
    assert w["scalars"]["loss/current"] == [[s, pytest.approx(1.0 / s)] for s in range(1, 6)]
    assert w["scalars"]["val/loss_t500"] == [[5, pytest.approx(0.4)]]
    assert [s["name"] for s in w["samples"]] == ["demo_lora_000005_00.png"]
    assert [(s["kind"], s["step"]) for s in w["saves"]] == [("lora", 5), ("state", 5)]
    png = client.get("/api/file", params={"path": w["samples"][0]["path"]})
    assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
    assert client.get("/api/file", params={"path": str(out / "missing.png")}).status_code == 404


def test_page_and_assets_are_served_from_the_package(client):
    page = client.get("/")
    assert page.status_code == 200 and "static/app.js" in page.text and "http" not in page.text.split("<body>")[1]
    for asset in ("app.js", "style.css"):
        res = client.get(f"/static/{asset}")
        assert res.status_code == 200 and "https://" not in res.text


def test_token_required_off_loopback(workspace):
    root, _ = workspace
    with TestClient(create_app([root], token="s3cret")) as c:
        assert c.get("/api/configs").status_code == 403
        assert c.get("/", params={"token": "wrong"}).status_code == 403
        first = c.get("/", params={"token": "s3cret"})
        assert first.status_code == 200 and "wantrainer_token" in first.headers["set-cookie"]
        assert c.get("/api/configs").status_code == 200  # the cookie carries it from now on


def test_progress_line_parsing():
    line = "steps:  50%|#####     | 30/60 [00:10<00:12,  2.99step/s, loss=0.1234, lr=1.00e-02, val=0.9631]"
    assert parse_progress(line) == {"bar": "steps", "step": 30, "total": 60, "elapsed": "00:10", "eta": "00:12",
                                    "rate": "2.99step/s", "loss": "0.1234", "lr": "1.00e-02", "val": "0.9631"}
    assert parse_progress("steps:   0%|          | 0/20 [00:00<?, ?step/s]")["eta"] == "?"
    assert parse_progress("INFO loading the DiT") is None


def test_cli_prints_the_url_and_binds_loopback(workspace):
    import subprocess
    import sys

    from wantrainer.ui.security import is_loopback
    from wantrainer.ui.serve import url_for

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    assert url_for("0.0.0.0", 7860, "abc") == "http://127.0.0.1:7860/?token=abc"
    root, _ = workspace
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "wantrainer.cli", "ui", "--root", str(root), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("wantrainer ui: http://127.0.0.1:") and "token" not in line, line
        import urllib.request

        with urllib.request.urlopen(line.split(": ", 1)[1].strip() + "api/configs", timeout=30) as res:
            assert "demo.toml" in res.read().decode()
    finally:
        proc.terminate()
        proc.wait(30)
