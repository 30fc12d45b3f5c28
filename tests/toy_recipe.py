"""A test-only training recipe, registered from this one module: "Toy LoRA" on SDXL.

It trains a LoRA on two attention blocks other than B-LoRA's (`up_blocks.0.attentions.2` as the `subject` part,
`up_blocks.1.attentions.1` as the `look` part), with a prompt template of its own and one form setting. Its
training step is B-LoRA's (the point is the registration, not the method). Part names that are neither
`content` nor `style` show that nothing outside a recipe's package assumes them.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.blora import BLoRARecipe, BLoRASettings, split_by_block
from pipelines.blora import train_config as blora_train_config
from pipelines.errors import InvalidAdapter, InvalidSetting
from pipelines.package_info import Composition
from pipelines.recipes import ImportSpec, PartSpec, RecipeSpec, SampleSpec, register_recipe, train_package
from pipelines.settings import like, setting
from pipelines.training import RunRequest

KEY = "toy-lora"
BLOCKS = {"subject": "up_blocks.0.attentions.2", "look": "up_blocks.1.attentions.1"}
TEMPLATES = ("a {token}", "a photo of {token}")
CARD_NOTE = "## Toy LoRA notes"


@dataclass
class ToyRequest(RunRequest):
    """The toy's request: B-LoRA's loop settings and one setting of its own, shown in the Train form."""

    model: str = like(RunRequest, "model", "tiny-sdxl")
    learning_rate: float = like(RunRequest, "learning_rate", 1e-3)
    adapter: str = setting("lora", choices=("lora", "dylora"), help="lora, or dylora (export at another rank)")
    template: str = setting(TEMPLATES[0], choices=TEMPLATES, label="prompt template", form=True,
                            help="the training prompt; {token} is the trigger token")

    def validate(self) -> None:
        super().validate()
        if self.rank > 32:
            raise InvalidSetting("the toy recipe trains ranks up to 32")


def settings_for(request: ToyRequest, model) -> BLoRASettings:
    return BLoRASettings(rank=request.rank, resolution=request.resolution or model.resolution,
                         adapter=request.adapter, blocks=dict(BLOCKS), prompt_template=request.template)


def job_fields(request: ToyRequest, settings: BLoRASettings) -> dict:
    return {"rank": settings.rank, "template": settings.prompt_template, "adapter": settings.adapter}


class ToyRecipe(BLoRARecipe):
    def export(self):
        exported = super().export()
        exported.facts["template"] = self.settings.prompt_template
        return exported


def train_toy(request: ToyRequest, **callbacks):
    return train_package(SPEC, request, **callbacks)


def import_parts(canonical):
    outside = [key for key in canonical if not any(key.startswith(b + ".") for b in BLOCKS.values())]
    if outside:
        raise InvalidAdapter(f"not a toy LoRA: it has weights outside its blocks, e.g. {outside[0]}")
    return {role: state for role, state in split_by_block(canonical, BLOCKS).items() if state}


def card_notes(info) -> list[str]:
    return [CARD_NOTE, "", f"Trained with the template `{info.extra.get('template')}`.", ""]


SPEC = register_recipe(RecipeSpec(
    key=KEY,
    command="toy",
    name="Toy LoRA",
    label="Toy LoRA · SDXL",
    arch="sdxl",
    blurb="A test-only recipe: LoRA on two other attention blocks.",
    settings=ToyRequest,
    train=train_toy,
    settings_for=settings_for,
    make_recipe=ToyRecipe,
    train_config=blora_train_config,
    job_fields=job_fields,
    parts=(PartSpec("subject", "the toy's subject"), PartSpec("look", "the toy's look")),
    composition=Composition("Toy", {"mix": "subject", "content": "subject", "reembed": "subject", "style": "look"}),
    samples=(SampleSpec("subject", ("subject",), "a {token}", "subject"),),
    token_format="[t{number}]",
    adapters=("lora", "dylora"),
    card_notes=card_notes,
    card_settings=("template",),
    importer=ImportSpec(layouts="toy LoRA files", split=import_parts, blocks=dict(BLOCKS), default_token="[t]"),
    split=lambda state, info: split_by_block(state, info.blocks or BLOCKS),
))
