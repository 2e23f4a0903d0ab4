"""The offline API, with vLLM's names: LLM(model, ...).generate(prompts, sampling_params) and .chat(messages)."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from quantkit.config import EngineConfig
from quantkit.engine.llm_engine import LLMEngine
from quantkit.outputs import RequestOutput
from quantkit.sampling_params import RequestOutputKind, SamplingParams

Prompt = str | list[int] | dict
Conversation = list[dict[str, Any]]


class LLM:
    def __init__(self, model: str, **kwargs: Any) -> None:
        self.llm_engine = LLMEngine(EngineConfig(model=model, **kwargs))

    def get_tokenizer(self) -> Any:
        return self.llm_engine.get_tokenizer()

    def generate(self, prompts: Prompt | Sequence[Prompt], sampling_params: SamplingParams
                 | Sequence[SamplingParams] | None = None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Runs every prompt to completion; outputs come back in the order of `prompts`."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} sampling_params for {len(prompts)} prompts")
        # one output per request, when it finishes; copies, one per distinct params object, so the caller's stay
        final_only = {i: dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY)
                      for i, p in {id(p): p for p in params_list}.items()}
        return self._run(prompts, [final_only[id(p)] for p in params_list], use_tqdm)

    def chat(self, messages: Conversation | Sequence[Conversation], sampling_params: SamplingParams
             | Sequence[SamplingParams] | None = None, use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template: str | None = None) -> list[RequestOutput]:
        """Renders each conversation with the tokenizer's chat template, then generates."""
        tokenizer = self.get_tokenizer()
        if tokenizer is None:
            raise ValueError("chat needs a tokenizer; this LLM was built with skip_tokenizer_init")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conv in conversations:
            text = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                 chat_template=chat_template)
            prompts.append({"prompt": text,
                            "prompt_token_ids": tokenizer(text, add_special_tokens=False).input_ids})
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, prompts: Sequence[Prompt], params: list[SamplingParams], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(engine.add_request(prompt, p))
        except ValueError:
            engine.abort_request(ids)  # all or nothing: a bad prompt leaves the engine as it was
            raise
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="Generating", unit="req", disable=not use_tqdm) as bar:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        bar.update(1)
        return [finished[i] for i in ids]
