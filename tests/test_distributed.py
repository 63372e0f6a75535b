"""Two real gloo processes on CPU against one process with the whole batch (issue 4, acceptance 3)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent


def run_worker(output: Path, processes: int) -> None:
    environment = {**os.environ, "ACCELERATE_USE_CPU": "true", "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"}
    if processes == 1:
        command = [sys.executable, str(TESTS / "distributed_worker.py"), str(output)]
    else:
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
        command = [torchrun, "--nproc_per_node", str(processes), "--master_port", "29531",
                   str(TESTS / "distributed_worker.py"), str(output)]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


def test_two_processes_share_one_queue_and_match_one_process_with_the_whole_batch(tmp_path):
    run_worker(tmp_path / "two", processes=2)
    run_worker(tmp_path / "one", processes=1)
    rank0, rank1 = (torch.load(f"{tmp_path / 'two'}.rank{rank}") for rank in (0, 1))
    single = torch.load(f"{tmp_path / 'one'}.rank0")
    for step, (queue0, queue1) in enumerate(zip(rank0["queues"], rank1["queues"])):
        assert torch.equal(queue0, queue1), f"ranks hold different queues after step {step + 1}"
        # keys of all 8 images entered: the pointer advanced by the global batch
        assert rank0["pointers"][step] == rank1["pointers"][step] == (8 * (step + 1)) % 20
        torch.testing.assert_close(queue0, single["queues"][step], rtol=1e-4, atol=1e-5)
    # The last step's shares are unequal (5 + 3), where DDP's mean of per-process means is not the global mean.
    assert rank0["losses"][:-1] == pytest.approx(single["losses"][:-1], rel=1e-4)


def test_pretraining_script_on_two_processes_keeps_the_per_step_schedule(tmp_path):
    """The whole loop under torchrun: runs, checkpoints, exports, and the learning rate follows optimiser steps."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    command = [
        torchrun, "--nproc_per_node", "2", "--master_port", "29532", str(TESTS.parent / "scripts" / "pretrain.py"),
        "--image_size", "16", "--per_device_batch_size", "16", "--max_steps", "4", "--warmup_steps", "1",
        "--projection_hidden_size", "32", "--queue_size", "64", "--num_workers", "0", "--knn_train_split", "none",
        "--report_to", "none", "--logging_steps", "1", "--checkpointing_steps", "2", "--output_dir", str(tmp_path),
    ]
    environment = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    peak = 0.06 * (2 * 16) / 256  # base lr x global batch / 256
    # warm-up over step 1, then a half cosine over steps 2-4 (one scheduler step per optimiser step)
    assert [entry["learning_rate"] for entry in log] == pytest.approx([peak, 0.75 * peak, 0.25 * peak, 0.0], abs=1e-9)
    assert [path.name for path in sorted((tmp_path / "checkpoints").iterdir())] == ["step_00000002", "step_00000004"]
    assert (tmp_path / "final" / "model.safetensors").is_file()
