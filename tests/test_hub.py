"""Hub round trip with the real huggingface_hub client against a Hub on 127.0.0.1.

`FakeHub` implements just enough of the Hub's HTTP API for huggingface_hub to
create repos and branches, commit regular (non-LFS) files as NDJSON, and download
(repo info, tree listing, resolve). It records what arrives, checks the token on
every write, serves on an ephemeral port from a daemon thread, and shuts itself
down after a deadline even if a test hangs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch
import yaml

from marl.cli import main
from marl.config import PPOArgs
from marl.errors import MarlError
from marl.model import MultiAdapterModel

REPO = Path(__file__).resolve().parents[1]
TOKEN = "hf_marlTestSecret0123456789abcdefXYZ"  # recognisable, so any leak is easy to find
TEXTS = ["This movie was wonderful and touching.", "A dull, boring film.", "It was okay I guess"]


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """Repos in memory: repo_id -> {"private", "branches": {name: sha}, "commits": {sha: {path: bytes}}}."""

    def __init__(self, token: str, deadline_s: float = 600.0):
        self.token = token
        self.repos: dict[str, dict] = {}
        self.requests: list[tuple[str, str, bool]] = []  # (method, path, authorised)
        self.unhandled: list[str] = []
        self.fail_commits = False
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the client expects; every reply has a length
            timeout = 30  # a stuck connection ends by itself

            def log_message(self, *args):  # keep the test output clean
                pass

            def do_GET(self):
                hub.handle(self)

            do_HEAD = do_POST = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.watchdog = threading.Timer(deadline_s, self.stop)
        self.watchdog.daemon = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> "FakeHub":
        self.thread.start()
        self.watchdog.start()
        return self

    def stop(self) -> None:
        self.watchdog.cancel()
        self.server.shutdown()
        self.server.server_close()

    # ---- state

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo["commits"][repo["branches"].get(revision, revision)]

    def seed(self, repo_id: str, files: dict[str, bytes], private: bool = False) -> None:
        """Put a repo on the Hub directly (not through the client)."""
        self.repos[repo_id] = {"private": private, "branches": {"main": "0" * 40}, "commits": {"0" * 40: {}}}
        self._commit(repo_id, "main", files)

    def _commit(self, repo_id: str, revision: str, files: dict[str, bytes]) -> str:
        repo = self.repos[repo_id]
        parent = repo["branches"][revision]
        sha = hashlib.sha1((parent + json.dumps(sorted(files)) + str(len(repo["commits"]))).encode()).hexdigest()
        repo["commits"][sha] = {**repo["commits"][parent], **files}
        repo["branches"][revision] = sha
        return sha

    # ---- HTTP

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        path = urlsplit(h.path).path
        authorised = h.headers.get("authorization") == f"Bearer {self.token}"
        body = self._body(h)
        with self.lock:
            self.requests.append((h.command, path, authorised))
            try:
                self._route(h, path, body, authorised)
            except Exception as e:  # noqa: BLE001 - a bug here must show up as a failing request, not a hang
                self._reply(h, 500, {"error": f"fake hub: {e!r}"})

    @staticmethod
    def _body(h) -> bytes:
        if h.headers.get("transfer-encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(h.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    h.rfile.readline()
                    return out
                out += h.rfile.read(size)
                h.rfile.readline()
        n = int(h.headers.get("content-length") or 0)
        return h.rfile.read(n) if n else b""

    def _reply(self, h, status: int, payload=None, headers: dict | None = None, raw: bytes | None = None):
        data = raw if raw is not None else json.dumps(payload if payload is not None else {}).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)

    def _error(self, h, status: int, code: str, message: str):
        self._reply(h, status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

    def _repo(self, h, repo_id: str, authorised: bool, write: bool = False):
        repo = self.repos.get(repo_id)
        if repo is None or (repo["private"] and not authorised):
            self._error(h, 404, "RepoNotFound", f"Repository not found: {repo_id}")
            return None
        if write and not authorised:
            self._error(h, 401, "Unauthorized", "Invalid credentials")
            return None
        return repo

    def _route(self, h, path: str, body: bytes, authorised: bool) -> None:
        repo_re = r"([^/]+/[^/]+)"
        if h.command == "POST" and path == "/api/repos/create":
            if not authorised:
                return self._error(h, 401, "Unauthorized", "Invalid credentials")
            req = json.loads(body)
            repo_id = f"{req['organization']}/{req['name']}"
            if repo_id in self.repos:
                return self._reply(h, 409, {"error": "You already created this model repo", "url": repo_id})
            self.seed(repo_id, {".gitattributes": b"*.safetensors filter=lfs\n"},
                      private=req.get("visibility") == "private" or bool(req.get("private")))
            return self._reply(h, 200, {"url": f"{self.url}/{repo_id}", "name": repo_id})
        if path == "/api/agent-harnesses":  # the client's best-effort telemetry registry: none here
            return self._error(h, 404, "NotFound", "no registry")
        if h.command == "POST" and path == "/api/validate-yaml":
            content = json.loads(body)["content"]
            yaml.safe_load(content.split("---")[1])  # the front matter must be valid YAML
            return self._reply(h, 200, {"errors": [], "warnings": []})
        if m := re.fullmatch(rf"/api/models/{repo_re}/branch/([^/]+)", path):
            repo = self._repo(h, m[1], authorised, write=True)
            if repo is None:
                return None
            branch = unquote(m[2])
            if branch in repo["branches"]:
                return self._error(h, 409, "BranchExists", f"branch {branch} exists")
            repo["branches"][branch] = repo["branches"]["main"]
            return self._reply(h, 200, {})
        if m := re.fullmatch(rf"/api/models/{repo_re}/preupload/([^/]+)", path):
            if self._repo(h, m[1], authorised, write=True) is None:
                return None
            files = json.loads(body)["files"]  # small files: all "regular", so no LFS / xet transfer is needed
            return self._reply(h, 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                                   "oid": None} for f in files]})
        if m := re.fullmatch(rf"/api/models/{repo_re}/commit/([^/]+)", path):
            repo = self._repo(h, m[1], authorised, write=True)
            if repo is None:
                return None
            if self.fail_commits:
                return self._error(h, 403, "Forbidden", "You don't have the rights to write to this repo")
            revision = unquote(m[2])
            if revision not in repo["branches"]:
                return self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
            files = {}
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] != "header":
                    return self._error(h, 400, "BadRequest", f"fake hub takes regular files only: {item['key']}")
            sha = self._commit(m[1], revision, files)
            return self._reply(h, 200, {"commitUrl": f"{self.url}/{m[1]}/commit/{sha}", "commitOid": sha,
                                        "success": True})
        if m := re.fullmatch(rf"/api/models/{repo_re}(?:/revision/([^/]+))?", path):
            repo = self._repo(h, m[1], authorised)
            if repo is None:
                return None
            revision = unquote(m[2] or "main")
            sha = repo["branches"].get(revision, revision)
            if sha not in repo["commits"]:
                return self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return self._reply(h, 200, {"id": m[1], "sha": sha, "private": repo["private"],
                                        "siblings": [{"rfilename": p} for p in sorted(repo["commits"][sha])]})
        if m := re.fullmatch(rf"/api/models/{repo_re}/tree/([^/]+)(?:/(.*))?", path):
            repo = self._repo(h, m[1], authorised)
            if repo is None:
                return None
            files = self.files(m[1], unquote(m[2]))
            prefix = f"{unquote(m[3])}/" if m[3] else ""
            return self._reply(h, 200, [{"type": "file", "path": p, "size": len(d), "oid": git_blob_oid(d)}
                                        for p, d in sorted(files.items()) if p.startswith(prefix)])
        if (m := re.fullmatch(rf"/{repo_re}/resolve/([^/]+)/(.+)", path)) and h.command in ("GET", "HEAD"):
            repo = self._repo(h, m[1], authorised)
            if repo is None:
                return None
            revision = unquote(m[2])
            sha = repo["branches"].get(revision, revision)
            data = repo["commits"].get(sha, {}).get(unquote(m[3]))
            if data is None:
                return self._error(h, 404, "EntryNotFound", f"{m[3]} not found")
            return self._reply(h, 200, headers={"X-Repo-Commit": sha, "ETag": f'"{git_blob_oid(data)}"'}, raw=data)
        self.unhandled.append(f"{h.command} {path}")
        return self._error(h, 404, "NotFound", f"fake hub does not implement {h.command} {path}")


@pytest.fixture
def hub():
    server = FakeHub(TOKEN).start()
    yield server
    server.stop()
    assert not server.unhandled, f"the client called endpoints the fake hub lacks: {server.unhandled}"


@pytest.fixture
def online(hub, monkeypatch, tmp_path):
    """Point this process's huggingface_hub at the fake hub (it read HF_ENDPOINT / HF_HUB_OFFLINE at import)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf-home" / "stored_tokens"))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "hf-home" / ".agent_harnesses.json"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return hub


def local_files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir()) if f.is_file()}


def test_push_with_the_cli_uploads_every_file_and_never_shows_the_token(hub, tiny_run, tmp_path):
    """The real `marl push` in its own process, the endpoint from HF_ENDPOINT, the token from HF_TOKEN,
    huggingface_hub logging at debug level."""
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0",
           "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_VERBOSITY": "debug", "HF_HUB_DISABLE_TELEMETRY": "1"}
    before = local_files(tiny_run / "adapters/reward")
    r = subprocess.run([sys.executable, "-m", "marl.cli", "push", str(tiny_run), "--adapter", "reward",
                        "--repo-id", "me/rm", "--private"], env=env, cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert TOKEN not in r.stdout + r.stderr
    assert "me/rm" in r.stdout and "/commit/" in r.stdout

    arrived = hub.files("me/rm")
    sent = {k: v for k, v in before.items() if k != "README.md"}  # TRL's card is replaced by ours
    assert {k: arrived[k] for k in sent} == sent
    assert set(arrived) == set(sent) | {"README.md", ".gitattributes"}
    assert hub.repos["me/rm"]["private"]
    card = arrived["README.md"].decode()
    assert "`reward`" in card and "role" in card and "eval_accuracy" in card and "## Training config" in card
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    assert manifest["base_fingerprint"] in card
    base = Path(manifest["base_model"])  # a local folder: the card names it, never the machine's paths
    assert f"<local>/{base.name}" in card and str(base.parent) not in card and str(tiny_run) not in card
    assert all(auth for method, path, auth in hub.requests if method == "POST")
    assert local_files(tiny_run / "adapters/reward") == before


def test_push_subfolders_on_a_branch_with_the_login_cache_token(online, tiny_run, capsys, caplog):
    import logging

    from huggingface_hub import constants

    os.environ.pop("HF_TOKEN")  # monkeypatch restores it; the token now comes from the login cache only
    Path(constants.HF_TOKEN_PATH).parent.mkdir(parents=True)
    Path(constants.HF_TOKEN_PATH).write_text(TOKEN)
    caplog.set_level(logging.DEBUG)
    rc = main(["push", str(tiny_run), "--adapter", "sft", "--adapter", "reward", "--repo-id", "me/both",
               "--subfolders", "--revision", "v1", "--commit-message", "two adapters"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert TOKEN not in out.out + out.err + caplog.text
    files = online.files("me/both", "v1")
    for name in ("sft", "reward"):
        local = local_files(tiny_run / "adapters" / name)
        for k, v in local.items():
            if k != "README.md":
                assert files[f"{name}/{k}"] == v
        assert f"{name}/README.md" in files
    assert "reward/" in files["README.md"].decode()
    assert set(online.files("me/both", "main")) == {".gitattributes"}  # main untouched


@pytest.fixture
def run_with_policy(tiny_run, tiny_model_dir, tmp_path):
    """tiny_run plus a policy adapter (non-zero LoRA, value head) added directly."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    model = MultiAdapterModel.from_pretrained(tiny_model_dir)
    model.add_adapter("policy_x", PPOArgs(lora_r=4).lora_config(dropout=0.0))
    with torch.no_grad():
        for p in model.trainable_parameters("policy_x"):
            p.normal_(0.0, 0.05)  # LoRA B starts at zero: make the adapter actually change the output
    model.save_adapter("policy_x", run / "adapters/policy_x")
    return run


def test_hub_adapters_load_back_with_the_same_outputs(online, run_with_policy, tiny_model_dir):
    """Push through the client (one repo per adapter, and subfolders on a branch), then load each back
    from the endpoint as a Hub id and compare with the local adapter."""
    run = run_with_policy
    assert main(["push", str(run), "--adapter", "reward", "--adapter", "sft", "--repo-id", "me/rm"]) == 0
    assert main(["push", str(run), "--adapter", "policy_x", "--adapter", "sft", "--repo-id", "me/all",
                 "--subfolders", "--revision", "v1"]) == 0
    assert "me/all/policy_x@v1" in online.files("me/all", "v1")["policy_x/README.md"].decode()

    model = MultiAdapterModel.from_pretrained(tiny_model_dir)
    model.load_adapter(str(run / "adapters/reward"), "local", role="reward")
    model.load_adapter("me/rm-reward", "hub", role="reward")
    assert any(path.startswith("/me/rm-reward/resolve/") for _, path, _ in online.requests)
    torch.testing.assert_close(model.score_texts(TEXTS, reward_adapter_name="hub"),
                               model.score_texts(TEXTS, reward_adapter_name="local"), rtol=0, atol=0)
    assert model.roles[model.load_adapter("me/rm-sft", "sft_hub")] == "sft"  # role from marl_adapter.json

    model.load_adapter(str(run / "adapters/policy_x"), "policy_local")
    model.load_adapter("me/all/policy_x@v1", "policy_hub")
    assert model.roles["policy_hub"] == "policy"
    ids = model.tokenizer(TEXTS[:1], return_tensors="pt")
    local = model.policy_forward("policy_local", ids["input_ids"], ids["attention_mask"])
    hub = model.policy_forward("policy_hub", ids["input_ids"], ids["attention_mask"])
    for a, b in zip(hub, local):  # logits and values (the value head came along)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(MarlError, match="has no adapter_config.json in policy_x at revision main"):
        model.load_adapter("me/all/policy_x")  # it is on branch v1 only


def test_generate_takes_hub_adapters(online, run_with_policy, capsys):
    run = run_with_policy
    assert main(["push", str(run), "--adapter", "policy_x", "--adapter", "reward", "--repo-id", "me/px"]) == 0
    capsys.readouterr()
    assert main(["generate", str(run), "--adapter", "policy_x", "--adapter", "me/px-policy_x", "--adapter", "base",
                 "--greedy", "--max_new_tokens", "8", "--prompt", "the movie"]) == 0
    out = capsys.readouterr().out
    answers = {k.strip(): v for k, v in (line.split(" | ", 1) for line in out.splitlines() if " | " in line)}
    assert set(answers) == {"policy_x", "me/px-policy_x", "base"}
    assert answers["policy_x"] == answers["me/px-policy_x"]  # the same adapter, from the run and from the Hub
    assert answers["base"] != answers["policy_x"]  # ... and it is applied
    assert main(["generate", str(run), "--adapter", "me/px-reward", "--prompt", "the movie"]) == 2
    assert "'me/px-reward' is a reward adapter" in capsys.readouterr().err


def test_ppo_takes_a_hub_reward_adapter(online, tiny_run, tiny_model_dir, tmp_path):
    from pipelines import ppo

    from .ppo.test_trainer import ppo_args

    assert main(["push", str(tiny_run), "--adapter", "reward", "--repo-id", "me/rm-adapter"]) == 0
    run = tmp_path / "run"
    ppo.run(ppo_args(run, tiny_model_dir, tiny_run, reward_adapter="me/rm-adapter", total_steps=1,
                     policies=[{"name": "policy_a"}], eval_prompts=2, prompts_per_policy=2, max_new_tokens=3))
    assert (run / "adapters/policy_a/adapter_model.safetensors").exists()
    assert any(path.startswith("/me/rm-adapter/resolve/") for _, path, _ in online.requests)
    assert json.loads((run / "manifest.json").read_text())["stages"]["ppo"]["config"]["reward_adapter"] == \
        "me/rm-adapter"


def test_hub_adapters_get_the_same_checks(online, tiny_run, tiny_model_dir, other_model_dir, tmp_path):
    other = MultiAdapterModel.from_pretrained(other_model_dir)
    other.add_adapter("policy_x", PPOArgs(lora_r=4).lora_config(dropout=0.0))
    folder = other.save_adapter("policy_x", tmp_path / "policy_x")
    online.seed("me/other-base", local_files(folder))
    online.seed("me/empty", {"README.md": b"# nothing here\n"})
    assert main(["push", str(tiny_run), "--adapter", "sft", "--repo-id", "me/sft"]) == 0

    model = MultiAdapterModel.from_pretrained(tiny_model_dir)
    with pytest.raises(MarlError, match="was trained on base"):
        model.load_adapter("me/other-base")
    with pytest.raises(MarlError, match="has no score head"):
        model.load_adapter("me/sft", "as_reward", role="reward")
    with pytest.raises(MarlError, match="could not be fetched from the Hub"):
        model.load_adapter("me/missing")
    with pytest.raises(MarlError, match="has no adapter_config.json"):
        model.load_adapter("me/empty")


def test_failed_upload_is_one_line_and_keeps_local_files(online, tiny_run, capsys):
    online.fail_commits = True
    before = {n: local_files(tiny_run / "adapters" / n) for n in ("reward", "sft")}
    rc = main(["push", str(tiny_run), "--adapter", "reward", "--adapter", "sft", "--repo-id", "me/broken"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("marl: error: upload of reward to me/broken-reward failed at commit")
    assert "local files are unchanged" in err and TOKEN not in err
    assert {n: local_files(tiny_run / "adapters" / n) for n in ("reward", "sft")} == before


def test_missing_token_for_a_real_push(tiny_run, monkeypatch, tmp_path, capsys):
    from huggingface_hub import constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "none" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "none" / "stored_tokens"))
    assert main(["push", str(tiny_run), "--adapter", "reward", "--repo-id", "me/rm"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no Hugging Face token: set HF_TOKEN" in err


def test_cards_keep_no_local_paths():
    from marl.hub import public

    cfg = {"run_dir": "/home/me/runs/x", "dataset": ["~/data/pairs.jsonl", "./local.csv", "trl-lib/tldr"],
           "model_name_or_path": "C:\\models\\base", "lora_r": 8, "report_to": "none", "nested": {"p": "../up/a"}}
    assert public(cfg) == {"run_dir": "<local>/x", "dataset": ["<local>/pairs.jsonl", "<local>/local.csv",
                                                               "trl-lib/tldr"],
                           "model_name_or_path": "<local>/base", "lora_r": 8, "report_to": "none",
                           "nested": {"p": "<local>/a"}}
