"""GPU-only paths that a CPU can still check: a job that asked for GPUs on a node without usable
CUDA stops (with the versions and the fix) instead of training on the CPU; the stop flag's
timeout during the first (compiled) step; deterministic numerics reset; cached resize matrices."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cxr import cuda_check
from cxrbase.errors import CxrError

pytestmark = pytest.mark.integration  # shards, training or subprocesses (CONTRIBUTING.md)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "env, why",
    [
        ({"SLURM_GPUS_ON_NODE": "4"}, "SLURM_GPUS_ON_NODE=4"),
        ({"SLURM_JOB_GPUS": "0,1"}, "SLURM_JOB_GPUS=0,1"),
        ({"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, "CUDA_VISIBLE_DEVICES=0,1,2,3"),
        ({"CUDA_VISIBLE_DEVICES": "", "SLURM_GPUS_ON_NODE": "4"}, None),  # hidden on purpose
        ({"ACCELERATE_USE_CPU": "True", "SLURM_GPUS_ON_NODE": "4"}, None),  # accelerate launch --cpu
        ({"SLURM_GPUS_ON_NODE": "0"}, None),
        ({}, None),
    ],
)
def test_gpus_requested_reads_the_launcher_and_scheduler(env, why, tmp_path):
    assert cuda_check.gpus_requested(env, proc=tmp_path / "absent") == why


def test_gpus_requested_by_a_node_with_nvidia_devices(tmp_path):
    (tmp_path / "0000:00:1e.0").mkdir()
    assert "NVIDIA devices" in cuda_check.gpus_requested({}, proc=tmp_path)


def test_train_stops_when_the_job_asked_for_gpus_and_cuda_is_unusable(tmp_path):
    """The user's command (python -m cxr.train) on this CPU machine, as Slurm would start it on a GPU
    node whose CUDA does not work: exit 2 with torch's CUDA build, the driver and the fix; before, it
    trained on the CPU without a word."""
    assert not torch.cuda.is_available()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SLURM_GPUS_ON_NODE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cxr.train",
            "--config",
            "cxr/configs/tiny.yaml",
            f"checkpoint.run_dir={tmp_path / 'run'}",
            f"data.shards={tmp_path / 'none'}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    message = done.stderr.strip().splitlines()[-1]
    assert "SLURM_GPUS_ON_NODE=1" in message and "CUDA is unusable" in message
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    assert f"torch {torch.__version__} is {build}" in message
    assert "NVIDIA driver" in message and "accelerate launch --cpu" in message
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_dali_gpu_advice_on_a_gpu_node_is_the_cuda_fix_not_the_cpu_pipeline(tmp_path):
    advice = cuda_check.dali_gpu_advice({"SLURM_JOB_GPUS": "0"}, available=False)
    assert "CUDA is unusable" in advice and "data.device=cpu" not in advice
    assert "data.device=cpu" in cuda_check.dali_gpu_advice({"CUDA_VISIBLE_DEVICES": ""}, available=False)


def test_require_cuda_passes_when_available_or_not_asked():
    cuda_check.require_cuda_if_requested({"SLURM_GPUS_ON_NODE": "8"}, available=True)
    cuda_check.require_cuda_if_requested({"CUDA_VISIBLE_DEVICES": ""}, available=False)
    with pytest.raises(CxrError, match="CUDA_VISIBLE_DEVICES=0"):
        cuda_check.require_cuda_if_requested({"CUDA_VISIBLE_DEVICES": "0"}, available=False)


STOP_FLAG_RANK = """
import os, sys, time, torch, torch.distributed as dist
sys.path.insert(0, os.environ["ROOT"])
from cxr.runs.distributed import StopFlag
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
try:
    stop = StopFlag(None, 1.0, 60.0, compiled=sys.argv[3] == "1")
except TypeError:  # the code before the first-step timeout took only the short one
    stop = StopFlag(None, 1.0)
if rank == 1:
    time.sleep(4)  # this rank compiles its first step 4 s longer than rank 0 (> the 1 s timeout)
try:
    stop.agreed()
    getattr(stop, "step_done", lambda: None)()
    print("first step agreed", flush=True)
except Exception as err:
    print("first step failed:", type(err).__name__, flush=True)
    os._exit(1)
if rank == 1:
    time.sleep(4)  # a later step 4 s late: the short timeout applies again (unless compiled)
try:
    stop.agreed()
    print("second step agreed", flush=True)
except Exception as err:
    print("second step failed:", type(err).__name__, flush=True)
os._exit(0)
"""


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, True])
def test_stop_flag_waits_for_a_slow_first_step_but_not_for_later_ones(tmp_path, compiled):
    """Two gloo ranks, stop-flag timeout 1 s, collective timeout 60 s; rank 1 reaches the first
    step's check 4 s late (a compile): both go on. Rank 1 is 4 s late again at the next check:
    rank 0 fails within the short timeout — unless the model is compiled (recompiles may come later)."""
    env = {**os.environ, "ROOT": str(ROOT), "OMP_NUM_THREADS": "1"}
    store = tmp_path / "store"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", STOP_FLAG_RANK, str(r), str(store), str(int(compiled))],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    rank0 = outs[0][0]
    assert "first step agreed" in rank0, outs
    assert ("second step agreed" in rank0) == compiled, outs


def test_deterministic_numerics_are_undone_by_the_next_run():
    """A deterministic run then a normal one in the same process: cuDNN's deterministic flag and
    torch's deterministic mode are off again (cudnn.deterministic used to stay on)."""
    from cxr.config import load_config
    from cxr.runs.distributed import configure_numerics

    before = (
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.are_deterministic_algorithms_enabled(),
    )
    try:
        configure_numerics(load_config(None, ["train.deterministic=true"]), cuda=False)
        assert torch.backends.cudnn.deterministic and torch.are_deterministic_algorithms_enabled()
        configure_numerics(load_config(None, ["train.deterministic=false"]), cuda=False)
        assert not torch.backends.cudnn.deterministic
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[:2]
        torch.use_deterministic_algorithms(before[2])


def test_separable_resize_builds_its_matrices_once_and_equals_interpolate():
    """The matrices are cached per size, dtype and device (the same tensor on the second call), and
    the product still equals torch's antialiased bilinear interpolate."""
    import torch.nn.functional as F

    from cxr.models.stem import resize_matrix, separable_resize

    x = torch.randn(2, 3, 40, 40, dtype=torch.float64)
    first = resize_matrix(40, 24, torch.float64, "cpu")
    assert resize_matrix(40, 24, torch.float64, "cpu") is first
    assert resize_matrix(40, 24, torch.float32, "cpu") is not first
    torch.testing.assert_close(
        separable_resize(x, 24), F.interpolate(x, size=(24, 24), mode="bilinear", align_corners=False, antialias=True)
    )


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_buckets_are_sized_for_the_model_not_deepspeeds_2gb_default(stage):
    """The shipped ZeRO configs leave the buckets to training, which sizes them to the model's
    gradient: DenseNet-121 (1 channel, 14 labels) has 6.96 M parameters (timm's 7.98 M at 1000 classes
    less the 1024×1000+1000 classifier, plus 1024×14+14, less 2 of 3 stem input channels
    (64×7×7×2)); DeepSpeed's default would be 5e8 elements (2 GB of fp32)."""
    import json

    from cxr.models import build_model
    from cxr.runs.distributed import ZERO_BUCKET_CAP, fill_zero_buckets

    ds = json.loads((ROOT / f"launch/configs/deepspeed_zero{stage}.json").read_text())
    assert ds["zero_optimization"].get("reduce_bucket_size") == "auto"
    fill_zero_buckets(ds, build_model("densenet121"))
    expected = 7_978_856 - (1024 * 1000 + 1000) + (1024 * 14 + 14) - 64 * 7 * 7 * 2
    zero = ds["zero_optimization"]
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == expected
    vit = json.loads((ROOT / f"launch/configs/deepspeed_zero{stage}.json").read_text())
    fill_zero_buckets(vit, build_model("vit"))  # ViT-B/16: 86 M parameters, capped
    assert vit["zero_optimization"]["reduce_bucket_size"] == ZERO_BUCKET_CAP


def test_saliency_is_micro_batched_and_equals_the_whole_batch():
    """saliency over 6 images: the model never sees more than SALIENCY_MICRO_BATCH images at once
    (one backward at a time), and the maps equal the gradient of each image's own logits, computed
    here image by image with torch.autograd.grad (eval mode: images are independent)."""
    from cxr.models import build_model
    from cxr.tools import explain

    torch.manual_seed(0)
    model = build_model("cnn", width=4).eval()
    seen = []
    model.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[0]))
    image = torch.randn(6, 1, 32, 32)
    maps = explain.heat_maps("saliency", model, image, [0, 3])
    assert max(seen) <= explain.SALIENCY_MICRO_BATCH < 6
    for i in range(6):
        for j, c in enumerate((0, 3)):
            x = image[i : i + 1].clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(model(x)[0, c], x)
            torch.testing.assert_close(maps[i, j], grad[0, 0].clamp(min=0), rtol=1e-4, atol=1e-6)


def test_train_log_says_the_probed_layout_and_how_it_differs_from_the_config(tmp_path):
    """A sweep job writes RUN/probe.json before training (launch.submit); train.log then says what
    was chosen, why, and that the micro-batch is not the config's."""
    from helpers import MemoryLoader, tiny_config

    from cxr.train import train
    from cxr.training.probe import ProbeResult, write_probe

    run = tmp_path / "run"
    write_probe(
        run,
        ProbeResult(
            32,
            "cpu",
            16,
            8,
            2,
            False,
            1000.0,
            10.0,
            1.0,
            18.0,
            {},
            config_micro_batch=16,
            config_grad_checkpointing=False,
            reason="micro-batch 8 × accumulation 2, ...",
        ),
    )
    assert train(tiny_config(run, "train.epochs=1", "train.max_steps=1"), loader_fn=MemoryLoader) == 0
    log = (run / "train.log").read_text()
    assert "batch layout from the memory probe: micro-batch 8 × accumulation 2" in log
    assert "differs from the config: micro-batch 8 (config 16" in log


def test_vit_built_for_its_input_size_does_not_resample_pos_embed_per_forward(monkeypatch):
    """ViT at 64 px: built with img_size=64 the forward calls no interpolate (the position
    embeddings were sized once at build); built for 224 it resamples them in every forward (the
    bicubic whose CUDA backward is not deterministic) — and the deterministic check says so."""
    import torch.nn.functional as F

    from cxr.models import build_model
    from cxr.models.transformer import deterministic_input_error

    calls = []
    real = F.interpolate
    monkeypatch.setattr(F, "interpolate", lambda *a, **k: calls.append(k.get("mode")) or real(*a, **k))
    x = torch.randn(1, 1, 64, 64)
    sized = build_model("vit", arch="vit_tiny_patch16_224", img_size=64).train()
    assert sized.trunk.backbone.pos_embed.shape[1] == 1 + (64 // 16) ** 2
    sized(x).sum().backward()
    sized(x).sum().backward()
    assert calls == []
    build_model("vit", arch="vit_tiny_patch16_224").train()(x).sum().backward()
    assert calls == ["bicubic"]
    assert "model.options.img_size=64" in deterministic_input_error({}, False, 64)
    assert deterministic_input_error({"img_size": 64}, False, 64) is None
    assert deterministic_input_error({}, True, 1024) is None  # conv stem: the ViT sees stem_size (224)
