"""Checks that need CUDA: skipped without it, run by `pytest -m gpu` (benchmarks/gpu_check.sh does)."""

import pytest
import torch

from resnets import create_model, deploy
from resnets.config import from_dict
from resnets.train import train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True)
def exact_float32():
    # TF32 convolutions would make a float32 comparison a test of TF32 rounding.
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize(
    "name", ["resnet50", "resnext50_32x4d", "res2net50_26w_4s", "preact_resnet50", "iresnet50"]
)
def test_cuda_forward_matches_cpu(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
        got = model.cuda()(x.cuda()).cpu()
    assert want.std() > 0.01
    assert (got - want).abs().max().item() <= 1e-3 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_compiled_deploy_on_cuda(dtype):
    torch.manual_seed(0)
    model = create_model("resnet50").cuda().eval()
    x = torch.randn(4, 3, 64, 64, device="cuda")
    with torch.no_grad():
        want = model(x)
    fast = deploy(model, dtype=dtype)
    got = fast(x)
    assert fast.backend == "inductor" and got.dtype == torch.float32 and got.device.type == "cuda"
    assert fast.conv_paths == []  # the matrix-multiply convs are a CPU path
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel <= (1e-4 if dtype is None else 0.1)


def test_training_on_cuda_learns_the_digits(tmp_path):
    cfg = from_dict(
        dict(
            train_subset=512,
            test_subset=256,
            batch_size=64,
            epochs=4,
            warmup_epochs=0.5,
            lr=0.05,
            quiet=True,
            device="cuda",
            out=str(tmp_path / "run"),
        )
    )
    summary = train(cfg)
    assert summary["test_top1"] > 0.5
