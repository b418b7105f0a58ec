"""API processes: OpenAI-compatible server, async client, offline `LLM`. Imports no torch."""

from frontend.client import AsyncEngine, EngineDeadError
from frontend.lora import LoRARequest
from frontend.offline import LLM
from frontend.outputs import CompletionOutput, OutputKind, RequestOutput
from sampling.params import SamplingParams

__all__ = ["LLM", "AsyncEngine", "EngineDeadError", "SamplingParams", "RequestOutput",
           "CompletionOutput", "OutputKind", "LoRARequest"]
