"""This process's place in a launch: torchrun and `accelerate launch --multi_gpu` set RANK and WORLD_SIZE.

Read from the environment, not from accelerate's state: training creates that state and clears it when
it ends (`train.forget_accelerator_state`), while the launch lasts as long as the process.
"""

from __future__ import annotations

import os

from llmkd.errors import LlmkdError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def refuse_several_processes(command: str, instead: str) -> None:
    """A command that runs in one process, launched as several: each would repeat the whole job and
    write the same files, one rank deleting another's unfinished writes."""
    if world_size() > 1:
        raise LlmkdError(f"llmkd {command} runs in one process, launched here as {world_size()} (WORLD_SIZE): "
                         f"{instead}")
