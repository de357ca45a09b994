"""Generate the API reference of docs/diffusion_nft_trainer.md from the docstrings and field `help`s.

    python docs/build_api.py           # rewrite the section between the autodoc markers
    python docs/build_api.py --check   # exit 1 if the page is out of date (the test suite runs this)

The section plays the part of TRL's `[[autodoc]] GRPOTrainer` / `[[autodoc]] GRPOConfig` without needing hf
doc-builder: the trainer's docstring and public methods, then every `DiffusionNFTConfig` field (with its default and
its `help`) declared by trl_nft, in declaration order.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from pathlib import Path


PAGE = Path(__file__).with_name("diffusion_nft_trainer.md")
START, END = "<!-- autodoc:start (python docs/build_api.py) -->", "<!-- autodoc:end -->"
TRAINER_METHODS = ("evaluate", "evaluation_weights", "log_images", "create_model_card", "push_to_hub", "init_hf_repo")


SECTIONS = ("Args:", "Returns:", "Raises:", "Parameters:")


def _doc(obj) -> str:
    """The docstring in Markdown: `Args:` / `Returns:` / `Raises:` sections become bold headings with one bullet per
    4-space-indented entry (8-space lines continue the entry)."""
    out: list[str] = []
    in_section = False
    for line in inspect.cleandoc(obj.__doc__ or "").splitlines():
        if line.strip() in SECTIONS:
            out += ["", f"**{line.strip()[:-1]}**", ""]
            in_section = True
        elif in_section and line.startswith("        ") and out and out[-1].startswith("- "):
            out[-1] += " " + line.strip()
        elif in_section and line.startswith("    "):
            out.append("- " + line.strip())
        else:
            in_section = False
            out.append(line)
    return "\n".join(out).strip()


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return f"`{f.default!r}`"
    if f.default_factory is not dataclasses.MISSING:
        return f"`{f.default_factory()!r}`"
    return "required"


def render() -> str:
    from transformers import TrainingArguments

    from trl_nft import DiffusionNFTConfig, DiffusionNFTTrainer

    out = ["### DiffusionNFTTrainer", "", "```python", f"DiffusionNFTTrainer{inspect.signature(DiffusionNFTTrainer)}"]
    out += ["```", "", _doc(DiffusionNFTTrainer), ""]
    for name in TRAINER_METHODS:
        method = getattr(DiffusionNFTTrainer, name)
        signature = str(inspect.signature(method)).replace("(self, ", "(").replace("(self)", "()")
        out += [f"#### `{name}{signature}`", "", _doc(method), ""]
    out += ["### DiffusionNFTConfig", "", _doc(DiffusionNFTConfig), ""]
    inherited = {f.name: f for f in dataclasses.fields(TrainingArguments)}
    out += ["| field | default | description |", "|---|---|---|"]
    for f in dataclasses.fields(DiffusionNFTConfig):
        if f.name.startswith("_") or (f.name in inherited and f.default == inherited[f.name].default):
            continue
        help_text = " ".join(str(f.metadata.get("help", "")).split()).replace("|", "\\|")
        out.append(f"| `{f.name}` | {_default(f)} | {help_text} |")
    return "\n".join(out).rstrip() + "\n"


def updated_page() -> str:
    text = PAGE.read_text()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n\n{render()}\n{END}{tail}"


def main(argv: list[str]) -> int:
    new = updated_page()
    if "--check" in argv:
        if new != PAGE.read_text():
            print(f"{PAGE} is out of date: run `python docs/build_api.py`.", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
