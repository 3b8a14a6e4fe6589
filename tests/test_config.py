"""Tests of LoTConfig: defaults, validation, presets, files and upload to a stand-in Hub."""

import dataclasses
import json
import math
import re
from types import SimpleNamespace

import pytest

from hf_lot.config import LOT_CONFIG_NAME, PRESETS, LoTConfig

# -- defaults and presets -----------------------------------------------------------

# The values of the method's paper (Baveja, Lewandowski and Schmidt, arXiv
# 2509.19698), from its table and algorithm: K = 40, W = 30, gamma = 0.8, c = 0.99,
# u = 1.01, alpha_min = 0.12, warming below 0.3 * gamma * threshold during the
# first 30% of each task, the window variance as volatility, beta within [0, 1].
PAPER_VALUES = {
    "interval": 40,
    "window": 30,
    "gamma": 0.8,
    "cool_factor": 0.99,
    "warm_factor": 1.01,
    "warm_ratio": 0.3,
    "alpha_min": 0.12,
    "warm_phase": "task_fraction",
    "warm_fraction": 0.3,
    "volatility": "window_variance",
    "sharpness_scale": "layer",
}

# The authors' reference code: beta = 20, squared deviation, global sharpness
# normalization, warming while under 10% of one task's steps.
REFERENCE_VALUES = {
    "beta": 20.0,
    "volatility": "squared_deviation",
    "sharpness_scale": "global",
    "warm_phase": "run_fraction",
    "warm_fraction": 0.1,
}


@pytest.mark.parametrize(("name", "expected"), sorted(PAPER_VALUES.items()))
def test_default_paper_value(name, expected):
    assert getattr(LoTConfig(), name) == expected


def test_default_beta_in_paper_range():
    assert 0 <= LoTConfig().beta <= 1


def test_default_controls():
    config = LoTConfig()

    assert config.control is True
    assert config.curvature is True
    assert config.layer_rules == []
    assert config.hvp_batch_size is None


def test_default_lists_not_shared():
    first = LoTConfig()
    second = LoTConfig()

    first.layer_rules.append(["a", "b"])

    assert second.layer_rules == []


def test_every_option_has_help():
    for option in dataclasses.fields(LoTConfig):
        assert option.metadata.get("help"), option.name


def test_preset_names():
    assert sorted(PRESETS) == ["monitor", "paper", "reference"]


def test_preset_paper_is_default():
    assert LoTConfig.from_preset("paper") == LoTConfig()


@pytest.mark.parametrize(("name", "expected"), sorted(REFERENCE_VALUES.items()))
def test_preset_reference_value(name, expected):
    assert getattr(LoTConfig.from_preset("reference"), name) == expected


def test_preset_reference_keeps_table():
    config = LoTConfig.from_preset("reference")

    assert config.gamma == 0.8
    assert config.alpha_min == 0.12
    assert config.interval == 40


def test_preset_monitor():
    config = LoTConfig.from_preset("monitor")

    assert config.control is False
    assert dataclasses.replace(config, control=True) == LoTConfig()


def test_preset_overrides():
    config = LoTConfig.from_preset("reference", beta=5.0, interval=10)

    assert config.beta == 5.0
    assert config.interval == 10
    assert config.volatility == "squared_deviation"


def test_preset_unknown():
    with pytest.raises(ValueError, match="Unknown LoT preset 'fast'.*monitor, paper, reference"):
        LoTConfig.from_preset("fast")


def test_preset_invalid_override():
    with pytest.raises(ValueError, match="gamma=-1"):
        LoTConfig.from_preset("reference", gamma=-1)


# -- validation ---------------------------------------------------------------------------

INVALID_VALUES = [
    ("interval", 0),
    ("interval", 1.5),
    ("interval", True),
    ("window", -3),
    ("hvp_iterations", 0),
    ("hvp_cold_iterations", 0),
    ("noise_every", 0),
    ("gamma", 0),
    ("gamma", -0.5),
    ("gamma", math.nan),
    ("gamma", True),
    ("gamma", "0.8"),
    ("cool_factor", 1.0),
    ("cool_factor", 0.0),
    ("warm_factor", 0.5),
    ("warm_ratio", 0),
    ("kappa", -1.0),
    ("eps", 0.0),
    ("hvp_tolerance", 0.0),
    ("warm_fraction", 1.5),
    ("warm_fraction", -0.1),
    ("warm_fraction", math.nan),
    ("beta", -1.0),
    ("alpha_min", -0.1),
    ("hvp_batch_size", 0),
    ("hvp_batch_size", 2.5),
    ("warm_phase", "sometimes"),
    ("bound", "both"),
    ("volatility", "variance"),
    ("sharpness_scale", "block"),
    ("noise_fallback", "duplicate"),
    ("layer_rules", [["only_regex"]]),
    ("layer_rules", [["regex", 3]]),
]


@pytest.mark.parametrize(("name", "value"), INVALID_VALUES)
def test_invalid_option_named(name, value):
    with pytest.raises(ValueError, match=rf"Invalid LoT option {name}="):
        LoTConfig(**{name: value})


@pytest.mark.parametrize(("name", "value"), [("warm_phase", "sometimes"), ("bound", "both")])
def test_invalid_choice_lists_choices(name, value):
    choices = dataclasses.fields(LoTConfig)
    option = next(option for option in choices if option.name == name)

    with pytest.raises(ValueError) as error:
        LoTConfig(**{name: value})

    for choice in option.metadata["choices"]:
        assert choice in str(error.value)


def test_curvature_needed_by_combined():
    with pytest.raises(ValueError, match="Invalid LoT option curvature=False"):
        LoTConfig(curvature=False)


def test_curvature_needed_by_volatility():
    with pytest.raises(ValueError, match="Invalid LoT option curvature=False"):
        LoTConfig(curvature=False, bound="volatility", beta=0.0)


@pytest.mark.parametrize("overrides", [{"bound": "noise"}, {"beta": 0.0}])
def test_curvature_off_allowed(overrides):
    config = LoTConfig(curvature=False, **overrides)

    assert config.curvature is False


def test_valid_edge_values():
    config = LoTConfig(warm_fraction=0.0, beta=0.0, alpha_min=0.0, warm_factor=1.0, hvp_batch_size=1)

    assert config.warm_fraction == 0.0
    assert config.warm_factor == 1.0
    assert config.hvp_batch_size == 1


def test_layer_rules_tuples_to_lists():
    config = LoTConfig(layer_rules=[(r"encoder\.layer\.(\d+)\.", r"block.\1")])

    assert config.layer_rules == [[r"encoder\.layer\.(\d+)\.", r"block.\1"]]


def test_layer_rule_string_rejected():
    with pytest.raises(ValueError, match="Invalid LoT option layer_rules="):
        LoTConfig(layer_rules=["ab"])


def test_beta_string_named():
    with pytest.raises(ValueError, match="Invalid LoT option beta="):
        LoTConfig(beta="0.5")


@pytest.mark.parametrize("name", ["beta", "alpha_min"])
def test_nan_option_rejected(name):
    with pytest.raises(ValueError, match=rf"Invalid LoT option {name}="):
        LoTConfig(**{name: math.nan})


# -- dicts and files --------------------------------------------------------------------------


def non_default_config() -> LoTConfig:
    return LoTConfig(
        interval=10,
        beta=0.5,
        volatility="squared_ratio",
        hvp_batch_size=8,
        layer_rules=[[r"encoder\.layer\.(\d+)\.", r"block.\1"]],
        seed=3,
    )


def test_from_dict_round_trip():
    config = non_default_config()

    assert LoTConfig.from_dict(config.to_dict()) == config


def test_from_dict_unknown_key():
    with pytest.raises(ValueError, match=r"Unknown LoT option\(s\) colour, intervall; valid options are .*interval"):
        LoTConfig.from_dict({"intervall": 5, "colour": "red"})


def test_json_string_content():
    config = non_default_config()

    values = json.loads(config.to_json_string())

    assert values == config.to_dict()
    assert values["layer_rules"] == [[r"encoder\.layer\.(\d+)\.", r"block.\1"]]
    assert list(values) == sorted(values)


def test_save_pretrained_writes_file(tmp_path):
    config = non_default_config()

    config.save_pretrained(tmp_path / "run")

    written = tmp_path / "run" / LOT_CONFIG_NAME
    assert written.is_file()
    assert json.loads(written.read_text(encoding="utf-8")) == config.to_dict()
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == [LOT_CONFIG_NAME]


def test_pretrained_round_trip_folder(tmp_path):
    config = non_default_config()
    config.save_pretrained(tmp_path)

    loaded = LoTConfig.from_pretrained(tmp_path)

    assert loaded == config


def test_pretrained_round_trip_file(tmp_path):
    config = non_default_config()
    config.save_pretrained(tmp_path)

    loaded = LoTConfig.from_pretrained(tmp_path / LOT_CONFIG_NAME)

    assert loaded == config


def test_pretrained_overrides(tmp_path):
    config = non_default_config()
    config.save_pretrained(tmp_path)

    loaded = LoTConfig.from_pretrained(tmp_path, beta=0.25, control=False)

    assert loaded.beta == 0.25
    assert loaded.control is False
    assert dataclasses.replace(loaded, beta=0.5, control=True) == config


def test_pretrained_invalid_override(tmp_path):
    LoTConfig().save_pretrained(tmp_path)

    with pytest.raises(ValueError, match="Invalid LoT option window=0"):
        LoTConfig.from_pretrained(tmp_path, window=0)


def test_pretrained_unknown_override(tmp_path):
    LoTConfig().save_pretrained(tmp_path)

    with pytest.raises(ValueError, match="Unknown LoT option"):
        LoTConfig.from_pretrained(tmp_path, learning_rate=1e-3)


def test_pretrained_partial_file(tmp_path):
    (tmp_path / LOT_CONFIG_NAME).write_text('{"gamma": 0.5}', encoding="utf-8")

    loaded = LoTConfig.from_pretrained(tmp_path)

    assert loaded == LoTConfig(gamma=0.5)


def test_pretrained_malformed_json(tmp_path):
    (tmp_path / LOT_CONFIG_NAME).write_text('{"gamma": 0.5,', encoding="utf-8")

    with pytest.raises(ValueError, match="is not valid JSON"):
        LoTConfig.from_pretrained(tmp_path)


def test_pretrained_json_not_object(tmp_path):
    (tmp_path / LOT_CONFIG_NAME).write_text("[1, 2]", encoding="utf-8")

    with pytest.raises(ValueError, match="must contain a JSON object"):
        LoTConfig.from_pretrained(tmp_path)


def test_pretrained_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(LOT_CONFIG_NAME)):
        LoTConfig.from_pretrained(tmp_path)


def test_save_onto_file_raises(tmp_path):
    target = tmp_path / "taken"
    target.write_text("", encoding="utf-8")

    with pytest.raises(ValueError, match="is a file"):
        LoTConfig().save_pretrained(target)


def test_pretrained_hub_download(tmp_path, monkeypatch):
    import hf_lot.config

    config = non_default_config()
    config.save_pretrained(tmp_path)
    requests = []

    def fake_cached_file(repo_id, filename, **kwargs):
        requests.append({"repo_id": repo_id, "filename": filename, **kwargs})
        return str(tmp_path / LOT_CONFIG_NAME)

    monkeypatch.setattr(hf_lot.config, "cached_file", fake_cached_file)

    loaded = LoTConfig.from_pretrained("someone/lot-config", revision="v1", interval=20)

    assert len(requests) == 1
    assert requests[0]["repo_id"] == "someone/lot-config"
    assert requests[0]["filename"] == LOT_CONFIG_NAME
    assert requests[0]["revision"] == "v1"
    assert loaded == dataclasses.replace(config, interval=20)


# -- upload to a stand-in Hub ---------------------------------------------------------------------


class FakeHubApi:
    """Record the calls that PushToHubMixin makes on `hf_api()`, and read uploaded files at commit time."""

    def __init__(self):
        self.created_repos = []
        self.commits = []

    def create_repo(self, repo_id, **kwargs):
        self.created_repos.append((repo_id, kwargs))
        return SimpleNamespace(repo_id=repo_id)

    def create_branch(self, **kwargs):
        raise AssertionError(f"no branch expected, got {kwargs}")

    def create_commit(self, repo_id, operations, **kwargs):
        # The files live in a temporary folder that is removed after the commit.
        files = {}
        for operation in operations:
            with open(operation.path_or_fileobj, "rb") as handle:
                files[operation.path_in_repo] = handle.read()
        self.commits.append({"repo_id": repo_id, "files": files, **kwargs})
        return f"https://hub.invalid/{repo_id}/commit/0"


class FakeModelCard:
    def save(self, path):
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("# stand-in card\n")


@pytest.fixture
def fake_hub(monkeypatch):
    import transformers.utils.hub as hub

    api = FakeHubApi()
    monkeypatch.setattr(hub, "hf_api", lambda: api)
    monkeypatch.setattr(hub, "create_and_tag_model_card", lambda repo_id, tags=None, token=None: FakeModelCard())
    return api


def test_push_to_hub_uploads_config(fake_hub):
    config = non_default_config()

    config.push_to_hub("someone/lot-config", commit_message="Add LoT config")

    assert [repo_id for repo_id, _ in fake_hub.created_repos] == ["someone/lot-config"]
    assert len(fake_hub.commits) == 1
    commit = fake_hub.commits[0]
    assert commit["repo_id"] == "someone/lot-config"
    assert commit["commit_message"] == "Add LoT config"
    assert LOT_CONFIG_NAME in commit["files"]
    assert json.loads(commit["files"][LOT_CONFIG_NAME]) == config.to_dict()


def test_push_to_hub_files(fake_hub):
    LoTConfig().push_to_hub("someone/lot-config")

    assert sorted(fake_hub.commits[0]["files"]) == ["README.md", LOT_CONFIG_NAME]


def test_push_to_hub_round_trip(fake_hub, tmp_path):
    config = non_default_config()
    config.push_to_hub("someone/lot-config")
    (tmp_path / LOT_CONFIG_NAME).write_bytes(fake_hub.commits[0]["files"][LOT_CONFIG_NAME])

    assert LoTConfig.from_pretrained(tmp_path) == config


def test_save_pretrained_push(fake_hub, tmp_path):
    config = non_default_config()

    config.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="someone/other")

    assert (tmp_path / "local" / LOT_CONFIG_NAME).is_file()
    assert fake_hub.commits[0]["repo_id"] == "someone/other"
    assert json.loads(fake_hub.commits[0]["files"][LOT_CONFIG_NAME]) == config.to_dict()


def test_save_pretrained_push_default_repo(fake_hub, tmp_path):
    LoTConfig().save_pretrained(tmp_path / "my-lot-run", push_to_hub=True)

    assert [repo_id for repo_id, _ in fake_hub.created_repos] == ["my-lot-run"]
    assert fake_hub.commits[0]["repo_id"] == "my-lot-run"


def test_save_pretrained_push_only_written_files(fake_hub, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "results.json").write_text("{}", encoding="utf-8")

    LoTConfig().save_pretrained(folder, push_to_hub=True, repo_id="someone/run", private=True, token="hf_test")

    assert sorted(fake_hub.commits[0]["files"]) == [LOT_CONFIG_NAME]
    assert fake_hub.created_repos == [("someone/run", {"exist_ok": True, "private": True, "token": "hf_test"})]
    assert fake_hub.commits[0]["token"] == "hf_test"


def test_pretrained_subfolder(tmp_path):
    config = non_default_config()
    config.save_pretrained(tmp_path / "lot")

    assert LoTConfig.from_pretrained(tmp_path, subfolder="lot") == config


@pytest.mark.parametrize("name", ["/no/such/folder", "./no-such-folder", "missing_lot_config.json"])
def test_pretrained_missing_path(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)

    with pytest.raises(FileNotFoundError, match=re.escape(f"LoT config {name!r} not found")):
        LoTConfig.from_pretrained(name)


def test_pretrained_hub_id_offline(tmp_path, monkeypatch):
    # conftest sets HF_HUB_OFFLINE=1, so an id missing from the (empty) cache fails without a request.
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))

    with pytest.raises(OSError, match="someone/absent-lot-config|couldn't connect"):
        LoTConfig.from_pretrained("someone/absent-lot-config", cache_dir=tmp_path / "cache")


# -- a stand-in Hub on loopback --------------------------------------------------------------------


class LoopbackHub:
    """A stand-in for the Hub's HTTP API on 127.0.0.1, with the endpoints that upload and download use.

    It implements repository creation, YAML validation, preupload (every file
    regular, none LFS), NDJSON commits and the ``resolve`` download route, and
    records every request with its Authorization header.
    """

    def __init__(self):
        import http.server
        import threading

        self.repos: dict[str, dict[str, bytes]] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                hub.handle(self, self.rfile.read(int(self.headers.get("Content-Length") or 0)))

            def do_GET(self):
                hub.handle(self, b"")

            do_HEAD = do_GET

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    @staticmethod
    def reply(request, status, body=b"", headers=None, content_type="application/json"):
        request.send_response(status)
        request.send_header("Content-Type", content_type)
        request.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            request.send_header(name, value)
        request.end_headers()
        if request.command != "HEAD":
            request.wfile.write(body)

    def handle(self, request, body):
        import base64
        import hashlib

        path = request.path.split("?")[0]
        self.requests.append((request.command, path, request.headers.get("Authorization")))
        if path == "/api/repos/create":
            values = json.loads(body)
            repo_id = "/".join(part for part in (values.get("organization"), values["name"]) if part)
            self.repos.setdefault(repo_id, {})
            return self.reply(request, 200, json.dumps({"url": f"{self.endpoint}/{repo_id}"}).encode())
        if path == "/api/validate-yaml":
            return self.reply(request, 200, b"{}")
        preupload = re.fullmatch(r"/api/models/(.+)/preupload/[^/]+", path)
        if preupload:
            files = [{"path": item["path"], "uploadMode": "regular", "shouldIgnore": False} for item in json.loads(body)["files"]]
            return self.reply(request, 200, json.dumps({"files": files}).encode())
        commit = re.fullmatch(r"/api/models/(.+)/commit/[^/]+", path)
        if commit:
            for line in body.decode().splitlines():
                entry = json.loads(line)
                if entry["key"] == "file":
                    self.repos.setdefault(commit.group(1), {})[entry["value"]["path"]] = base64.b64decode(entry["value"]["content"])
            sha = hashlib.sha1(body).hexdigest()
            return self.reply(request, 200, json.dumps({"commitUrl": f"{self.endpoint}/{commit.group(1)}/commit/{sha}", "commitOid": sha}).encode())
        resolve = re.fullmatch(r"/(.+)/resolve/[^/]+/(.+)", path)
        if resolve and resolve.group(1) in self.repos:
            data = self.repos[resolve.group(1)].get(resolve.group(2))
            if data is None:
                return self.reply(request, 404, b'{"error": "Entry not found"}', {"X-Error-Code": "EntryNotFound"})
            headers = {"ETag": f'"{hashlib.sha1(data).hexdigest()}"', "X-Repo-Commit": "0" * 40}
            return self.reply(request, 200, data, headers, content_type="application/octet-stream")
        return self.reply(request, 404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})


# Runs in a child process, because huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE once, at import.
HUB_CLIENT = """
import json, sys
from hf_lot.config import LoTConfig
from hf_lot.tasks import load_experiment_config
from hf_lot.validation import check_lot_config

sys.path.insert(0, "scripts")
import continual_finetune as script

config = LoTConfig.from_dict(json.loads(sys.argv[1]))
config.push_to_hub("someone/lot-config", commit_message="Add LoT config")
config.save_pretrained(sys.argv[2], push_to_hub=True, repo_id="someone/lot-run")
loaded = LoTConfig.from_pretrained("someone/lot-config")

# The continual script's path: lot.config in the YAML config, then the arguments of the first task.
experiment = load_experiment_config("configs/tiny.yaml", ["lot.config=someone/lot-run", f"run.output_dir={sys.argv[2]}"])
arguments = script.build_training_arguments(experiment, experiment.tasks[0], 0, script.LoTTrainingArguments)
from_script = check_lot_config(arguments)
try:
    LoTConfig.from_pretrained("someone/absent")
    missing = None
except OSError as error:
    missing = str(error)
print(json.dumps({"loaded": loaded.to_dict(), "from_script": from_script.to_dict(), "missing": missing}))
"""


@pytest.fixture
def loopback_hub():
    hub = LoopbackHub()
    yield hub
    hub.close()


def test_hub_round_trip_over_http(loopback_hub, tmp_path):
    import os
    import subprocess
    import sys

    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    environment = {key: value for key, value in os.environ.items() if "proxy" not in key.lower()}
    environment.update(
        HF_ENDPOINT=loopback_hub.endpoint,
        HF_HUB_OFFLINE="0",
        HF_TOKEN="hf_loopback_test",
        HF_HOME=str(tmp_path / "hf_home"),
        HF_HUB_DISABLE_TELEMETRY="1",
        NO_PROXY="127.0.0.1",
        OMP_NUM_THREADS="1",
    )
    config = non_default_config()

    completed = subprocess.run(
        [sys.executable, "-c", HUB_CLIENT, json.dumps(config.to_dict()), str(tmp_path / "lot-run")],
        cwd=repo_root,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert completed.returncode == 0, completed.stderr[-4000:]
    output = json.loads(completed.stdout.strip().splitlines()[-1])
    assert json.loads(loopback_hub.repos["someone/lot-config"][LOT_CONFIG_NAME]) == config.to_dict()
    assert sorted(loopback_hub.repos["someone/lot-config"]) == ["README.md", LOT_CONFIG_NAME]
    assert sorted(loopback_hub.repos["someone/lot-run"]) == [LOT_CONFIG_NAME]
    assert LoTConfig.from_dict(output["loaded"]) == config
    # configs/tiny.yaml sets lot.interval and lot.window, which take precedence over the saved config.
    assert LoTConfig.from_dict(output["from_script"]) == dataclasses.replace(config, interval=2, window=5)
    assert "someone/absent" in output["missing"]
    assert {authorization for _, _, authorization in loopback_hub.requests} == {"Bearer hf_loopback_test"}
