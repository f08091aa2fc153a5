"""Properties of the house that no single feature test sees: every backend implements the declared op set, every
NumPy layer has its CUDA twin, a family's tensors are listed in its file alone, no assert validates input, no
deep-learning framework is imported by the package, and the CPU path never imports CuPy."""
import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from llmpy.backends.cpu import CPUBackend
from llmpy.backends.cuda.backend import CUDABackend
from llmpy.backends.ops import Backend
from llmpy.models.gpt2 import GPT2Config, spec

PKG = Path(__file__).resolve().parents[1] / "llmpy"
SOURCES = sorted(PKG.rglob("*.py"))


def declared_ops() -> dict[str, inspect.Signature]:
    return {name: inspect.signature(fn) for name, fn in vars(Backend).items()
            if callable(fn) and not name.startswith("_")}


@pytest.mark.parametrize("cls", [CPUBackend, CUDABackend])
def test_backends_implement_every_declared_op(cls):
    ops = declared_ops()
    assert len(ops) > 30
    for name, sig in ops.items():
        impl = getattr(cls, name, None)
        assert callable(impl), f"{cls.__name__} lacks {name}"
        want = [(p.name, p.kind, p.default) for p in sig.parameters.values()]
        got = [(p.name, p.kind, p.default) for p in inspect.signature(impl).parameters.values()]
        assert got == want, f"{cls.__name__}.{name}{inspect.signature(impl)} is not the declared {name}{sig}"


def test_cpu_backend_has_the_declared_attributes():
    be = CPUBackend()
    assert isinstance(be, Backend)  # runtime_checkable: every declared member is there
    for name in Backend.__annotations__:
        assert hasattr(be, name), name


def test_every_numpy_layer_has_a_cuda_twin():
    stems = {p.stem for p in (PKG / "layers").glob("*.py") if not p.stem.startswith("_")}
    kernels = {p.stem for p in (PKG / "backends" / "cuda" / "kernels").glob("*.cu")}
    assert {"encoder", "layernorm", "matmul", "gelu", "attention", "classifier", "adamw"} <= stems
    assert not stems - kernels, f"NumPy layers without kernels/<stem>.cu: {sorted(stems - kernels)}"


def test_gpt2_tensors_are_listed_only_in_its_family_file():
    """Our names of GPT-2's tensors and its Hugging Face per-layer keys appear (as string literals) in family files
    alone (models/gpt2.py; Llama 3 reuses llm.c's names for its own tensors): layouts, init, weight decay, file
    formats derive them from the spec."""
    from llmpy.config import FAMILIES, get_family
    other_families = {get_family(n).name for n in FAMILIES} - {"gpt2"}
    specs = spec(GPT2Config())
    names = {s.name for s in specs}
    hf_layer_keys = {s.hf.split("{l}.")[1] for s in specs if s.per_layer}
    found = []
    for path in SOURCES:
        if path == PKG / "models" / "gpt2.py" or path.stem in other_families:  # (Llama 3 reuses llm.c's names)
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and (
                    node.value in names or any(k in node.value for k in hf_layer_keys)):
                found.append(f"{path.relative_to(PKG)}:{node.lineno} {node.value!r}")
    assert not found, found


def test_no_assert_validates_anything_in_the_package():
    found = [f"{p.relative_to(PKG)}:{n.lineno}" for p in SOURCES for n in ast.walk(ast.parse(p.read_text()))
             if isinstance(n, ast.Assert)]
    assert not found, found


def test_no_deep_learning_framework_in_the_package():
    banned = {"torch", "jax", "jaxlib", "triton", "numba", "tensorflow"}
    found = []
    for p in SOURCES:
        for n in ast.walk(ast.parse(p.read_text())):
            mods = ([a.name for a in n.names] if isinstance(n, ast.Import) else
                    [n.module or ""] if isinstance(n, ast.ImportFrom) and n.level == 0 else [])
            found += [f"{p.relative_to(PKG)}:{n.lineno} {m}" for m in mods if m.split(".")[0] in banned]
    assert not found, found


def test_the_cpu_path_never_imports_cupy(tmp_path):
    code = ("import sys, numpy as np\n"
            "from llmpy.backends import get_backend\n"
            "from llmpy.config import config_from_name, family_of\n"
            "from llmpy.train.optim import AdamW\n"
            "from llmpy.train.step import TrainStep\n"
            "cfg = config_from_name('l1h2c16t8')\n"
            "m = family_of(cfg).model(cfg, get_backend('cpu'), 2, 8)\n"
            "m.init_weights(0)\n"
            "x = np.zeros((2, 8), np.int32)\n"
            "TrainStep(m, AdamW(m)).run([(x, x)], 1e-3)\n"
            "bad = [k for k in sys.modules if k.split('.')[0] in ('cupy', 'cudnn', 'nvmath', 'torch')]\n"
            "print('LOADED', bad)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "LOADED []" in out.stdout, out.stdout + out.stderr


def test_train_help_states_the_defaults_of_train_config():
    """The CLI's help shows TrainConfig's defaults (read from it, never written twice)."""
    import re

    from llmpy.cli import build_parser
    from llmpy.train.config import TrainConfig
    ap = build_parser()
    train = next(a for a in ap._subparsers._group_actions[0].choices.values() if a.prog.endswith(" train"))
    d, checked = TrainConfig(), 0
    for act in train._actions:
        m = re.search(r"\(?default ([^):;]+)", act.help or "")
        if act.dest in TrainConfig.__dataclass_fields__ and m and getattr(d, act.dest) is not None:
            assert m.group(1).strip() == str(getattr(d, act.dest)), (act.dest, act.help)
            checked += 1
    assert checked >= 20
