"""model.pretrained with timm's hub weights when the Hugging Face hub cannot be reached: the one-line error comes
at once (huggingface_hub would retry each weights file 5 times, ~45 s and ten warnings), and weights already in
the local HF cache still load. The hub is made unreachable without any network: HF_ENDPOINT points at a closed
local port (huggingface_hub's documented setting), or HF_HUB_OFFLINE=1."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO, free_port, run_train, subprocess_env, tiny_train_config

BACKBONE = "test_efficientnet"  # timm's tiny test network; its hub weights are timm/test_efficientnet.r160_in1k
HUB_REPO = "timm/test_efficientnet.r160_in1k"
MESSAGE = f"model.pretrained: cannot get timm's pretrained weights for '{BACKBONE}'"

# Times create_backbone alone (not the imports) in a fresh process, whose huggingface_hub reads the environment.
PROBE = f"""
import json, time
from facetrain.config.schema import ModelConfig
from facetrain.errors import UserError
from facetrain.model.network import create_backbone
start = time.monotonic()
try:
    model = create_backbone(ModelConfig(backbone={BACKBONE!r}, pretrained=True))
    out = {{"ok": True, "stem": model.conv_stem.weight.flatten()[:8].tolist()}}
except UserError as err:
    out = {{"ok": False, "error": str(err)}}
out["seconds"] = time.monotonic() - start
print(json.dumps(out))
"""


def _unreachable_env(cache) -> dict:
    return {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HUB_CACHE": str(cache)}


def _probe(env: dict) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=subprocess_env(**env))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("offline", ["unreachable", "HF_HUB_OFFLINE"])
def test_no_cached_weights_and_no_hub_fails_fast_with_one_line(tmp_path, offline):
    env = _unreachable_env(tmp_path / "empty_cache")
    if offline == "HF_HUB_OFFLINE":
        env["HF_HUB_OFFLINE"] = "1"
    out, stderr = _probe(env)
    assert not out["ok"]
    assert out["error"].startswith(MESSAGE) and "model.pretrained_file" in out["error"], out["error"]
    assert "\n" not in out["error"]
    # a behaviour bound, not a benchmark: the hub's retries took ~45 s; failing fast takes well under a second
    assert out["seconds"] < 15, out
    assert "Retry" not in stderr, stderr[-2000:]


@pytest.mark.slow
def test_training_cli_says_it_in_one_line_without_retry_warnings(tmp_path):
    proc = run_train(["--config", tiny_train_config(tmp_path), "--model.pretrained", "true",
                      "--train.output_dir", tmp_path / "run"], check=False, timeout=300,
                     env=_unreachable_env(tmp_path / "empty_cache"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"facetrain: error: {MESSAGE}") and "unreachable" in last, last
    assert "Retry" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_weights_in_the_local_cache_still_load_when_the_hub_is_unreachable(tmp_path):
    """A hub cache entry holding known weights (a seeded random test_efficientnet, laid out as the hub does):
    with the hub unreachable, create_backbone loads exactly those weights."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(3)
    state = {k: v.contiguous() for k, v in timm.create_model(BACKBONE, pretrained=False).state_dict().items()}
    commit = "0" * 40
    repo = tmp_path / "cache" / f"models--{HUB_REPO.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file(state, str(repo / "snapshots" / commit / "model.safetensors"))
    out, stderr = _probe(_unreachable_env(tmp_path / "cache"))
    assert out["ok"], out
    assert out["stem"] == pytest.approx(state["conv_stem.weight"].flatten()[:8].tolist(), abs=0), out
    assert "Retry" not in stderr, stderr[-2000:]
