"""Atomic Accelerate checkpoints under `output_dir/checkpoints/step_XXXXXXXX`, the last N kept."""

import re
import shutil
from pathlib import Path

from accelerate import Accelerator

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")


class TrainingProgress:
    """Where the loop is: saved with every checkpoint so a resumed run continues at the same batch."""

    def __init__(self):
        self.global_step = 0
        self.epoch = 0
        self.step_in_epoch = 0

    def state_dict(self) -> dict:
        return {"global_step": self.global_step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.global_step, self.epoch, self.step_in_epoch = state["global_step"], state["epoch"], state["step_in_epoch"]


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of interrupted writes are not listed)."""
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [path for path in folder.iterdir() if path.is_dir() and CHECKPOINT_PATTERN.match(path.name)]
    return sorted(found, key=lambda path: int(CHECKPOINT_PATTERN.match(path.name).group(1)))


def resolve_checkpoint(output_dir: str | Path, requested: str) -> Path:
    """'latest' → newest complete checkpoint of this run; otherwise the given folder, which must exist."""
    if requested == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            raise FileNotFoundError(
                f"--resume_from_checkpoint latest: no checkpoint under {Path(output_dir) / 'checkpoints'}; "
                "start without the flag, or pass a checkpoint folder."
            )
        return checkpoints[-1]
    path = Path(requested)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {requested}: no such folder.")
    return path


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, global_step: int, keep: int) -> Path:
    """Write the whole Accelerate state (model with momentum encoder and queue, optimiser, scheduler, scaler,
    RNG states, registered objects) to a temporary folder, then rename it into place.

    A crash mid-write leaves only a `tmp-` folder that is never resumed from; older checkpoints stay valid.
    """
    folder = Path(output_dir) / "checkpoints"
    final = folder / f"step_{global_step:08d}"
    temporary = folder / f"tmp-step_{global_step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # the same step saved twice (e.g. an epoch end that is also a save step)
            shutil.rmtree(final)
        temporary.rename(final)
        for stale in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    return final
