"""Checkpoint layout of a model whose MoE layers are adapters on a frozen dense FFN (LLaVA-MoLE's LoRA
experts, ``stgc.moe.experts.lora``): the trained MoE tensors (LoRA experts and routers) are saved in their
own file, ``moe_adapters.safetensors``, apart from the frozen base (every other tensor, ``model-base``
.safetensors or the base's shards), and ``model.safetensors.index.json`` maps every tensor to its file, so
that ``from_pretrained`` of the folder (transformers' sharded loading) gives the whole model, while the
experts alone can be read, shipped or swapped with one file. A model whose banks hold full experts (the
FFN bank) is saved as transformers saves it.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

ADAPTERS_NAME = "moe_adapters.safetensors"
BASE_NAME = "model-base.safetensors"
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def adapter_keys(model: nn.Module) -> set[str]:
    """State-dict names of the trained MoE tensors of every MoE block whose bank keeps a frozen base
    (``ExpertBank.parameter_group`` says "mlp" for some of its parameters): the bank's other parameters
    and the block's router. Empty when no bank keeps a frozen base."""
    from stgc.moe import MoEBlock

    keys: set[str] = set()
    for prefix, block in model.named_modules():
        if not isinstance(block, MoEBlock):
            continue
        bank = block.experts
        groups = {n: bank.parameter_group(n) for n, _ in bank.named_parameters()}
        if "mlp" not in groups.values():
            continue
        keys |= {f"{prefix}.experts.{n}" for n, g in groups.items() if g != "mlp"}
        keys |= {f"{prefix}.router.{n}" for n, _ in block.router.named_parameters()}
    return keys


def split_adapters(folder: str | Path, keys: set[str]) -> None:
    """Move the tensors ``keys`` of a saved checkpoint folder (one ``model.safetensors`` or shards with an
    index) into ``moe_adapters.safetensors`` and write the index; a single file's rest becomes
    ``model-base.safetensors``. Nothing happens when no saved tensor is in ``keys``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = Path(folder)
    index_path, single = folder / INDEX_NAME, folder / SINGLE_NAME
    if single.exists():
        with safe_open(str(single), "pt") as f:
            weight_map = {k: SINGLE_NAME for k in f.keys()}
        index: dict = {"metadata": {}, "weight_map": weight_map}
    elif index_path.exists():
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
    else:
        return
    if not keys & set(weight_map):
        return
    moved = {}
    for name in sorted(set(weight_map.values()) - {ADAPTERS_NAME}):
        path = folder / name
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {"format": "pt"}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        picked = {k: tensors.pop(k) for k in list(tensors) if k in keys}
        if not picked:
            continue
        moved.update(picked)
        target = folder / (BASE_NAME if name == SINGLE_NAME else name)
        save_file(tensors, str(target), metadata=metadata)
        if name == SINGLE_NAME:
            path.unlink()
        weight_map.update({k: target.name for k in tensors})
    save_file(moved, str(folder / ADAPTERS_NAME), metadata={"format": "pt"})
    weight_map.update({k: ADAPTERS_NAME for k in moved})
    index["weight_map"] = dict(sorted(weight_map.items()))
    index["metadata"] = {**index.get("metadata", {}), "total_size": _total_size(folder, weight_map)}
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _total_size(folder: Path, weight_map: dict[str, str]) -> int:
    """Bytes of tensor data listed in the index (what transformers' own index records)."""
    size = 0
    for name in set(weight_map.values()):
        with open(folder / name, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        spans = [v["data_offsets"] for k, v in header.items() if k != "__metadata__"]
        size += sum(end - start for start, end in spans)
    return size
