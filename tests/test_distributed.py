"""Two real gloo processes on CPU against one process with the whole batch (issue 4, acceptance 3)."""

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
