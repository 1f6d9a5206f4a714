"""The protocol every finetuning method follows, and the layer replacement they share.

A `Method` says what a finetuning method adds to the model (`apply`), which parameters then train
(`trainable_parameters`), how its layers fold back into plain ones for inference (`merge`), what file the trained
weights go to, and which dataclass holds its settings. lit_llama/finetuned.py keeps the registry (`METHODS`);
lora.py, adapter.py and adapter_v2.py each define one.

Layers a method adds (LoRALinear, AdapterAttention, AdapterV2Linear) take over the module they replace with its
weights (so a base checkpoint loads into them under the same names) and create their own new tensors in
`reset_method_parameters()`; those that can fold into a plain layer say how in `merged()`.
"""
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn as nn

from lit_llama.errors import UserError


@dataclass(frozen=True)
class Method:
    name: str
    options: Optional[type]  # the dataclass of the method's settings (LoRAArgs, ...); None: it has none
    record_key: Optional[str]  # where finetune_config.json keeps those settings ("lora", "adapter")
    apply: Callable[[nn.Module, Any], None]  # add the method's layers to the model, in place
    trainable_parameters: Callable[[nn.Module], Iterator[nn.Parameter]]  # what trains once it is applied
    weights_name: str  # the file the trained weights are saved in
    trains_base_weights: bool = False  # full finetuning: every weight trains, in the precision's dtype

    def options_from_record(self, record: dict):
        """The method's settings as finetune_config.json (`record`) keeps them, checked."""
        if self.options is None:
            return None
        values = record.get(self.record_key)
        if not isinstance(values, dict):
            raise ValueError(f"no {self.record_key!r} settings for method {self.name}")
        return self.options(**values)

    def record(self, options) -> dict:
        """The entry finetune_config.json keeps for `options`."""
        if self.options is None:
            if options is not None:
                raise UserError(f"{self.name} finetuning takes no method options, got {options}")
            return {}
        if not isinstance(options, self.options):
            raise UserError(f"{self.name} needs {self.options.__name__} options, got {type(options).__name__}")
        return {self.record_key: asdict(options)}

    def mark_trainable(self, model: nn.Module) -> None:
        """requires_grad on exactly the parameters the method trains."""
        model.requires_grad_(False)
        for param in self.trainable_parameters(model):
            param.requires_grad_(True)


def replace_module(model: nn.Module, name: str, build: Callable[[], nn.Module], keep: tuple[str, ...]) -> nn.Module:
    """Put `build()` at `name` in place of the module there, taking over that module's `keep` attributes (its weights,
    real or on the meta device). `build` runs on the meta device, so no weight is initialised only to be replaced;
    the new module's own tensors are then created beside the weights it took over, unless those are still on meta
    (then load the base weights and call `reset_method_parameters(model)`)."""
    old = model.get_submodule(name)
    with torch.device("meta"):
        new = build()
    for attribute in keep:
        setattr(new, attribute, getattr(old, attribute))
    if not any(param.is_meta for param in old.parameters()):
        new.reset_method_parameters()
    model.set_submodule(name, new)
    return new


def reset_method_parameters(model: nn.Module) -> None:
    """Fresh tensors for every layer a method added (after loading base weights into a model built on meta)."""
    for module in model.modules():
        if hasattr(module, "reset_method_parameters"):
            module.reset_method_parameters()


def merge(model: nn.Module) -> nn.Module:
    """Fold every mergeable method layer into a plain layer, in place: for inference, as fast as the base model."""
    # names, not modules: holding every replaced layer until the end would keep all the old weights alive too
    for name in [name for name, module in model.named_modules() if hasattr(module, "merged")]:
        model.set_submodule(name, model.get_submodule(name).merged())
    return model


def full_trainable_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    return model.parameters()


FULL = Method(
    name="full", options=None, record_key=None, apply=lambda model, options: None,
    trainable_parameters=full_trainable_parameters, weights_name="lit-llama-full-finetuned.pth",
    trains_base_weights=True,
)
