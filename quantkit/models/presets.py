"""Named shapes for `load_format="dummy"`: benchmark large models with random weights and no checkpoint.
Values are the public config.json fields of each model."""
from __future__ import annotations

_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
          "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}

PRESETS: dict[str, dict] = {
    "llama3-8b": {**_LLAMA, "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                  "max_position_embeddings": 8192, "rope_theta": 500000.0,
                  "bos_token_id": 128000, "eos_token_id": [128001, 128009]},
    "llama2-7b": {**_LLAMA, "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                  "max_position_embeddings": 4096, "rope_theta": 10000.0, "torch_dtype": "float16",
                  "bos_token_id": 1, "eos_token_id": 2},
    "mistral-7b": {**_LLAMA, "architectures": ["MistralForCausalLM"], "model_type": "mistral",
                   "vocab_size": 32768, "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                   "max_position_embeddings": 32768, "rope_theta": 1000000.0, "sliding_window": None,
                   "bos_token_id": 1, "eos_token_id": 2},
    "qwen2-7b": {**_LLAMA, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "rms_norm_eps": 1e-6,
                 "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
                 "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                 "max_position_embeddings": 32768, "rope_theta": 1000000.0,
                 "bos_token_id": 151643, "eos_token_id": 151645},
    # The embedded model's shape, for quick dummy runs.
    "smollm2-135m": {**_LLAMA, "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                     "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                     "max_position_embeddings": 8192, "rope_theta": 100000.0, "tie_word_embeddings": True,
                     "bos_token_id": 1, "eos_token_id": 2},
}
