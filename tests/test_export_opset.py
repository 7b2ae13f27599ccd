"""facetrain.export --opset: a number outside the opsets ONNX has is refused at once, with the range that works
(torch's exporter would run, keep its own opset and be reported as failing to convert, "use 18 or higher").
A tiny untrained bundle: no shared data, no export runs, about a second."""

from __future__ import annotations

import pytest
import torch

onnx = pytest.importorskip("onnx", reason='needs the serve extra: pip install -e ".[serve]"')
pytest.importorskip("onnxruntime", reason='needs the serve extra: pip install -e ".[serve]"')

from facetrain import export as export_cli  # noqa: E402
from facetrain.config.schema import ModelConfig  # noqa: E402
from facetrain.data.images import Preprocess  # noqa: E402
from facetrain.errors import UserError  # noqa: E402
from facetrain.model.bundle import write_bundle  # noqa: E402
from facetrain.model.network import create_model  # noqa: E402


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    path = tmp_path_factory.mktemp("opset") / "bundle"
    path.mkdir()
    mcfg = ModelConfig(backbone="test_efficientnet", embedding_dim=16, channels_last=False)
    torch.manual_seed(0)
    write_bundle(path, create_model(mcfg), mcfg, Preprocess(32, [0.5] * 3, [0.5] * 3))
    return path


@pytest.mark.parametrize("offset", [1, 10])
def test_an_opset_beyond_onnx_is_refused_before_exporting_with_the_range(bundle, offset):
    highest = onnx.defs.onnx_opset_version()
    opset = highest + offset
    with pytest.raises(UserError) as err:
        export_cli.main(["--model", str(bundle), "--opset", str(opset)])
    message = str(err.value)
    assert message.startswith(f"--opset {opset}: ") and f"from 18 to {highest}" in message, message
    assert "or higher" not in message and "could not convert" not in message, message
    assert not (bundle / "model.onnx").exists()


def test_opset_zero_names_the_range(bundle):
    with pytest.raises(UserError, match=r"--opset 0: .* use an --opset from 18 to \d+"):
        export_cli.main(["--model", str(bundle), "--opset", "0"])
