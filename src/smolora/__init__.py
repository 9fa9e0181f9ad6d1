"""SmoLoRA: LoRA fine-tuning of small causal language models on your own machine.

from smolora import SmoLoRA
lora = SmoLoRA(dataset_name="train.jsonl")   # embedded SmolLM2-135M-Instruct by default
lora.train(); lora.save()
print(lora.inference("Hello!"))
"""

__version__ = "0.1.0"
__all__ = ["SmoLoRA", "SmoLoRAError", "merge_adapter"]


def __getattr__(name: str):
    # Lazy: `smolora --help` should not pay for importing torch and transformers.
    if name == "SmoLoRA":
        from smolora.api import SmoLoRA

        return SmoLoRA
    if name == "SmoLoRAError":
        from smolora.errors import SmoLoRAError

        return SmoLoRAError
    if name == "merge_adapter":
        from smolora.merge import merge_adapter

        return merge_adapter
    raise AttributeError(name)
