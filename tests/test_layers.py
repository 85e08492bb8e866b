"""The package's layers import one way: a module imports only from its own layer or below (docs/architecture.md),
never another module's private names, and stages import each other only where the paper's method does."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "llama2"
LAYERS = [  # bottom to top
    ("foundation", {"errors", "paths", "atomic", "recipe", "figures", "cpu", "dtypes", "device", "config"}),
    ("core", {"model", "fused_ops", "tokenizer", "tools", "chat", "chat_session", "lora", "classifier"}),
    ("engines", {"inference", "checkpoint"}),
    ("data", {"data"}),
    ("training", {"train", "reward"}),
    ("eval", {"eval"}),
    ("stages", {"stages"}),
    ("pipeline", {"pipeline"}),
    ("surfaces", {"report", "serve", "commands", "cli", "__main__", "__init__"}),
]
RANK = {name: i for i, (_, names) in enumerate(LAYERS) for name in names}
# rejection sampling, GAtt and safety fine-tune through SFT; DPO reads the reward stage's comparison data path;
# GRPO samples and batches prompts as PPO does
STAGE_IMPORTS_ALLOWED = {"rejection": {"sft"}, "gatt": {"sft"}, "safety": {"sft"}, "dpo": {"reward"},
                         "grpo": {"ppo"}}


def modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)] = path
    return out


def imports(name: str, path: Path) -> list[tuple[str, str | None]]:
    """(imported module relative to llama2, imported name or None) for every import in the file, at any depth."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("llama2"):
                target = node.module.removeprefix("llama2").lstrip(".")
            else:
                continue
            found += [(target, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name.removeprefix("llama2").lstrip("."), None) for a in node.names if a.name.startswith("llama2")]
    return found


def layer_of(module: str) -> int:
    return RANK[module.split(".")[0] or "__init__"]


@pytest.mark.parametrize("name", sorted(modules()))
def test_imports_go_down_the_layers(name):
    path = modules()[name]
    known = modules()
    for target, imported in imports(name, path):
        full = f"{target}.{imported}" if imported and f"{target}.{imported}" in known else target
        assert layer_of(full) <= layer_of(name), (f"{name} ({LAYERS[layer_of(name)][0]}) imports {full} "
                                                  f"({LAYERS[layer_of(full)][0]}), a layer above it")
        if imported and imported.startswith("_") and not imported.startswith("__") and full == target:
            assert target == name, f"{name} imports the private name {imported} of {target}"
        if name.startswith("stages.") and full.startswith("stages.") and full != "stages":
            me, other = name.split(".")[1], full.split(".")[1]
            assert other == me or other in STAGE_IMPORTS_ALLOWED.get(me, set()), f"stage {me} imports stage {other}"


def test_every_module_has_a_layer():
    for name in modules():
        assert (name.split(".")[0] or "__init__") in RANK, f"{name}: add its layer to LAYERS (docs/architecture.md)"
