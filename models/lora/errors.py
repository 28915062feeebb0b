"""The one error a LoRA can cause: the request's own input is at fault."""

from __future__ import annotations

from models.request import InputError


class LoraError(InputError):
    """A LoRA the request named cannot be used (unreadable, wrong model, too large, rank too high).

    The message names the LoRA as the client wrote it and says what is wrong with it. An
    InputError: the worker reports it as the client's fault (a 422 job error) and goes on."""

    def __init__(self, lora: str, problem: str) -> None:
        super().__init__(f"LoRA {lora!r}: {problem}")
        self.lora = lora
        self.problem = problem
